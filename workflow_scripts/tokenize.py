"""Snakemake adapter: tokenize the experiment's documents (rule ``tokenize``)."""

from vectorlm.config import DataConfig, operational
from vectorlm.data.tokenize import run_tokenize
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("tokenize", sm.log[0]):
    run_tokenize(
        model_dir=sm.input.model,
        # packing and chunk_overlap are pack's: defaults here
        data=DataConfig(**sm.params.data, **operational(sm.config, "data")),
        output_dir=sm.output.tokenized,
        trust_remote_code=sm.params.trust_remote_code,
    )
