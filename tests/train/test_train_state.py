"""A checkpoint's train_state.json: one typed record, written and read in one place, versioned."""

from __future__ import annotations

import json

import pytest

from vectorlm.data.loader import DataPosition
from vectorlm.train.checkpoint_reader import CheckpointUnreadable
from vectorlm.train.train_state import TRAIN_STATE, VERSION, TrainState, TrainStateError

STATE = TrainState(step=12, world_size=2, data=DataPosition(1, 16), eval_losses={0: 6.25, 12: 3.5}, final=False,
                   fingerprint={"seed": 0}, train={"lr": 0.001}, skipped_steps=1,
                   tracking={"wandb": "abc"})  # fmt: skip


def test_a_record_reads_back_as_it_was_written(tmp_path):
    STATE.write(tmp_path)
    assert TrainState.read(tmp_path) == STATE
    written = json.loads((tmp_path / TRAIN_STATE).read_text())
    assert written["version"] == VERSION and written["data"] == {"epoch": 1, "offset": 16}
    assert written["eval_losses"] == {"0": 6.25, "12": 3.5}  # JSON keys, read back as steps


def test_a_record_of_before_versions_reads_with_the_defaults_of_its_time(tmp_path):
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"step": 8, "world_size": 1, "data": {"epoch": 0, "offset": 64},
                                                    "eval_losses": {"0": 6.0, "8": 4.0}}))  # fmt: skip
    state = TrainState.read(tmp_path)
    assert (state.version, state.final, state.fingerprint, state.skipped_steps, state.summary) == (0, True, {}, 0, None)
    assert state.eval_losses == {0: 6.0, 8: 4.0} and state.data == DataPosition(0, 64)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "FileNotFoundError"),
        ("{", "JSONDecodeError"),
        ("[]", "holds no JSON object"),
        (json.dumps({"world_size": 1, "data": {}, "eval_losses": {}}), "has no step"),
        (json.dumps({"step": 3, "world_size": 1, "eval_losses": {}}), "has no data"),
        (json.dumps({"step": 3, "world_size": 1, "data": {"epoch": 0}, "eval_losses": {}}), "no data position"),
        (json.dumps({"step": "3", "world_size": 1, "data": {}, "eval_losses": {}}), "step is '3', not int"),
        (json.dumps({**json.loads(STATE.to_json()), "final": "yes"}), "final is 'yes', not bool"),
        (json.dumps({**json.loads(STATE.to_json()), "fingerprint": ["seed"]}), r"fingerprint is \['seed'\], not dict"),
        (json.dumps({**json.loads(STATE.to_json()), "skipped_steps": True}), "skipped_steps is True, not int"),
        (json.dumps({**json.loads(STATE.to_json()), "summary": "done"}), "summary is 'done', not dict"),
    ],
)
def test_a_record_that_cannot_be_read_says_why(tmp_path, content, message):
    if content is not None:
        (tmp_path / TRAIN_STATE).write_text(content)
    with pytest.raises(TrainStateError, match=message):
        TrainState.read(tmp_path)


def test_a_record_of_a_newer_version_cannot_be_read_here_which_is_not_damage(tmp_path):
    """A newer vectorlm wrote it: the run stops (the checkpoint is not set aside as damaged)."""
    (tmp_path / TRAIN_STATE).write_text(json.dumps({"version": VERSION + 1, "step": 3}))
    with pytest.raises(CheckpointUnreadable, match=f"of version {VERSION + 1}; this vectorlm reads") as raised:
        TrainState.read(tmp_path)
    assert not isinstance(raised.value, TrainStateError)
