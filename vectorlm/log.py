"""Logging set-up shared by the stages: one format, rank-aware, to stderr and optionally a file."""

from __future__ import annotations

import logging
import sys
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
