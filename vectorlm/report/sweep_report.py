"""A sweep's report (rule sweep_report): its runs side by side, the mean and spread over seeds, the best run, and
``{output_dir}/best`` linked to the best run's exported model. Files in ``{output_dir}/sweep``:

- ``runs.json``: each run's overrides, status (finished, or failed with its log), final eval loss, evaluate metrics,
  tokens/s, MFU, training time;
- ``summary.md``: that table, the table over seeds (mean and standard deviation per run without its seed) and the
  best run;
- ``eval_loss.png``: each run's eval loss against steps, and each run's final eval loss.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any

from vectorlm.report.run_report import _pyplot, _save
from vectorlm.run_dir import RunDir, SweepDir
from vectorlm.train.metrics_log import read_metrics

log = logging.getLogger(__name__)

SEED = re.compile(r"(^|_)seed--?\d+$")


def run_row(name: str, run: RunDir, overrides: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of one run, read from its run directory: failed (with its train log) when it has no
    training summary."""
    row: dict[str, Any] = {"run": name, "overrides": overrides, "group": SEED.sub("", name) or "run"}
    if not (run.summary.is_file() and run.hf_model.is_dir()):  # the log of the stage that failed: the last written
        logs = sorted(run.logs.glob("*.log"), key=lambda path: path.stat().st_mtime) if run.logs.is_dir() else []
        return {**row, "status": "failed", "log": str(logs[-1] if logs else run.log("train"))}
    summary = json.loads(run.summary.read_text())
    steps = [r for r in read_metrics(run.metrics) if "loss" in r]
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    if summary.get("final_eval_loss") is None:
        return {**row, "status": "failed", "log": str(run.log("train"))}
    row.update(status="finished", final_eval_loss=summary["final_eval_loss"],
               tokens_per_second=summary.get("tokens_per_second"), mfu=statistics.median(mfu) if mfu else None,
               train_seconds=summary.get("train_seconds"), model=str(run.hf_model),
               metrics=_evaluate_metrics(run))  # fmt: skip
    return row


def _evaluate_metrics(run: RunDir) -> dict[str, float]:
    """{task/metric: value} of the run's evaluate stage (the filter after a metric's comma left out)."""
    if not run.evaluate.results.is_file():
        return {}
    results = json.loads(run.evaluate.results.read_text()).get("results", {})
    return {f"{task}/{metric.split(',')[0]}": value for task, values in results.items()
            for metric, value in values.items() if isinstance(value, (int, float)) and "stderr" not in metric}  # fmt: skip


def select_best(rows: list[dict[str, Any]], select: str) -> dict[str, Any] | None:
    """The finished run that ``select`` prefers: the lowest final eval loss (``eval_loss``), or the highest value of
    an evaluate metric (``<task>/<metric>``); None when no finished run has it."""
    finished = [r for r in rows if r["status"] == "finished"]
    if select == "eval_loss":
        return min(finished, key=lambda r: r["final_eval_loss"], default=None)
    scored = [r for r in finished if select in r["metrics"]]
    return max(scored, key=lambda r: r["metrics"][select], default=None)


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run without its seed: the runs, the mean and standard deviation of their final eval losses."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    table = []
    for group, members in groups.items():
        losses = [r["final_eval_loss"] for r in members if r["status"] == "finished"]
        table.append({"group": group, "runs": len(members), "finished": len(losses),
                      "mean_eval_loss": statistics.mean(losses) if losses else None,
                      "std_eval_loss": statistics.stdev(losses) if len(losses) > 1 else 0.0 if losses else None})  # fmt: skip
    return table


def write_sweep_report(output_dir: str | Path, runs: dict[str, dict[str, Any]], *, select: str = "eval_loss") -> dict:
    """Writes the report of the sweep in ``output_dir`` whose runs are ``runs`` ({name: overrides}, laid out under
    ``output_dir/runs``), and links ``output_dir/best`` to the best run's model; returns the rows and the best."""
    sweep = SweepDir(output_dir)
    rows = [run_row(name, sweep.run(name), overrides) for name, overrides in runs.items()]
    best = select_best(rows, select)
    sweep.report.mkdir(parents=True, exist_ok=True)
    result = {"select": select, "best": best["run"] if best else None, "runs": rows, "over_seeds": over_seeds(rows)}
    sweep.runs.write_text(json.dumps(result, indent=2) + "\n")
    sweep.table.write_text(_markdown(result))
    _plot(sweep, rows)
    link = sweep.best
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} is not a link the sweep made: move it away, the best run's link goes there")
    if link.is_symlink():
        link.unlink()
    if best is not None:
        link.symlink_to(os.path.relpath(best["model"], sweep.root))
        log.info("best run by %s: %s -> %s", select, best["run"], link)
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    if failed:
        log.warning("%d run(s) failed: %s (their logs are in the report)", len(failed), ", ".join(failed))
    return result


def _markdown(result: dict[str, Any]) -> str:
    def number(value, digits=4):
        return "n/a" if value is None else f"{value:,.{digits}f}"

    lines = [f"# Sweep: {len(result['runs'])} runs, best by {result['select']}: {result['best'] or 'none'}", "",
             "| run | overrides | status | final eval loss | evaluate | tokens/s | MFU | train s |",
             "|---|---|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for row in result["runs"]:
        overrides = ", ".join(f"{k}={v}" for k, v in row["overrides"].items())
        if row["status"] == "failed":
            lines.append(f"| {row['run']} | {overrides} | failed (log: {row['log']}) | | | | | |")
            continue
        evaluated = ", ".join(f"{name} {value:.4f}" for name, value in row["metrics"].items())
        lines.append(f"| {row['run']} | {overrides} | finished | {number(row['final_eval_loss'])} | {evaluated} | "
                     f"{number(row['tokens_per_second'], 0)} | {number(row['mfu'], 3)} | "
                     f"{number(row['train_seconds'], 1)} |")  # fmt: skip
    lines += ["", "| run (seeds together) | runs | finished | mean eval loss | std |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {g['group']} | {g['runs']} | {g['finished']} | {number(g['mean_eval_loss'])} | "
              f"{number(g['std_eval_loss'])} |" for g in result["over_seeds"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(sweep: SweepDir, rows: list[dict[str, Any]]) -> None:
    plt = _pyplot()
    figure, (curves, finals) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        evals = [r for r in read_metrics(sweep.run(row["run"]).metrics) if "eval_loss" in r]
        if evals:
            curves.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label=row["run"])
    curves.set(xlabel="step", ylabel="eval loss", title="eval loss of each run")
    curves.legend(fontsize=6)
    finished = [r for r in rows if r["status"] == "finished"]
    finals.barh([r["run"] for r in finished], [r["final_eval_loss"] for r in finished])
    finals.set(xlabel="final eval loss", title="final eval loss (failed runs left out)")
    finals.tick_params(axis="y", labelsize=6)
    _save(figure, sweep.figure)
