"""Deciding how a training run starts: fresh, resumed from the newest valid checkpoint, or already finished.

Rules (also in docs/config.md, "Resuming"):

- An interrupted run (its newest checkpoint is not final) resumes when the model, the packed data (which covers
  ``max_seq_len`` and the data settings) and ``train.seed`` (the data order) are unchanged. Any other setting may
  change, e.g. ``train.lr`` or ``train.max_steps``; the log lists what changed. Otherwise it refuses.
- A finished run (its newest checkpoint is the final one) with the same settings is done: nothing is trained again.
  With a higher ``train.max_steps`` and otherwise the same settings it continues training. With any other change it
  is a new experiment in the same ``output_dir``: the old checkpoints move to ``checkpoints/archive/<time>/`` and
  training starts anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vectorlm.config import ConfigError, TrainConfig, to_plain
from vectorlm.config_schema import OPERATIONAL_KEYS, keys_marked
from vectorlm.file_digests import FileDigests, model_digests
from vectorlm.packed import STATS_FILE
from vectorlm.train.checkpoint import archive_checkpoints, latest_valid_checkpoint, remove_partial_saves
from vectorlm.train.train_state import TrainState

log = logging.getLogger(__name__)

# The train settings that do not change what the steps compute (the schema's x-resume and x-reruns say which): how
# often to look (observation) and how to run (operational); with how long to train (length), those a finished run
# may change and still be the same run.
FREE_ON_RESUME = set(keys_marked("x-resume", "observation")["train"]) | set(OPERATIONAL_KEYS["train"])
SCHEDULE_ONLY = FREE_ON_RESUME | set(keys_marked("x-resume", "length")["train"])


def repeats_exactly(state: TrainState, *, train: dict[str, Any], world_size: int) -> bool:
    """Whether a run resumed from the checkpoint with train state ``state`` computes the steps after it as the
    interrupted attempt did: the same number of ranks (random number generators restored) and the same settings but
    for those that only say how often to look or how to run (a new ``max_steps`` reshapes the schedule)."""
    recorded = recorded_train(state)
    return state.world_size == world_size and all(
        recorded.get(k) == v for k, v in train.items() if k not in FREE_ON_RESUME
    )


def recorded_train(state: TrainState) -> dict[str, Any]:
    """The train settings ``state`` recorded, a key it lacks (one added since, such as ``objective``) read as its
    default: what the run computed with then."""
    return {**to_plain(TrainConfig()), **state.train}


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none can be resumed: training does not start from the base model on its own then."""


@dataclass(frozen=True)
class StartPlan:
    action: str  # "fresh", "resume" or "done"
    checkpoint: str | None = None
    state: TrainState | None = None


def run_fingerprint(*, model_dir: str | Path, packed_dir: str | Path, seed: int, lora=None) -> dict[str, Any]:
    """What must not change for a checkpoint to be resumed: the model's architecture and weights (the same digest of
    them as the workflow's, vectorlm/file_digests.py: an adapter trained on one base must not be merged into
    another), the packed data, the seed, and the LoRA adapters' shape (or their absence)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for volatile in ("transformers_version", "use_cache", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    stats = json.loads((Path(packed_dir) / STATS_FILE).read_text())
    if "fingerprint" not in stats:
        raise ValueError(f"{packed_dir} was packed by an older version; repack it (snakemake --forcerun pack)")
    return {
        "model_config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        "model_weights": model_digests(FileDigests(), model_dir)["weights"],
        "data": stats["fingerprint"],
        "max_seq_len": stats["max_seq_len"],
        "seed": seed,
        "lora": to_plain(lora) if lora is not None and lora.enabled else None,
    }


def plan_start(root: Path, *, fingerprint: dict[str, Any], train: dict[str, Any], max_steps: int) -> StartPlan:
    """Looks at the checkpoints under ``root`` and decides how to start (main process only; may move files).

    Raises:
        NoUsableCheckpoint: checkpoints exist (or were set aside as damaged), but none can be resumed.
        CheckpointUnreadable: the newest checkpoint that is not damaged cannot be read here.
        ConfigError: an interrupted run whose data, model, seed or LoRA settings changed since.
    """
    remove_partial_saves(root)
    found = latest_valid_checkpoint(root)
    if found is None:
        set_aside = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        if set_aside:
            raise NoUsableCheckpoint(
                f"{root} holds checkpoints but none can be resumed (damaged, set aside: {', '.join(set_aside)}; the "
                f"reasons are in the log). Training does not start from the base model on its own while checkpoints "
                f"exist: to train anew, move them away (mv {root} {root}.old), or put back one you trust."
            )
        return StartPlan("fresh")
    path, state = found
    # A checkpoint without these records (written before they existed) counts as a finished run with other settings.
    old_fingerprint, old_train = state.fingerprint, recorded_train(state)
    # What checkpoints of earlier versions of vectorlm did not record (model_weights) is not held against them.
    unrecorded = [k for k in fingerprint if old_fingerprint and k not in old_fingerprint]
    if unrecorded:
        log.info("%s records no %s (written by an earlier version): not compared", path, ", ".join(unrecorded))
    mismatched = [k for k, v in fingerprint.items() if old_fingerprint.get(k) != v and k not in unrecorded]
    changed = {k: (old_train.get(k), v) for k, v in train.items() if old_train.get(k) != v}
    described = ", ".join(f"train.{k} {old} -> {new}" for k, (old, new) in changed.items())
    if state.final:
        if mismatched or set(changed) - SCHEDULE_ONLY or state.step > max_steps:
            archive = archive_checkpoints(root)
            why = ", ".join(mismatched) + (", " if mismatched and described else "") + described
            if not state.fingerprint:
                why = "written by an older version of vectorlm"
            log.warning("%s is a finished run with other settings (%s); moved its checkpoints to %s and training "
                        "anew", root, why or f"train.max_steps below {state.step}", archive)  # fmt: skip
            return StartPlan("fresh")
        if state.step == max_steps:
            return StartPlan("done", str(path), state)
        log.info("continuing the finished run %s from step %d to train.max_steps %d", path, state.step, max_steps)
        return StartPlan("resume", str(path), state)
    if mismatched:
        details = "; ".join(f"{k}: {old_fingerprint.get(k)} -> {fingerprint[k]}" for k in mismatched)
        raise ConfigError(
            f"refusing to resume from {path}: the run was interrupted, and since then {', '.join(mismatched)} "
            f"changed ({details}). Restore the settings to continue it, or remove {root} (or choose another "
            "output_dir) to train anew."
        )
    if state.step >= max_steps:
        raise ConfigError(f"refusing to resume from {path}: its step {state.step} is not below train.max_steps "
                          f"({max_steps}); raise train.max_steps or remove {root}")  # fmt: skip
    log.info(
        "resuming from %s (step %d)%s", path, state.step, f" with changed settings: {described}" if changed else ""
    )
    return StartPlan("resume", str(path), state)
