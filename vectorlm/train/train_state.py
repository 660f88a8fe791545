"""A checkpoint's ``train_state.json``: where training stood when the checkpoint was saved.

A typed, versioned record with one writer (:meth:`TrainState.write`, which the checkpoint writer calls last, after
every tensor is on disk) and one reader (:meth:`TrainState.read`, for resume planning, restoring and the check of a
checkpoint's files). Records written before it had a version (version 0) are read with the defaults those versions
implied.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vectorlm.data.loader import DataPosition
from vectorlm.train.checkpoint_reader import MISSING_FILE, CheckpointUnreadable

TRAIN_STATE = "train_state.json"
VERSION = 1


# What each field must be, for a record to be read at all: a damaged record is set aside like a damaged checkpoint,
# instead of failing resume planning on every attempt.
_FIELD_TYPES = {"step": int, "world_size": int, "data": dict, "eval_losses": dict, "final": bool, "fingerprint": dict,
                "train": dict, "skipped_steps": int, "tracking": dict, "summary": dict}  # fmt: skip
_REQUIRED = ("step", "world_size", "data", "eval_losses")


class TrainStateError(ValueError):
    """A damaged ``train_state.json``: missing, not JSON, or without a field training needs."""


@dataclass(frozen=True)
class TrainState:
    step: int  # the last optimizer step the checkpoint covers
    world_size: int  # ranks that wrote it
    data: DataPosition  # the position in the global order of rows after ``step``
    eval_losses: dict[int, float]  # every evaluation so far, by step
    final: bool = True  # saved at the end of the run (train.max_steps), not at an interval or on a signal
    fingerprint: dict[str, Any] = field(default_factory=dict)  # what must not change to resume (train/resume.py)
    train: dict[str, Any] = field(default_factory=dict)  # the train settings it ran with
    skipped_steps: int = 0  # steps skipped for a non-finite gradient norm, in the whole run so far
    tracking: dict[str, str] = field(default_factory=dict)  # {tracker: the run id to continue}
    summary: dict[str, Any] | None = None  # the finished run's summary (in a final checkpoint)
    version: int = VERSION

    def to_json(self) -> str:
        record = asdict(self)
        record["eval_losses"] = {str(step): loss for step, loss in self.eval_losses.items()}
        return json.dumps(record, indent=2) + "\n"

    def write(self, directory: Path) -> None:
        """Writes the record into the checkpoint ``directory`` and flushes it to the disk."""
        with open(directory / TRAIN_STATE, "w") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        """The record of the checkpoint ``directory``.

        Raises:
            TrainStateError: naming what is wrong with it (the checkpoint is damaged).
            CheckpointUnreadable: a version this code does not read, or a file it may not read or cannot (permission,
                I/O).
        """
        path = directory / TRAIN_STATE
        try:
            text = path.read_bytes()
        except MISSING_FILE as error:
            raise TrainStateError(f"{path}: {type(error).__name__}: {error}") from error
        except OSError as error:
            raise CheckpointUnreadable(f"{path}: {type(error).__name__}: {error}") from error
        try:
            record = json.loads(text)
        except ValueError as error:
            raise TrainStateError(f"{path}: {type(error).__name__}: {error}") from error
        if not isinstance(record, dict):
            raise TrainStateError(f"{path} holds no JSON object")
        version = record.get("version", 0)
        if version not in (0, VERSION):
            raise CheckpointUnreadable(f"{path} is of version {version}; this vectorlm reads versions 0 to {VERSION}: "
                                       "resume it with the vectorlm that wrote it")  # fmt: skip
        for name, kind in _FIELD_TYPES.items():  # required first; the others may be left out, never of another type
            if name in _REQUIRED and name not in record:
                raise TrainStateError(f"{path} has no {name}")
            value = record.get(name)
            if name in record and not (_is_a(value, kind) or name == "summary" and value is None):
                raise TrainStateError(f"{path}: {name} is {value!r}, not {kind.__name__}")
        try:
            position = DataPosition(int(record["data"]["epoch"]), int(record["data"]["offset"]))
            losses = {int(step): float(loss) for step, loss in record["eval_losses"].items()}
        except (KeyError, TypeError, ValueError) as error:
            raise TrainStateError(
                f"{path}: no data position or eval losses ({type(error).__name__}: {error})"
            ) from error
        known = {name: record[name] for name in cls.__dataclass_fields__ if name in record}
        return cls(**{**known, "data": position, "eval_losses": losses, "version": version})


def _is_a(value: Any, kind: type) -> bool:
    """Whether ``value`` is a ``kind`` as JSON holds it (true and false are no integers here)."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
