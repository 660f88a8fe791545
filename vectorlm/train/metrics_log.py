"""Training's metric records: ``train/metrics.jsonl``, one JSON object per logged step and per evaluation, written by
the main rank and read by the report, ``compare`` and resumed runs; every step once, also across resumes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class MetricsLog:
    """One JSON object per line in ``path``, written by the main rank only; ``fresh`` starts the file anew.

    A resumed run redoes the steps after its checkpoint. When it computes them as the interrupted attempt did (the
    same settings and number of ranks), their records, written by the attempt that first reached them, are kept and
    not written again, so every step is recorded once and trackers that cannot take a point back (W&B, MLflow) agree
    with the file. Otherwise ``truncate_after`` (the checkpoint's step) drops them: they are written anew, and the
    trackers start new runs. A last line cut off by a kill is dropped.
    """

    def __init__(
        self, path: str | Path, *, enabled: bool, fresh: bool = False, truncate_after: int | None = None
    ) -> None:
        self.path, self.enabled = Path(path), enabled
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        self._written: set[tuple[int, bool]] = set()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            records = read_metrics(self.path)
            if truncate_after is not None:
                records = [record for record in records if record["step"] <= truncate_after]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in records))
            self._written = {_key(record) for record in records}

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` and passes it to the sinks, unless a record of its step and kind is already there."""
        if not self.enabled or _key(record) in self._written:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._written.add(_key(record))
        for sink in self.sinks:
            sink(record)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (a last line still being written, or cut off by a kill, is left out)."""
    if not Path(path).is_file():
        return []
    text = Path(path).read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


def _key(record: dict[str, Any]) -> tuple[int, bool]:
    """A record is a step's training metrics or its evaluation."""
    return record["step"], "eval_loss" in record
