# A checkpoint: the DAG is evaluated again after it, and train's inputs (get_train_inputs) are known only then, so
# that a run that will not fit stops before train is queued, while train's inputs stay its data and model (a new
# estimate, or one that failed and was redone, never reruns a training).
checkpoint estimate:
    """Memory per GPU, time and disk of the training run, from the model's config.json alone (no GPU, no weights), in
    {output_dir}/estimate: a run that will not fit the GPUs stops after it, before train is queued
    (docs/estimate.md)."""
    input:
        model=model_input(),
    output:
        estimate=str(RUN.estimate),
    log:
        str(RUN.log("estimate")),
    # scheduled first among the jobs ready at the start (tokenize may still start beside it)
    priority: 100
    localrule: True
    threads: 1
    params:
        train=get_estimate_settings("train"),
        lora=get_estimate_settings("lora"),
        export_dtype=get_export_dtype,
        estimate=get_estimate_config,
        max_seq_len=CFG.max_seq_len,
        resources=get_train_resources,
        packed_stats=get_packed_stats,
        trust_remote_code=CFG.trust_remote_code,
        fingerprint=fingerprint("estimate.py", model=["files"]),
    script:
        "../workflow_scripts/estimate.py"


rule train:
    """FSDP2 training on resources.tasks ranks; the sharded checkpoint lands in {output_dir}/checkpoints."""
    input:
        unpack(get_train_inputs),
    output:
        summary=str(RUN.summary),
    log:
        str(RUN.log("train")),
    threads: 2
    resources:
        # Ranks of the job (one per GPU). Locally: processes on this machine; under SLURM, one srun step over
        # `nodes` nodes (profiles/slurm sets nodes, GPUs, CPUs, memory and runtime; docs/slurm.md).
        tasks=2,
        nodes=1,
        # Tells the SLURM plugin to run the job script in the allocation itself: it calls srun for the ranks.
        mpi="srun",
    params:
        train=get_train_params,
        lora=get_lora_params,
        dpo=get_dpo_params,
        output_dir=get_output_dir,
        trust_remote_code=CFG.trust_remote_code,
        fingerprint=fingerprint("train.py", model=["files", "weights"]),
    script:
        "../workflow_scripts/train.py"


# Resources that cannot work (e.g. ranks not divisible by nodes, hybrid sharding on one node) fail here, before any
# job is submitted.
check_train_resources(rules.train.rule)


if USES_REFERENCE:

    rule reference_logprobs:
        """The reference model's summed log-probability of each completion of the packed preference pairs, by a forward
        pass sharded with FSDP2 on the train rule's resources; into the cache, at a key made of the reference model
        and the packed data, so that every DPO experiment on them shares it (docs/dpo.md).
        """
        input:
            packed=rules.pack.output.packed,
            model=reference_model_input(),
        output:
            logprobs=directory(str(CACHE.reference_logprobs(REFERENCE_KEY))),
        log:
            str(CACHE.log("reference_logprobs", REFERENCE_KEY)),
        threads: get_train_threads()
        resources:
            **get_reference_resources(),
        params:
            mixed_precision=CFG.train.mixed_precision,
            reference_digest=REFERENCE_KEY,
            trust_remote_code=CFG.trust_remote_code,
            fingerprint=fingerprint("reference_logprobs.py"),
        script:
            "../workflow_scripts/reference_logprobs.py"
