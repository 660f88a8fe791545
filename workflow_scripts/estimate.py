"""Snakemake adapter: the training run's memory, time and disk, before it is queued (rule ``estimate``)."""

from vectorlm.config import ExportConfig, LoraSettings, TrainConfig
from vectorlm.estimate.run_estimate import estimate_stage
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("estimate", sm.log[0]):
    estimate_stage(
        sm.input.model,
        sm.output.estimate,
        train=TrainConfig(**sm.params.train),
        lora=LoraSettings(**sm.params.lora),
        export=ExportConfig(dtype=sm.params.export_dtype),
        settings=sm.params.estimate,
        max_seq_len=sm.params.max_seq_len,
        resources=sm.params.resources,
        packed_stats=sm.params.packed_stats,
        trust_remote_code=sm.params.trust_remote_code,
    )
