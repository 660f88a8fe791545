"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), written atomically and read safely.

A checkpoint ``{output_dir}/checkpoints/step_<N>/`` holds

- the DCP files of the model and the optimizer's tensors (every rank writes its own shards; DCP reshards on load, so
  a run may resume on a different number of ranks),
- ``rng/rank_<R>.cpu`` (and ``.cuda``): each rank's random number generator state as raw bytes,
- ``train_state.json`` (vectorlm/train/train_state.py): step, data position, eval history and the fingerprint that
  decides whether a later run may resume from it,
- ``vectorlm_config.yaml``: the resolved configuration that produced it.

It is written under a temporary name and renamed once complete, with ``train_state.json`` written last, so a save
that dies halfway never looks like a checkpoint.

Reading is safe against crafted checkpoints: every reader goes through
:class:`~vectorlm.train.checkpoint_reader.SafeFileSystemReader`, and a checkpoint that holds any entry other than a
tensor is unusable (on resume it is renamed ``step_<N>.invalid`` and the one before it is used; consolidation stops
with the reason). Training writes tensors only.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim import Optimizer

from vectorlm.config import STAGE_CONFIG, read_stage_config, write_stage_config
from vectorlm.run_dir import checkpoint_step
from vectorlm.train.checkpoint_reader import (
    MISSING_FILE,
    CheckpointUnreadable,
    SafeFileSystemReader,
    check_entries,
    read_metadata_file,
)
from vectorlm.train.train_state import TRAIN_STATE, TrainState

log = logging.getLogger(__name__)

RNG_STATE_BYTES = torch.get_rng_state().numel()  # the CPU generator's state, of one size for every rank


