"""Snakemake adapter: assemble the Hugging Face model directory (rule ``convert_hf``)."""

from vectorlm.export import convert_hf
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("convert_hf", sm.log[0]):
    convert_hf(
        sm.input.weights,
        model_dir=sm.input.model,
        output_dir=sm.output.model,
        adapter_dir=sm.output.get("adapter"),  # only with lora.enabled
        smoke_test_prompt=sm.params.export["smoke_test_prompt"] if sm.params.export["smoke_test"] else None,
        trust_remote_code=sm.params.trust_remote_code,
    )
