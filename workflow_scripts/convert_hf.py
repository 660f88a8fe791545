"""Snakemake adapter: assemble the Hugging Face model directory (rule ``convert_hf``)."""

from vectorlm.config import parse_size
from vectorlm.export.convert import convert_hf
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
export = sm.params.export
with logged_stage("convert_hf", sm.log[0]):
    convert_hf(
        sm.input.weights,
        model_dir=sm.input.model,
        output_dir=sm.output.model,
        adapter_dir=sm.output.get("adapter"),  # only with lora.enabled
        smoke_test_prompt=export["smoke_test_prompt"] if export["smoke_test"] else None,
        smoke_test_max_bytes=parse_size(export["smoke_test_max_size"], key="export.smoke_test_max_size"),
        trust_remote_code=sm.params.trust_remote_code,
    )