def problem_with(path: Path) -> str | None:
    """Why the checkpoint ``path`` is damaged (a partial write, a missing or truncated file, a file that does not parse),
    or None when it is complete and every file it holds reads back: the train state, the DCP metadata and the files it
    names (each long enough), the RNG states of every rank that wrote it, the configuration.

    Raises:
        CheckpointUnreadable: it cannot be read here (refused content, permission or I/O errors, another version).
    """
    try:
        check_entries(path)
        state = TrainState.read(path)
        metadata = read_metadata_file(path / ".metadata")
        recorded = read_stage_config(path)
        if not isinstance(recorded, dict) or "train" not in recorded:
            return f"{STAGE_CONFIG} holds no train settings"
        if state.step != checkpoint_step(path):
            return f"{TRAIN_STATE} is of step {state.step}, the directory of step {checkpoint_step(path)}"
        if not 1 <= state.world_size <= len(list((path / "rng").iterdir())):
            return f"{TRAIN_STATE} says {state.world_size} rank(s) and rng/ holds fewer random number generator states"
        rng = [path / "rng" / f"rank_{rank}.cpu" for rank in range(state.world_size)]
        if bad := [f.relative_to(path) for f in rng if not f.is_file() or f.stat().st_size != RNG_STATE_BYTES]:
            return f"the random number generator states {', '.join(map(str, bad))} are missing or of the wrong size"
    except CheckpointUnreadable:
        raise
    except MISSING_FILE as error:
        return f"{type(error).__name__}: {error}"
    except OSError as error:  # permission, I/O: nothing says the checkpoint is damaged
        raise CheckpointUnreadable(f"{path}: {type(error).__name__}: {error}") from error
    except Exception as error:  # noqa: BLE001 (anything else that does not read back is damage)
        return f"{type(error).__name__}: {error}"
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
    """The checkpoint directories under ``root`` (``step_<N>``: vectorlm/run_dir.py), oldest first."""
    found = [(step, p) for p in root.glob("step_*") if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return sorted(found)


def remove_partial_saves(root: Path) -> None:
    """Removes what saves that did not finish left under ``root`` (:meth:`Checkpointer.save` writes under
    ``.step_<N>.partial`` until the checkpoint is complete)."""
    for partial in root.glob(".step_*.partial"):
        shutil.rmtree(partial)
        log.warning("removed %s, left by a save that did not finish", partial)


def latest_valid_checkpoint(root: Path) -> tuple[Path, TrainState] | None:
    """The newest complete checkpoint under ``root`` and its train state (main process only).

    Newer ones that are damaged are reported and set aside (:func:`set_aside`), so that they are never picked again
    or mistaken for a good one.

    Raises:
        CheckpointUnreadable: the newest checkpoint that is not damaged cannot be read here; nothing is moved.
    """
    for _, path in reversed(list_checkpoints(root)):
        problem = problem_with(path)
        if problem is None:
            return path, TrainState.read(path)
        set_aside(path, problem)
    return None


def set_aside(path: Path, reason: str) -> Path:
    """Renames the damaged checkpoint ``path`` to ``step_<N>.invalid`` (``.invalid-2``, ... when taken: a checkpoint
    set aside is never deleted) and logs why; returns the new name."""
    target, number = path.with_name(f"{path.name}.invalid"), 2
    while target.exists():
        target, number = path.with_name(f"{path.name}.invalid-{number}"), number + 1
    path.rename(target)
    log.warning("checkpoint %s is damaged (%s); set it aside as %s and looking further back", path, reason, target)
    return target


class Checkpointer:
    """Writes checkpoints from every rank, atomically, optionally in the background; keeps only the newest ``keep``.

    A save first copies this rank's shards of the model and optimizer state to CPU memory (page-locked on CUDA, kept
    for the run and reused by every save) and writes its random number generator state; training then continues
    while a background thread writes the copy with DCP (``asynchronous``), or waits for the write. When every rank's
    files are written, the main rank adds the configuration and ``train_state.json`` (last), renames the directory
    into place and prunes old checkpoints, in that background thread too, so that no rank waits on its file work. A
    new save, :meth:`wait` and :meth:`close` first finish the save in flight; a new save fails on every rank when the
    previous one failed on any.
    """

    def __init__(self, *, group: dist.ProcessGroup | None, asynchronous: bool, device: torch.device) -> None:
        self.group, self.asynchronous = group, asynchronous
        self.rank = dist.get_rank()
        options = StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                 use_async_staging=False, use_non_blocking_copy=False)  # fmt: skip
        self._stager = DefaultStager(options) if asynchronous else None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None
        self._failed: str | None = None  # what went wrong with this rank's last save

    def save(
        self,
        path: Path,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        train_state: TrainState,
        settings: dict[str, Any],
        upstream: str | Path,
        keep: int,
        trainable_only: bool = False,
    ) -> float:
        """Starts writing a checkpoint to ``path`` (all ranks); returns the seconds training was held up.

        ``train_state`` is written as it is now; ``settings`` and the configuration recorded beside ``upstream`` (the
        packed data) are saved with it. With ``trainable_only`` (LoRA) the frozen base weights are left out: they
        are read from the base model again.
        """
        start = time.perf_counter()
        self.wait()
        train_state = copy.deepcopy(train_state)  # as it is now, whatever changes while it is written
        partial = path.with_name(f".{path.name}.partial")
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self._check_all_succeeded()  # also the barrier after which every rank may write into the directory
        model_state, optim_state = _state_dicts(model, optimizer, trainable_only)
        # Only tensors go to DCP: its loader unpickles non-tensor entries without weights_only. The optimizer's
        # param_groups hold nothing that the config does not give again.
        state = {"model": model_state, "optim": optim_state["state"]}
        _save_rng(partial / "rng", self.rank)
        if self.asynchronous:
            upload = dcp.async_save(state, checkpoint_id=str(partial), process_group=self.group,
                                    async_stager=self._stager)  # fmt: skip
        else:
            dcp.save(state, checkpoint_id=str(partial), process_group=self.group)
            upload = None

        def finish() -> None:
            try:
                if upload is not None:
                    upload.result()
                if self.rank == 0:  # DCP's save returns on the main rank after every rank's files are written
                    write_stage_config(partial, settings, upstream=upstream)
                    train_state.write(partial)  # last: a checkpoint without it is incomplete
                    _sync_directories(partial / "rng", partial)
                    shutil.rmtree(path, ignore_errors=True)
                    partial.rename(path)
                    _sync_directories(path.parent, path.parent.parent)  # the rename (and a new checkpoints/) survive
                    _prune(path.parent, keep=keep)
            # DCP's CheckpointException is no Exception: without it here, a failed write would escape unrecorded.
            except (Exception, CheckpointException) as error:  # noqa: BLE001 (every rank fails at the next save)
                self._failed = f"{type(error).__name__}: {error}"
                log.error("checkpoint %s failed on rank %d: %s", path, self.rank, self._failed)
                return
            log.info("saved checkpoint %s in %.2f s%s", path, time.perf_counter() - start,
                     f" ({_size(path) / 1e6:.1f} MB)" if self.rank == 0 else "")  # fmt: skip

        self._pending = self._finisher.submit(finish)
        if not self.asynchronous:
            self.wait()
        return time.perf_counter() - start

    def wait(self) -> None:
        """Blocks until this rank's part of the save in flight, if any, is done (failures are logged and recorded)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _check_all_succeeded(self) -> None:
        """Agrees with every rank (a collective) that the last save succeeded everywhere; raises on all if not."""
        failed = torch.tensor([self._failed is not None], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failed.item():
            raise RuntimeError(f"the previous checkpoint failed ({self._failed or 'on another rank'}); see the log")

    def close(self, *, agree: bool = True) -> None:
        """Finishes this rank's part of the save in flight, then frees the staging memory.

        With ``agree`` (a collective: every rank must call it), raises on every rank when the last save failed on
        any. Without it (when training is already failing, perhaps on this rank alone), only waits.
        """
        try:
            self.wait()
            if agree:
                self._check_all_succeeded()
        finally:
            self._finisher.shutdown()
            if self._stager is not None:
                self._stager.close()


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: Optimizer,
    restore_rng: bool,
    trainable_only: bool = False,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Loads model and optimizer state (resharded to this run's ranks) and, if asked, this rank's RNG state."""
    start = time.perf_counter()
    options = _options(trainable_only)
    model_state, optim_state = _state_dicts(model, optimizer, trainable_only)
    dcp.load({"model": model_state, "optim": optim_state["state"]}, storage_reader=SafeFileSystemReader(str(path)),
             process_group=group)  # fmt: skip
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)
    if restore_rng:
        _load_rng(path / "rng", dist.get_rank())
    return time.perf_counter() - start


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _state_dicts(model: nn.Module, optimizer: Optimizer, trainable_only: bool) -> tuple[dict, dict]:
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    if trainable_only:  # torch keeps a frozen weight's second name (a tied LM head: 3.7 GB of fp32 at Gemma-2-9B)
        frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name not in frozen}
    return model_state, optim_state


def archive_checkpoints(root: Path) -> Path:
    """Moves every checkpoint under ``root`` to ``root/archive/<time>/`` and returns that directory."""
    target = root / "archive" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for _, path in list_checkpoints(root):
        path.rename(target / path.name)
    return target


def _save_rng(directory: Path, rank: int) -> None:
    directory.mkdir(exist_ok=True)
    _write_durably(directory / f"rank_{rank}.cpu", torch.get_rng_state().numpy().tobytes())
    if torch.cuda.is_available():
        _write_durably(directory / f"rank_{rank}.cuda", torch.cuda.get_rng_state().numpy().tobytes())


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directories(*directories: Path) -> None:
    """Flushes the directories' entries (files created or renamed in them) to the disk."""
    for directory in directories:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _load_rng(directory: Path, rank: int) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray((directory / f"rank_{rank}.cpu").read_bytes()), dtype=torch.uint8))
    cuda = directory / f"rank_{rank}.cuda"
    if torch.cuda.is_available() and cuda.is_file():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(cuda.read_bytes()), dtype=torch.uint8))


def _prune(root: Path, *, keep: int) -> None:
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
        log.info("removed old checkpoint %s (train.keep_checkpoints=%d)", old, keep)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
