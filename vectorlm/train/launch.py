"""Starting the ranks of a training job: the one place that decides how processes are launched.

Inside a SLURM allocation (the train rule's batch job, or an ``salloc`` shell) the ranks are one ``srun`` step that
spans the allocated nodes, one task per GPU; each rank takes its torch.distributed settings from SLURM's variables
(see :func:`vectorlm.train.distributed.init_distributed`), so there is no rendezvous across nodes.

Elsewhere, :func:`local_rank_commands` gives one ``python -m vectorlm.train.rank`` process per rank with the environment
torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). It is not torchrun because torchrun answers
SIGTERM by killing its workers after 30 seconds, whereas a rank told to stop must be allowed to finish its step and
write a checkpoint, however long that takes.

Either way the launcher forwards stop signals to the ranks, streams their output to the log and stderr, and when one
rank fails the others are stopped rather than left blocked in a collective; its error is the job's. Local ranks die
with the launcher (vectorlm/train/rank.py), and the launcher holds the experiment's lock while they run
(vectorlm/train/run_lock.py): ranks never train unsupervised, and never two trainings of one experiment at once.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from vectorlm.config import ConfigError
from vectorlm.train import rank as rank_module
from vectorlm.train.checkpoint import list_checkpoints
from vectorlm.train.job import TrainJob, check_job
from vectorlm.train.placement import Placement
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE, STOP_SIGNALS
from vectorlm.train.run_lock import run_lock

log = logging.getLogger(__name__)

FAILURE_GRACE_SECONDS = 10
# How long srun lets the other ranks finish once one has exited, whatever its status, before it kills them. Not
# --kill-on-bad-exit: ranks that stop on a signal exit with status 75 one after another (each tears down its process
# groups and threads), and srun would kill the slower ones halfway, turning "preempted" into "killed".
SRUN_EXIT_WAIT_SECONDS = 60


class Preempted(RuntimeError):
    """The ranks stopped on a signal after saving a checkpoint; rerunning continues the run."""


def in_slurm_allocation() -> bool:
    """True in a SLURM job's batch script or an salloc shell, where ``srun`` starts tasks; False inside a step."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" not in os.environ


def srun_command(command: list[str], placement: Placement) -> list[str]:
    return [
        "srun", f"--nodes={placement.nodes}", f"--ntasks={placement.ranks}",
        f"--ntasks-per-node={placement.ranks_per_node}", f"--cpus-per-task={placement.cpus_per_rank}",
        "--kill-on-bad-exit=0", f"--wait={SRUN_EXIT_WAIT_SECONDS}", *command,
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: list[tuple[list[str], dict[str, str]]], *, output: Callable[[str], None]) -> int:
    """Runs the (command, environment) pairs together, as the ranks of one job.

    Returns 0 when every process succeeded, 75 when they stopped on a signal with a checkpoint, else the first failing
    process's status (128 + N for one killed by signal N).
    """
    read_end, write_end = os.pipe()
    ranks = [subprocess.Popen(command, env=env, stdout=write_end, stderr=write_end) for command, env in commands]
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


def local_rank_commands(command: list[str], placement: Placement, env: dict[str, str]) -> list[tuple[list[str], dict]]:
    """One process per rank on this machine; ``placement.nodes`` > 1 simulates nodes (for testing hybrid sharding)."""
    common = {**env, "WORLD_SIZE": str(placement.ranks), "LOCAL_WORLD_SIZE": str(placement.ranks_per_node),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
              rank_module.LAUNCHER_PID: str(os.getpid())}  # fmt: skip
    return [
        (command, {**common, "RANK": str(r), "LOCAL_RANK": str(r % placement.ranks_per_node)})
        for r in range(placement.ranks)
    ]


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


def launch_training(job: TrainJob, *, placement: Placement, log_path: str | Path) -> None:
    """Writes ``job`` next to its outputs and runs its ranks: one srun step inside a SLURM allocation, else local
    processes. What can be checked of the job before any rank starts is :func:`~vectorlm.train.job.check_job`'s.

    Raises:
        ConfigError: when the global batch cannot be split over the ranks, or nodes are asked for outside SLURM with a
            GPU (before any rank starts).
        Preempted: when the ranks stopped on a signal after checkpointing.
        RuntimeError: when the ranks fail, naming the exit status and the log to read.
    """
    job.train.grad_accumulation_steps(placement.ranks)
    with run_lock(job.run.lock):
        status, tail = _run_ranks(job, placement, log_path)
    if status == PREEMPTED_EXIT_CODE:
        saved = list_checkpoints(job.run.checkpoints)
        where = f" of step {saved[-1][0]}" if saved else ""
        raise Preempted(f"training was interrupted by a stop signal (SIGTERM, SIGUSR1 or Ctrl-C) after saving a "
                        f"checkpoint{where}; rerun the same command to continue it (see {log_path})")  # fmt: skip
    if status != 0:
        cause = job_error(tail)
        raise RuntimeError(f"training failed: {cause} (exit status {status}; the ranks' output is in {log_path})")


