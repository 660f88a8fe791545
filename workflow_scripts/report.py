"""Snakemake adapter: the run's figures and summary (rule ``report``)."""

from vectorlm.log import logged_stage
from vectorlm.report.run_report import write_report
from vectorlm.run_dir import RunDir

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("report", sm.log[0]):
    write_report(RunDir(sm.params.output_dir))
