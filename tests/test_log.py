"""Progress of long work: a bar on a terminal, log lines with rate and time left elsewhere (SLURM output files)."""

from __future__ import annotations

import logging

import pytest

from vectorlm.log import Progress, format_duration


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (45, "45s"), (192, "3m12s"), (7500, "2h05m")])
def test_durations_read_as_people_say_them(seconds, text):
    assert format_duration(seconds) == text


def test_without_a_terminal_progress_is_logged_with_rate_and_time_left(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="vectorlm"):
        progress = Progress(1000, desc="tokenize corpus.jsonl", unit="rows", every=0)
        progress.update(250)
        progress.update(750)  # done: the final line says so, not another progress line
        progress.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("tokenize corpus.jsonl: 250/1,000 rows (25%), ")
    assert " rows/s, " in lines[0] and lines[0].endswith(" left")
    assert lines[1].startswith("tokenize corpus.jsonl: 1,000 rows in ") and lines[1].endswith(" rows/s)")
