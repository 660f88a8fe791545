rule train:
    """FSDP2 training on resources.tasks ranks; the sharded checkpoint lands in {output_dir}/checkpoints."""
    input:
        packed=rules.pack.output.packed,
        model=CFG.model,
    output:
        summary=out("train/summary.json"),
    log:
        out("logs/train.log"),
    threads: 2
    resources:
        # Ranks of the job. Locally: processes on this machine (gloo on CPU, one per GPU otherwise).
        tasks=2,
    params:
        train=get_train_params(),
        trust_remote_code=CFG.trust_remote_code,
    script:
        "../workflow_scripts/train.py"
