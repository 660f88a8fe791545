"""Starting the ranks of a training job: the one place that decides how processes are launched.

Locally, :func:`run_local_ranks` starts one ``python -m vectorlm.train`` process per rank with the environment
torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). It is not torchrun because torchrun answers
SIGTERM by killing its workers after 30 seconds, whereas a rank told to stop must be allowed to finish its step and
write a checkpoint, however long that takes. The launcher forwards stop signals to every rank, streams their output
to the log and stderr, and when one rank fails it stops the others rather than leaving them blocked in a collective.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vectorlm.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS
from vectorlm.train import TrainJob

log = logging.getLogger(__name__)

FAILURE_GRACE_SECONDS = 10


class Preempted(RuntimeError):
    """The ranks stopped on a signal after saving a checkpoint; rerunning continues the run."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_ranks(command: list[str], *, num_processes: int, env: dict[str, str], output: Callable[[str], None]) -> int:
    """Runs ``command`` as ranks 0..num_processes-1 of one process group on this machine.

    Returns 0 when every rank succeeded, 75 when they stopped on a signal with a checkpoint, else the first failing
    rank's status (128 + N for a rank killed by signal N).
    """
    common = {**env, "WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    read_end, write_end = os.pipe()
    ranks = [
        subprocess.Popen(command, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=write_end,
                         stderr=write_end)  # fmt: skip
        for r in range(num_processes)
    ]
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, errors="replace") as lines:
            for line in lines:
                output(line)

    reader = threading.Thread(target=pump)
    reader.start()

    # Forwarded as SIGTERM: ranks in this process group also receive a terminal's Ctrl-C directly, and a second
    # SIGINT would tell them to abort at once instead of checkpointing.
    def forward(signum, frame):
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        statuses = _wait(ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reader.join()
    if all(s == 0 for s in statuses):
        return 0
    if all(s in (0, PREEMPTED_EXIT_CODE) for s in statuses):
        return PREEMPTED_EXIT_CODE
    return next(s for s in statuses if s not in (0, PREEMPTED_EXIT_CODE))


def _wait(ranks: list[subprocess.Popen]) -> list[int]:
    failed_at = None
    while any(rank.poll() is None for rank in ranks):
        failed = [r for r in ranks if r.returncode not in (None, 0, PREEMPTED_EXIT_CODE)]
        if failed and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_SECONDS:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
        time.sleep(0.1)
    return [r.returncode if r.returncode >= 0 else 128 - r.returncode for r in ranks]


def launch_training(job: TrainJob, *, num_processes: int, threads: int, log_path: str | Path) -> None:
    """Writes ``job`` next to its outputs and runs it on ``num_processes`` ranks sharing ``threads`` CPU threads.

    Raises:
        ConfigError: when the global batch cannot be split over ``num_processes`` ranks (before any rank starts).
        Preempted: when the ranks stopped on a signal after checkpointing.
        RuntimeError: when the ranks fail, naming the exit status and the log to read.
    """
    job.train.grad_accumulation_steps(num_processes)
    job_file = Path(job.output_dir) / "train" / "job.yaml"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job.save(job_file)
    command = [sys.executable, "-m", "vectorlm.train", str(job_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // num_processes))}
    log.info("launching %d rank(s): %s", num_processes, " ".join(command))
    with open(log_path, "a") as log_file:

        def output(line: str) -> None:
            log_file.write(line)
            log_file.flush()
            sys.stderr.write(line)

        status = run_local_ranks(command, num_processes=num_processes, env=env, output=output)
    if status == PREEMPTED_EXIT_CODE:
        raise Preempted(f"training stopped on a signal after saving a checkpoint; rerun to continue (see {log_path})")
    if status != 0:
        raise RuntimeError(f"training exited with status {status}; see {log_path}")


def main(argv: list[str] | None = None) -> None:
    """``python -m vectorlm.launch JOB.yaml --ranks N --log PATH``: a training job outside Snakemake."""
    import argparse

    from vectorlm.log import setup_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("job", help="training job YAML (the train rule writes one to {output_dir}/train/job.yaml)")
    parser.add_argument("--ranks", type=int, default=1, help="number of local ranks")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--log", required=True, help="file the ranks' output is appended to")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        launch_training(TrainJob.load(args.job), num_processes=args.ranks, threads=args.threads, log_path=args.log)
    except Preempted as stopped:
        log.warning("%s", stopped)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