def _run_ranks(job: TrainJob, placement: Placement, log_path: str | Path) -> tuple[int, list[str]]:
    """Writes the job file and runs the ranks; returns their status and the last lines of their output."""
    job_file = job.run.job
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job.save(job_file)
    # By import, not by name: the stage's code digest (vectorlm/pipeline/fingerprint.py) follows imports, and the
    # ranks' code is what reruns training when it changes.
    return run_ranks(rank_module.__name__, job_file, placement=placement, log_path=log_path)


def run_ranks(module: str, job_file: Path, *, placement: Placement, log_path: str | Path) -> tuple[int, list[str]]:
    """Runs ``python -m module job_file`` on every rank (one srun step in a SLURM allocation, else local processes
    that die with this one); returns their status and the last lines of their output, which go to ``log_path`` and
    stderr as they come."""
    command = [sys.executable, "-m", module, str(job_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(placement.cpus_per_rank)}
    if in_slurm_allocation():
        processes = [(srun_command(command, placement), env)]
        where = f"srun in SLURM job {os.environ['SLURM_JOB_ID']}"
    else:
        if placement.nodes > 1 and torch.cuda.is_available():
            raise ConfigError("resources: train nodes > 1 needs a SLURM allocation (locally it only simulates nodes "
                              "on CPU, for tests)")  # fmt: skip
        processes = local_rank_commands(command, placement, env)
        where = "local processes"
    log.info("launching %d rank(s) on %d node(s) with %s: %s", placement.ranks, placement.nodes, where,
             " ".join(processes[0][0]))  # fmt: skip
    tail: deque[str] = deque(maxlen=400)
    with open(log_path, "a") as log_file:

        def output(line: str) -> None:
            log_file.write(line)
            log_file.flush()
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))

        status = run_processes(processes, output=output)
    return status, list(tail)


# What the other ranks raise when a failing rank's process group goes away under a collective they wait in.
_PEER_GONE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|DistBackendError|"
    r"DistNetworkError|NCCL communicator was aborted|ProcessGroup.* (aborted|shut ?down)",
    re.IGNORECASE,
)


def rank_errors(lines: Iterable[str]) -> list[str]:
    """The exception lines that end the tracebacks in the ranks' output (for chained exceptions, the last), each once,
    in order: what the job's own error line says."""
    errors: list[str] = []
    in_traceback = False
    for line in lines:
        line = re.sub(r"^\[rank\d+\]: ?", "", line)  # torch.distributed's prefix of a rank's uncaught exception
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            if line not in errors:
                errors.append(line)
    return errors


def job_error(lines: Iterable[str]) -> str:
    """The job's error line: the failing rank's own last exception, not what its peers raised when it went away."""
    errors = rank_errors(lines)
    own = [e for e in errors if not _PEER_GONE.search(e)] or errors
    return own[-1] if own else "no error message in the ranks' output"


def main(argv: list[str] | None = None) -> None:
    """``python -m vectorlm.train.launch JOB.yaml --ranks N --log PATH``: a training job outside Snakemake."""
    import argparse

    from vectorlm.log import setup_logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("job", help="training job YAML (the train rule writes one to {output_dir}/train/job.yaml)")
    parser.add_argument("--ranks", type=int, default=1, help="number of ranks")
    parser.add_argument("--nodes", type=int, default=1, help="nodes they span (simulated locally, for tests)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    parser.add_argument("--log", required=True, help="file the ranks' output and the launcher's log are appended to")
    args = parser.parse_args(argv)
    setup_logging(path=args.log)
    try:
        placement = Placement(args.ranks, args.nodes, max(1, args.threads // args.ranks))
        job = TrainJob.load(args.job)
        check_job(job, ranks=placement.ranks)
        launch_training(job, placement=placement, log_path=args.log)
    except Preempted as stopped:
        log.warning("%s", stopped)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
