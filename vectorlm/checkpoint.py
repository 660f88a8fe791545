"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint directory ``step_<N>`` holds the DCP files of the model and optimizer (every rank writes its own
shards), ``train_state.json`` (step, data position, scheduler) and ``vectorlm_config.yaml`` (the resolved configuration that
produced it, see :func:`vectorlm.config.write_stage_config`). Nothing in it is a pickle.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.optim import Optimizer

from vectorlm.config import write_stage_config

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step}"


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    train_state: dict[str, Any],
    settings: dict[str, Any],
    upstream: str | Path,
) -> float:
    """Writes a checkpoint to ``path`` from every rank; returns the seconds it took.

    ``settings`` and the configuration recorded beside ``upstream`` (the packed data) are saved with it.
    """
    start = time.perf_counter()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        (path / TRAIN_STATE).write_text(json.dumps(train_state, indent=2) + "\n")
        write_stage_config(path, settings, upstream=upstream)
    dist.barrier()
    seconds = time.perf_counter() - start
    log.info("saved checkpoint %s in %.1f s", path, seconds)
    return seconds
