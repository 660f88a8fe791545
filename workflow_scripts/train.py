"""Snakemake adapter: run the distributed training job (rule ``train``) on ``resources.tasks`` ranks."""

import sys
from pathlib import Path

from vectorlm.config import LoraSettings, TrainConfig, operational
from vectorlm.launch import Preempted, launch_training
from vectorlm.log import logged_stage
from vectorlm.placement import check_train_resources
from vectorlm.preemption import PREEMPTED_EXIT_CODE
from vectorlm.train import TrainJob

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("train", sm.log[0]):
    job = TrainJob(
        model=sm.input.model,
        packed=sm.input.packed,
        output_dir=str(Path(sm.output.summary).parents[1]),  # {output_dir}/train/summary.json
        train=TrainConfig(**sm.params.train, **operational(sm.config, "train")),
        lora=LoraSettings(**sm.params.lora),
        trust_remote_code=sm.params.trust_remote_code,
    )
    placement = check_train_resources(dict(sm.resources.items()), train=job.train, threads=sm.threads)
    try:
        launch_training(job, placement=placement, log_path=sm.log[0])
    except Preempted:
        sys.exit(PREEMPTED_EXIT_CODE)  # a checkpoint was saved: rerunning (or a requeue) continues the run
