"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), written atomically and read safely.

A checkpoint ``{output_dir}/checkpoints/step_<N>/`` holds

- the DCP files of the model and the optimizer's tensors (every rank writes its own shards; DCP reshards on load, so
  a run may resume on a different number of ranks),
- ``rng/rank_<R>.cpu`` (and ``.cuda``): each rank's random number generator state as raw bytes,
- ``train_state.json``: step, data position, scheduler state, eval history and the fingerprint that decides whether
  a later run may resume from it,
- ``vectorlm_config.yaml``: the resolved configuration that produced it.

It is written under a temporary name and renamed once complete, with ``train_state.json`` written last, so a save
that dies halfway never looks like a checkpoint. Nothing is unpickled from disk except DCP's own ``.metadata``, and
that through an unpickler that admits only DCP's metadata classes (the same idea as ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim import Optimizer

from vectorlm.config import write_stage_config

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step_{step}"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and refuses any global outside its known, inert classes."""

    ALLOWED = {
        ("pathlib", "PosixPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        *(("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
            "ChunkStorageMetadata", "BytesStorageMetadata",
        )),
    }  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a checkpoint's .metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with a restricted unpickler for the metadata file (tensors already load weights-only)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{self.path}/.metadata does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def problem_with(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint (missing marker, unreadable metadata, missing or truncated files),
    or None when it is complete."""
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, pickle.UnpicklingError, EOFError) as error:
        return f"{type(error).__name__}: {error}"
    if not isinstance(state, dict) or "step" not in state:
        return f"{TRAIN_STATE} has no step"
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
    for name, needed in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < needed:
            return f"{name} is truncated ({file.stat().st_size} of {needed} bytes)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``step_<N>`` directories under ``root``, oldest first."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_valid_checkpoint(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint under ``root`` and its train state (main process only).

    Newer ones that are incomplete or damaged are reported and renamed to ``step_<N>.invalid`` so that they are never
    picked again or mistaken for a good one.
    """
    for _, path in reversed(list_checkpoints(root)):
        problem = problem_with(path)
        if problem is None:
            return path, json.loads((path / TRAIN_STATE).read_text())
        target = path.with_name(path.name + ".invalid")
        shutil.rmtree(target, ignore_errors=True)
        path.rename(target)
        log.warning("checkpoint %s is unusable (%s); moved it to %s and looking further back", path, problem, target)
    return None


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    train_state: dict[str, Any],
    settings: dict[str, Any],
    upstream: str | Path,
    keep: int,
    trainable_only: bool = False,
) -> float:
    """Writes a checkpoint to ``path`` from every rank, atomically, then keeps only the newest ``keep``.

    ``settings`` and the configuration recorded beside ``upstream`` (the packed data) are saved with it. With
    ``trainable_only`` (LoRA) the frozen base weights are left out: they are read from the base model again. Returns
    the seconds the save took.
    """
    start = time.perf_counter()
    rank = dist.get_rank()
    partial = path.with_name(f".{path.name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    # Only tensors go to DCP: its loader unpickles non-tensor entries without weights_only. The optimizer's
    # param_groups hold nothing that the config does not give again.
    dcp.save({"model": model_state, "optim": optim_state["state"]}, checkpoint_id=str(partial))
    _save_rng(partial / "rng", rank)
    dist.barrier()
    if rank == 0:
        write_stage_config(partial, settings, upstream=upstream)
        _write_durably(partial / TRAIN_STATE, json.dumps(train_state, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
        _prune(path.parent, keep=keep)
    dist.barrier()
    seconds = time.perf_counter() - start
    log.info("saved checkpoint %s in %.2f s (%.1f MB)", path, seconds, _size(path) / 1e6 if rank == 0 else 0)
    return seconds


def load_checkpoint(
    path: Path, *, model: nn.Module, optimizer: Optimizer, restore_rng: bool, trainable_only: bool = False
) -> float:
    """Loads model and optimizer state (resharded to this run's ranks) and, if asked, this rank's RNG state."""
    start = time.perf_counter()
    options = _options(trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    dcp.load({"model": model_state, "optim": optim_state["state"]}, storage_reader=SafeFileSystemReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    if restore_rng:
        _load_rng(path / "rng", dist.get_rank())
    return time.perf_counter() - start


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def archive_checkpoints(root: Path) -> Path:
    """Moves every checkpoint under ``root`` to ``root/archive/<time>/`` and returns that directory."""
    target = root / "archive" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for _, path in list_checkpoints(root):
        path.rename(target / path.name)
    return target


def _save_rng(directory: Path, rank: int) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"rank_{rank}.cpu").write_bytes(torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available():
        (directory / f"rank_{rank}.cuda").write_bytes(torch.cuda.get_rng_state().numpy().tobytes())


def _load_rng(directory: Path, rank: int) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray((directory / f"rank_{rank}.cpu").read_bytes()), dtype=torch.uint8))
    cuda = directory / f"rank_{rank}.cuda"
    if torch.cuda.is_available() and cuda.is_file():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(cuda.read_bytes()), dtype=torch.uint8))


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _prune(root: Path, *, keep: int) -> None:
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
        log.info("removed old checkpoint %s (train.keep_checkpoints=%d)", old, keep)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
