"""One training at a time per experiment: the launcher holds an exclusive lock on its run directory while its ranks
run, so that two trainings of one experiment (a rerun while an earlier one still runs, two Snakemake processes) can
never write the same checkpoints. The lock is the operating system's (``fcntl.lockf``, which shared filesystems with
POSIX locks honour across nodes): it goes with its holder, so a lock whose holder died is free, and taking it over is
logged. The file also says who holds it, for the message that refuses a second training.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class RunLocked(RuntimeError):
    """Another training of the same experiment holds its run directory."""


@contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Holds the exclusive lock file ``path`` for the duration of the block.

    Raises:
        RunLocked: another process holds it, naming the process, its host and since when.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK: a filesystem without locks
                log.warning("cannot lock %s (%s): nothing keeps a second training of this experiment out", path, error)
                yield
                return
            raise RunLocked(f"another training of this experiment is running ({_holder(descriptor)}; lock {path}): "
                            "two trainings would write the same checkpoints. Wait for it, or stop it.") from None  # fmt: skip
        earlier = _holder(descriptor)
        if earlier != "unknown":
            log.warning("taking over the lock %s from a training that is gone (%s)", path, earlier)
        os.ftruncate(descriptor, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(descriptor, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)  # released: no holder to report
    finally:
        os.close(descriptor)


def _holder(descriptor: int) -> str:
    try:
        record = json.loads(os.pread(descriptor, 4096, 0) or b"null")
        return f"pid {record['pid']} on {record['host']} since {record['since']}"
    except (ValueError, TypeError, KeyError):
        return "unknown"
