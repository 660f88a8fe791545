"""Snakemake adapter: the final sharded checkpoint into safetensors shards (rule ``consolidate``)."""

import json

from vectorlm.config import ExportConfig
from vectorlm.export.consolidate import consolidate
from vectorlm.log import logged_stage

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("consolidate", sm.log[0]):
    with open(sm.input.summary) as f:
        checkpoint = json.load(f)["checkpoint"]
    consolidate(
        checkpoint,
        model_dir=sm.input.model,
        output_dir=sm.output.weights,
        export=ExportConfig(**sm.params.export),
        trust_remote_code=sm.params.trust_remote_code,
    )
