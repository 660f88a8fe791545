"""The launcher: ranks never outlive it, one training per experiment at a time, and the ranks' own error is the job's."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.test_resume import RUN, start_job, wait_for_step
from vectorlm.train.launch import job_error, rank_errors
from vectorlm.train.run_lock import run_lock


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ranks_die_with_their_launcher_and_one_training_of_a_run_at_a_time(tmp_path, tiny_model_dir, packed_dir,
                                                                          caplog):  # fmt: skip
    """Before, ranks whose launcher was SIGKILLed (the OOM killer) trained on unsupervised, and a rerun would have
    raced them over the same checkpoints."""
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **{**RUN, "max_steps": 100_000})  # ends only if killed
    wait_for_step(tmp_path, 2, process)
    ranks = children(process.pid)
    assert len(ranks) == 2
    second = subprocess.run(
        [sys.executable, "-m", "vectorlm.train.launch", str(tmp_path / "train" / "job.yaml"), "--ranks", "1", "--log",
         str(tmp_path / "second.log")], check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode != 0
    assert f"another training of this experiment is running (pid {process.pid} on" in second.stderr
    assert all(alive(rank) for rank in ranks)
    os.kill(process.pid, signal.SIGKILL)  # the launcher alone
    process.wait()
    deadline = time.monotonic() + 10
    while any(alive(rank) for rank in ranks):
        assert time.monotonic() < deadline, "ranks outlived their launcher"
        time.sleep(0.1)
    assert not (tmp_path / "train" / "summary.json").exists()
    with caplog.at_level(logging.WARNING, logger="vectorlm"), run_lock(tmp_path / "train" / ".lock"):
        pass  # what the next training of this run does first
    assert f"from a training that is gone (pid {process.pid} on" in caplog.text


def test_the_job_s_error_is_the_rank_s_own():
    output = [
        "12:00:01 [rank 1] WARNING something",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: the first problem",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "x.py", line 3, in <module>',
        "vectorlm.config_schema.ConfigError: refusing to resume from step_4",
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "x.py", line 3, in <module>',
        "[rank1]: vectorlm.config_schema.ConfigError: refusing to resume from step_4",
    ]
    assert rank_errors(output) == ["ValueError: the first problem",
                                   "vectorlm.config_schema.ConfigError: refusing to resume from step_4"]  # fmt: skip
    assert job_error(output) == "vectorlm.config_schema.ConfigError: refusing to resume from step_4"
    peer = [
        "[rank0]: Traceback (most recent call last):",
        '[rank0]:   File "y.py", line 9, in <module>',
        "[rank0]: RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer",
    ]
    assert job_error(output + peer) == "vectorlm.config_schema.ConfigError: refusing to resume from step_4"
    assert job_error(peer) == peer[-1].removeprefix("[rank0]: ")  # nothing else: say what there is
    assert job_error([]) == "no error message in the ranks' output"


@pytest.mark.parametrize("signal_to_send", [signal.SIGTERM])
def test_an_interrupted_run_ends_saying_so_and_how_to_continue(tmp_path, tiny_model_dir, packed_dir, signal_to_send):
    process = start_job(tmp_path, tiny_model_dir, packed_dir, **RUN)
    wait_for_step(tmp_path, 2, process)
    os.killpg(process.pid, signal_to_send)
    process.wait(timeout=120)
    last = (tmp_path / "train.log").read_text().strip().splitlines()[-1]
    assert "training was interrupted by a stop signal" in last and "rerun the same command to continue it" in last
