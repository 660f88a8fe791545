rule report:
    """Figures of the run's training and data, and a short summary, in {output_dir}/report; `snakemake --report
    report.html` shows them with captions, grouped by stage (captions/)."""
    input:
        summary=rules.train.output.summary,
        tokenized=rules.link_data.output.tokenized,
        packed=rules.link_data.output.packed,
        model=rules.convert_hf.output.model,
        estimate=rules.estimate.output.estimate,
    output:
        loss=report(
            str(RUN.report.loss),
            caption="captions/loss.rst",
            category="train",
            labels=report_labels(figure="loss"),
        ),
        optimization=report(
            str(RUN.report.optimization),
            caption="captions/optimization.rst",
            category="train",
            labels=report_labels(figure="learning rate and gradient norm"),
        ),
        throughput=report(
            str(RUN.report.throughput),
            caption="captions/throughput.rst",
            category="train",
            labels=report_labels(figure="throughput and MFU"),
        ),
        data=report(
            str(RUN.report.data),
            caption="captions/data.rst",
            category="tokenize and pack",
            labels=report_labels(figure="document lengths and packing fill"),
        ),
        summary=report(
            str(RUN.report.summary),
            caption="captions/summary.rst",
            category="summary",
            labels=report_labels(file="summary.md"),
        ),
    log:
        str(RUN.log("report")),
    params:
        output_dir=get_output_dir,
        fingerprint=fingerprint("report.py"),
    script:
        "../workflow_scripts/report.py"
