"""Snakemake adapter: pack tokenized documents into training rows (rule ``pack``)."""

from vectorlm.data.pack import run_pack
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("pack", sm.log[0]):
    run_pack(
        tokenized_dir=sm.input.tokenized,
        max_seq_len=sm.params.max_seq_len,
        output_dir=sm.output.packed,
        overlap=sm.params.chunk_overlap,
        packing=sm.params.packing,
    )
