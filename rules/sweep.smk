# Only with a sweep section in the config; `all` then asks for every run's targets and rule sweep_report's.
if RUNS:

    rule sweep_report:
        """The sweep's runs side by side (final eval loss, evaluate metrics, tokens/s, MFU, time; mean and spread over
        seeds), the best run by sweep.select, and {output_dir}/best linked to its exported model.
        """
        input:
            summaries=expand(rules.train.output.summary, run=RUNS),
            models=expand(rules.convert_hf.output.model, run=RUNS),
            evaluations=expand(get_evaluate_targets(), run=RUNS),
        output:
            table=report(
                str(SWEEP.table),
                caption="captions/sweep.rst",
                category="sweep",
                labels={"file": "summary.md"},
            ),
            runs=str(SWEEP.runs),
            figure=report(
                str(SWEEP.figure),
                caption="captions/sweep.rst",
                category="sweep",
                labels={"figure": "eval loss of the runs"},
            ),
        log:
            str(SWEEP.log("sweep_report")),
        localrule: True
        params:
            output_dir=CFG.output_dir,
            runs=get_sweep_overrides(),
            select=sweep_select(config["sweep"]),
            fingerprint=fingerprint("sweep_report.py"),
        script:
            "../workflow_scripts/sweep_report.py"
