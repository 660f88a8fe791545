"""Snakemake adapter: the reference model's log-probabilities of the packed preference pairs (rule
``reference_logprobs``), on the train rule's ranks."""

import dataclasses

from vectorlm.config import TrainConfig
from vectorlm.log import logged_stage
from vectorlm.train.placement import check_train_resources
from vectorlm.train.reference_logprobs import ReferenceJob, run_reference_logprobs

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("reference_logprobs", sm.log[0]):
    # The forward's operational settings (micro-batch, attention, sharding) come from the experiment's train section.
    train = dataclasses.replace(TrainConfig(**sm.config["train"]), mixed_precision=sm.params.mixed_precision)
    job = ReferenceJob(model=sm.input.model, packed=sm.input.packed, output_dir=sm.output.logprobs,
                       digest=sm.params.reference_digest, train=train,
                       trust_remote_code=sm.params.trust_remote_code)  # fmt: skip
    placement = check_train_resources(dict(sm.resources.items()), train=train, threads=sm.threads)
    run_reference_logprobs(job, placement=placement, log_path=sm.log[0])
