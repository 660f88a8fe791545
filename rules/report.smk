rule report:
    """Figures of the run's training and data, and a short summary, in {output_dir}/report."""
    input:
        summary=rules.train.output.summary,
        tokenized=rules.tokenize.output.tokenized,
        packed=rules.pack.output.packed,
        model=rules.convert_hf.output.model,
    output:
        report=directory(out("report")),
    log:
        out("logs/report.log"),
    params:
        fingerprint=fingerprint("report.py"),
    script:
        "../workflow_scripts/report.py"
