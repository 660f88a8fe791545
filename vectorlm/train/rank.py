"""What each rank of a training job runs, started by vectorlm/train/launch.py:

    python -m vectorlm.train.rank JOB.yaml

It joins the job's process group, decides with the others how to start (fresh, resumed, or already finished:
vectorlm/train/resume.py), trains (vectorlm/train/trainer.py) and, on the main rank, writes the run's summary. It
exits with status 75 when a stop signal made it save a checkpoint first.

A checkpoint that fails to load on any rank is set aside and the previous one is planned instead, unless it cannot be
read here (permission, I/O, refused content: :class:`~vectorlm.train.checkpoint_reader.CheckpointUnreadable`), which
stops every rank with the reason and leaves it where it is.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import statistics
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from vectorlm.config import ConfigError
from vectorlm.log import setup_logging
from vectorlm.run_dir import RunDir
from vectorlm.train.checkpoint import set_aside
from vectorlm.train.checkpoint_reader import MISSING_FILE, CheckpointUnreadable
from vectorlm.train.distributed import DistributedEnv, init_distributed
from vectorlm.train.job import TrainJob
from vectorlm.train.metrics_log import read_metrics
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from vectorlm.train.resume import NoUsableCheckpoint, StartPlan, plan_start
from vectorlm.train.train_state import TrainState
from vectorlm.train.trainer import Trainer

log = logging.getLogger(__name__)

# The launcher's process id, in the environment of the ranks it starts on this machine: they die with it.
LAUNCHER_PID = "VECTORLM_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run(job: TrainJob) -> int:
    """Trains on this rank within the process group given by the environment; returns the exit status."""
    stop = StopRequest()
    env = init_distributed(collective_timeout_minutes=job.train.collective_timeout_minutes,
                           checkpoint_timeout_minutes=job.train.checkpoint_timeout_minutes)  # fmt: skip
    setup_logging(rank=env.rank)
    try:
        _log_placement(env)
        trainer, built, seconds = Trainer(job, env), False, None
        plan = _plan_on_main(job, trainer, env)
        while plan.action != "done":
            if not built:
                trainer.build()
                built = True
            if (seconds := _load_on_every_rank(trainer, plan, env)) is not None:
                break
            plan = _plan_on_main(job, trainer, env)  # the checkpoint was set aside: the previous one, if any
        if plan.action == "done":
            log.info("%s already finished with these settings; nothing to train", plan.checkpoint)
            summary = finished_summary(job.run, Path(plan.checkpoint), plan.state)
        else:
            if not trainer.fit(trainer.restore(plan, seconds=seconds) + 1, stop):
                return PREEMPTED_EXIT_CODE
            summary = trainer.summary(trainer.max_steps)
        if env.is_main:
            job.run.summary.write_text(json.dumps(summary, indent=2) + "\n")
            log.info("eval loss %.4f -> %.4f after %d steps; checkpoint %s", summary["initial_eval_loss"],
                     summary["final_eval_loss"], summary["step"], summary["checkpoint"])  # fmt: skip
        return 0
    finally:
        dist.destroy_process_group()


def _log_placement(env: DistributedEnv) -> None:
    """Where every rank runs (host, device, visible GPUs): the first thing to check on a new cluster."""
    mine = f"{socket.gethostname()}:{env.device}(local rank {env.local_rank}"
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        mine += f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}"
    mine += ")"
    everyone: list[Any] = [None] * env.world_size
    dist.all_gather_object(everyone, mine, group=env.cpu_group)
    log.info("ranks: %s", ", ".join(f"{rank}@{where}" for rank, where in enumerate(everyone)))


def _plan_on_main(job: TrainJob, trainer: Trainer, env: DistributedEnv) -> StartPlan:
    """Rank 0 inspects (and may tidy) the checkpoints; every rank gets its decision, or its error (waiting on a CPU
    group: this file work can outlast an NCCL timeout on a slow shared filesystem)."""
    decision: list[Any] = [None]
    failure = None
    if env.is_main:
        try:
            decision[0] = plan_start(job.run.checkpoints, fingerprint=trainer.fingerprint, train=trainer.settings,
                                     max_steps=trainer.max_steps)  # fmt: skip
        except Exception as error:  # noqa: BLE001 (every rank raises it, rather than wait for rank 0 until a timeout)
            failure = error
            ours = isinstance(error, (ConfigError, CheckpointUnreadable, NoUsableCheckpoint))
            decision[0] = error if ours else RuntimeError(f"planning the start failed: {type(error).__name__}: {error}")
    dist.broadcast_object_list(decision, src=0, group=env.cpu_group)
    if failure is not None:
        raise failure
    if isinstance(decision[0], Exception):
        raise decision[0]
    return decision[0]


def _load_on_every_rank(trainer: Trainer, plan: StartPlan, env: DistributedEnv) -> float | None:
    """Loads the planned checkpoint on every rank; returns the seconds it took, or None when it failed to load on
    some rank and was set aside (rank 0 renames it). A failure that says the checkpoint cannot be read here is
    raised on every rank instead."""
    seconds, failure = 0.0, None
    if plan.action != "fresh":
        try:
            seconds = trainer.load(plan)
        except (Exception, CheckpointException) as error:  # noqa: BLE001 (agreed on below: set aside, or raised)
            failure = (unreadable(error), f"{type(error).__name__}: {_first_line(error)}")
    failures: list[Any] = [None] * env.world_size
    dist.all_gather_object(failures, failure, group=env.cpu_group)
    failed = sorted((not cannot_read, rank, reason) for rank, (cannot_read, reason) in (
        (rank, f) for rank, f in enumerate(failures) if f is not None))  # fmt: skip
    if not failed:
        return seconds
    damaged, rank, reason = failed[0]  # a rank that cannot read it first
    if not damaged:
        raise CheckpointUnreadable(f"cannot read checkpoint {plan.checkpoint} on rank {rank}: {reason}")
    if env.is_main:
        set_aside(Path(plan.checkpoint), f"it failed to load on rank {rank}: {reason}")
    dist.barrier(group=env.cpu_group)
    return None


# What a damaged checkpoint raises while it loads: a missing file, a stored item cut short, not a torch record, or
# bytes that do not decode (a zip record whose signature is gone).
_DAMAGE = (*MISSING_FILE, EOFError, pickle.UnpicklingError, UnicodeDecodeError)


def unreadable(error: BaseException) -> bool:
    """Whether ``error`` (or, for DCP's wrapped per-rank failures, one of them) says the checkpoint cannot be read
    here, rather than that it is damaged. Its files passed the checks already, so a failure is damage only with
    evidence of damaged content (:data:`_DAMAGE`, torch's reader of a stored record failing); anything else (refused
    content, permission or I/O errors, memory, a timeout, keys or shapes this model does not have) stops the run and
    leaves every checkpoint where it is, rather than setting good checkpoints aside one after another."""
    pending, seen = [error], []
    while pending:
        current = pending.pop()
        seen.append(current)
        pending += _ranks_failures(current)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    causes = [e for e in seen if not isinstance(e, CheckpointException) and getattr(e, "failures", None) is None]
    refused = any(isinstance(e, CheckpointUnreadable) or (isinstance(e, OSError) and not isinstance(e, _DAMAGE))
                  for e in causes)  # fmt: skip
    damage = any(
        isinstance(e, _DAMAGE) or (type(e) is RuntimeError and "PytorchStreamReader" in str(e)) for e in causes
    )
    return refused or not damage


def _ranks_failures(error: BaseException) -> list[BaseException]:
    """The ranks' own exceptions that DCP's CheckpointException wraps ({rank: (exception, traceback)}); none for any
    other error."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    wrapped = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [f for f in wrapped if isinstance(f, BaseException)]


def _first_line(error: BaseException) -> str:
    """What went wrong, in a line: for DCP's wrapped failures, the failing ranks' own exceptions."""
    if causes := _ranks_failures(error):
        return "; ".join(f"{type(c).__name__}: {c}" for c in causes)
    return str(error).splitlines()[0] if str(error) else ""


def finished_summary(run: RunDir, checkpoint: Path, state: TrainState) -> dict[str, Any]:
    """The summary of a run that finished before, rebuilt from its run directory: the checkpoint where it is, the
    eval losses and throughput from its metrics file (the train state's where the file lacks them). What only the
    finished run knew (attention, parameter counts) is taken from its final train state when it is of the right
    type, never a path or anything that decides what happens next."""
    records = read_metrics(run.metrics)
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    steps = [r for r in records if "loss" in r and r["step"] <= state.step]
    known = state.summary if isinstance(state.summary, dict) else {}

    def kind(name: str, types: tuple[type, ...]) -> Any:
        value = known.get(name)
        return value if isinstance(value, types) and not isinstance(value, bool) else None

    return {
        "checkpoint": str(checkpoint),
        "step": state.step,
        "initial_eval_loss": evals.get(0, state.eval_losses.get(0)),
        "final_eval_loss": evals.get(state.step, state.eval_losses.get(state.step)),
        "tokens_per_second": statistics.median(s["tokens_per_second"] for s in steps) if steps else None,
        "world_size": state.world_size,
        "attention": kind("attention", (str,)),
        "parameters": kind("parameters", (int,)),
        "trainable_parameters": kind("trainable_parameters", (int,)),
        "train_seconds": kind("train_seconds", (int, float)),
        "final_eval_metrics": final_eval_metrics(records, state.step),
        "skipped_steps": state.skipped_steps,
        "peak_memory_mb": max((s.get("peak_memory_mb") or 0.0 for s in steps), default=None),
    }


def final_eval_metrics(records: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The objective's metrics of the evaluation at ``step`` (``eval_rewards/accuracies`` ...: preference tuning)."""
    evaluations = [r for r in records if r.get("step") == step and "eval_loss" in r]
    return (
        {k: v for k, v in evaluations[-1].items() if k.startswith("eval_") and k != "eval_loss"} if evaluations else {}
    )


def die_with_launcher() -> None:
    """A rank that a launcher started on this machine is killed when the launcher dies (SIGKILL by the OOM killer, a
    crash): Linux's parent-death signal. It would otherwise train on unsupervised, and a rerun would race it over the
    same checkpoints. Ranks started by srun die with their job step, which SLURM ends with the job."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot tie this rank to its launcher (prctl: errno %d)", ctypes.get_errno())
    if os.getppid() != int(launcher):  # the launcher died before the signal was armed
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    die_with_launcher()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="training job YAML written by the workflow's train rule")
    sys.exit(run(TrainJob.load(parser.parse_args(argv).job)))


if __name__ == "__main__":
    main()
