"""Snakemake adapter: the run's figures and summary (rule ``report``)."""

from pathlib import Path

from vectorlm.log import logged_stage
from vectorlm.report import write_report

sm = snakemake  # noqa: F821 (injected by Snakemake)
with logged_stage("report", sm.log[0]):
    write_report(summary=Path(sm.input.summary), tokenized=[Path(p) for p in sm.input.tokenized],
                 packed=Path(sm.input.packed), model=Path(sm.input.model),
                 output=Path(sm.output.summary).parent)  # fmt: skip
