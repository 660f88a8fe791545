"""Snakemake adapter: the sweep's report and its best run (rule ``sweep_report``)."""

from vectorlm.log import logged_stage
from vectorlm.report.sweep_report import write_sweep_report

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("sweep_report", sm.log[0]):
    write_sweep_report(sm.params.output_dir, sm.params.runs, select=sm.params.select)
