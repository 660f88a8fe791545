rule report:
    """Figures of the run's training and data, and a short summary, in {output_dir}/report; `snakemake --report
    report.html` shows them with captions, grouped by stage (captions/)."""
    input:
        summary=rules.train.output.summary,
        tokenized=rules.pack.input.tokenized,
        packed=rules.link_data.output.packed,
        model=rules.convert_hf.output.model,
    output:
        loss=report(
            out("report/loss.png"),
            caption="captions/loss.rst",
            category="train",
            labels={"figure": "loss"},
        ),
        optimization=report(
            out("report/optimization.png"),
            caption="captions/optimization.rst",
            category="train",
            labels={"figure": "learning rate and gradient norm"},
        ),
        throughput=report(
            out("report/throughput.png"),
            caption="captions/throughput.rst",
            category="train",
            labels={"figure": "throughput and MFU"},
        ),
        data=report(
            out("report/data.png"),
            caption="captions/data.rst",
            category="tokenize and pack",
            labels={"figure": "document lengths and packing fill"},
        ),
        summary=report(
            out("report/summary.md"),
            caption="captions/summary.rst",
            category="summary",
            labels={"file": "summary.md"},
        ),
    log:
        out("logs/report.log"),
    params:
        fingerprint=fingerprint("report.py"),
    script:
        "../workflow_scripts/report.py"
