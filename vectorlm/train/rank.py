"""What each rank of a training job runs, started by vectorlm/train/launch.py:

    python -m vectorlm.train.rank JOB.yaml

It joins the job's process group, decides with the others how to start (fresh, resumed, or already finished:
vectorlm/train/resume.py), trains (vectorlm/train/trainer.py) and, on the main rank, writes the run's summary. It
exits with status 75 when a stop signal made it save a checkpoint first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import Any

import torch.distributed as dist

from vectorlm.config import ConfigError, to_plain
from vectorlm.log import setup_logging
from vectorlm.train.distributed import DistributedEnv, init_distributed
from vectorlm.train.job import TrainJob
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from vectorlm.train.resume import StartPlan, plan_start
from vectorlm.train.trainer import Trainer

log = logging.getLogger(__name__)


def run(job: TrainJob) -> int:
    """Trains on this rank within the process group given by the environment; returns the exit status."""
    stop = StopRequest()
    env = init_distributed(collective_timeout_minutes=job.train.collective_timeout_minutes,
                           checkpoint_timeout_minutes=job.train.checkpoint_timeout_minutes)  # fmt: skip
    setup_logging(rank=env.rank)
    try:
        _log_placement(env)
        trainer = Trainer(job, env)
        plan = _plan_on_main(job, trainer, env)
        if plan.action == "done":
            log.info("%s already finished with these settings; nothing to train", plan.checkpoint)
            summary = plan.state.summary
        else:
            trainer.build()
            if not trainer.fit(trainer.restore(plan) + 1, stop):
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
    if env.is_main:
        try:
            decision[0] = plan_start(job.run.checkpoints, fingerprint=trainer.fingerprint, train=to_plain(job.train),
                                     max_steps=trainer.max_steps)  # fmt: skip
        except ConfigError as error:
            decision[0] = str(error)
    dist.broadcast_object_list(decision, src=0, group=env.cpu_group)
    if isinstance(decision[0], str):
        raise ConfigError(decision[0])
    return decision[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="training job YAML written by the workflow's train rule")
    sys.exit(run(TrainJob.load(parser.parse_args(argv).job)))


if __name__ == "__main__":
    main()
