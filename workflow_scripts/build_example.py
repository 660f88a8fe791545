"""Snakemake adapter: build the embedded example model (tokenizer + tiny Llama) from the shipped corpus."""

from vectorlm.example.tiny_llama import build_example_model
from vectorlm.log import logged_stage

with logged_stage("build_example", snakemake.log[0]):  # noqa: F821 (injected by Snakemake)
    build_example_model(snakemake.input.corpus, snakemake.output.model, **snakemake.params.sizes)  # noqa: F821
