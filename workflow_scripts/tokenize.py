"""Snakemake adapter: tokenize one source of the experiment's documents (rule ``tokenize``)."""

from vectorlm.config import DataConfig
from vectorlm.config_schema import operational
from vectorlm.data.tokenize import run_tokenize
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
# The source's config key, for messages (not a param: the same source in another experiment shares this job)
path = sm.params.source["data"]["train"]
key = next((k for k, p in DataConfig(**sm.config["data"]).paths.items() if p == path), "data.train")
with logged_stage("tokenize", sm.log[0]):
    run_tokenize(
        model_dir=sm.input.model,
        # packing and chunk_overlap are pack's: defaults here
        data=DataConfig(**sm.params.source["data"], **operational(sm.config, "data")),
        output_dir=sm.output.tokenized,
        trust_remote_code=sm.params.trust_remote_code,
        train_key=key,
        hold_out=sm.params.source["hold_out"],
    )
