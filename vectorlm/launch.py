"""Starting the ranks of a training job: the one place that decides how processes are launched.

Locally the ranks are started by torchrun (``torch.distributed.run --standalone``) on this machine. Their output is
streamed to the job's log file and to stderr, so a user running the workflow in a terminal sees training progress.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from vectorlm.train import TrainJob

log = logging.getLogger(__name__)


def launch_command(job_file: str | Path, *, num_processes: int) -> list[str]:
    """The command that starts ``num_processes`` ranks of ``python -m vectorlm.train job_file``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_processes}",
        "-m", "vectorlm.train", str(job_file),
    ]  # fmt: skip


def launch_training(job: TrainJob, *, num_processes: int, threads: int, log_path: str | Path) -> None:
    """Writes ``job`` next to its outputs and runs it on ``num_processes`` ranks sharing ``threads`` CPU threads.

    Raises:
        ConfigError: when the global batch cannot be split over ``num_processes`` ranks (before any rank starts).
        RuntimeError: when the ranks fail, naming the exit status and the log to read.
    """
    job.train.grad_accumulation_steps(num_processes)
    job_file = Path(job.output_dir) / "train" / "job.yaml"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job.save(job_file)
    command = launch_command(job_file, num_processes=num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // num_processes))}
    log.info("launching %d rank(s): %s", num_processes, " ".join(command))
    with open(log_path, "a") as log_file, subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            log_file.write(line)
            log_file.flush()
            sys.stderr.write(line)
    if process.returncode != 0:
        raise RuntimeError(f"training exited with status {process.returncode}; see {log_path}")
