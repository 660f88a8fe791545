"""Snakemake adapter: run the distributed training job (rule ``train``) on ``resources.tasks`` ranks."""

import logging
import sys

from vectorlm.config import DpoSettings, LoraSettings, TrainConfig
from vectorlm.config_schema import operational
from vectorlm.log import logged_stage
from vectorlm.train.job import TrainJob, check_job
from vectorlm.train.launch import Preempted, launch_training
from vectorlm.train.placement import check_train_resources
from vectorlm.train.preemption import PREEMPTED_EXIT_CODE

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("train", sm.log[0]):
    job = TrainJob(model=sm.input.model, packed=sm.input.packed, output_dir=sm.params.output_dir,
                   train=TrainConfig(**sm.params.train, **operational(sm.config, "train")),
                   lora=LoraSettings(**sm.params.lora), trust_remote_code=sm.params.trust_remote_code,
                   dpo=DpoSettings(**(sm.params.dpo or {})), reference=sm.input.get("reference"))  # fmt: skip
    placement = check_train_resources(dict(sm.resources.items()), train=job.train, threads=sm.threads)
    check_job(job, ranks=placement.ranks)
    try:
        launch_training(job, placement=placement, log_path=sm.log[0])
    except Preempted as stopped:  # a checkpoint was saved: rerunning (or a requeue) continues the run
        logging.getLogger("vectorlm").warning("%s", stopped)  # the log's last line says so
        sys.exit(PREEMPTED_EXIT_CODE)
