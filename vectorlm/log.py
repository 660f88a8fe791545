"""Logging set-up shared by the stages: one format, rank-aware, to stderr and optionally a file."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def setup_logging(*, rank: int | None = None, path: str | Path | None = None) -> None:
    """Logs INFO and up (only WARNING and up on ranks other than 0) to stderr and to ``path`` if given."""
    where = f" [rank {rank}]" if rank is not None else ""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=logging.INFO if not rank else logging.WARNING,
        format=f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


@contextmanager
def logged_stage(name: str, path: str | Path) -> Iterator[None]:
    """Runs a workflow stage with logging to ``path``; a failure is written there too before it propagates."""
    setup_logging(path=path)
    try:
        yield
    except Exception as error:
        logging.getLogger("vectorlm").error("%s failed: %s: %s", name, type(error).__name__, error)
        raise


def format_duration(seconds: float) -> str:
    """``seconds`` as people read a remaining time: 45s, 3m12s, 2h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of a long loop over ``total`` units: a bar on a terminal; elsewhere (SLURM output files, logs) a log
    line every ``every`` seconds with the count, the rate and the time left, and one at the end."""

    def __init__(self, total: int, *, desc: str, unit: str, every: float = 30.0) -> None:
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=2) if sys.stderr.isatty() else None
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logging.getLogger("vectorlm").info(
                "%s: %s/%s %s (%.0f%%), %s %s/s, %s left", self.desc, f"{self.done:,}", f"{self.total:,}", self.unit,
                100 * self.done / max(self.total, 1), f"{rate:,.0f}", self.unit,
                format_duration((self.total - self.done) / max(rate, 1e-9)),
            )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            return
        seconds = time.monotonic() - self.start
        logging.getLogger("vectorlm").info("%s: %s %s in %s (%s %s/s)", self.desc, f"{self.done:,}", self.unit,
                                           format_duration(seconds), f"{self.done / max(seconds, 1e-9):,.0f}",
                                           self.unit)  # fmt: skip
