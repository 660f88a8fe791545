"""What the workflow prints when it succeeds: how the eval loss moved, where the model is, the evaluation when it is
current, and the warnings of the data stages that a user would otherwise not see."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vectorlm.config_schema import without_operational
from vectorlm.packed import STATS_FILE
from vectorlm.run_dir import RunDir, SweepDir


def summary_lines(
    run: RunDir, *, evaluate_settings: dict[str, Any] | None, evaluate_fingerprint: dict[str, str] | None
) -> list[str]:
    """The lines to print for the experiment in ``run``, from what its stages wrote (a narrower target, such as
    convert_hf, leaves some of it out). ``evaluate_settings`` (the evaluate params, None without an evaluate section)
    and ``evaluate_fingerprint`` say which evaluation is current."""
    lines = []
    if run.summary.is_file():
        summary = json.loads(run.summary.read_text())
        accuracy = summary.get("final_eval_metrics", {}).get("eval_rewards/accuracies")
        preferred = f", held-out preference accuracy {accuracy:.3f}" if accuracy is not None else ""
        lines.append(
            f"\nvectorlm: eval loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}{preferred} "
            f"after {summary['step']} steps ({_number(summary['tokens_per_second'])} tokens/s on "
            f"{summary['world_size']} rank(s)); model: {run.hf_model}\n"
        )
    if (results := current_evaluation(run, settings=evaluate_settings, fingerprint=evaluate_fingerprint)) is not None:
        for row in results.get("compared_to_base", []):
            lines.append(
                f"vectorlm: evaluate: {row['task']} {row['metric']} {row['base']:.4f} (base) -> {row['trained']:.4f} "
                "(trained)"
                if row["base"] is not None
                else f"vectorlm: evaluate: {row['task']} {row['metric']} {row['trained']:.4f}"
            )
        lines.append(f"vectorlm: evaluation: {run.evaluate.table}\n")
    stats = run.packed / STATS_FILE
    if stats.is_file():
        lines += [f"vectorlm: WARNING: {warning} (see {stats})\n" for warning in json.loads(stats.read_text())
                  .get("warnings", [])]  # fmt: skip
    return lines


def interrupted_line(run: RunDir, *, since: float = 0.0) -> str | None:
    """When the workflow failed because training was interrupted by a stop signal (it saved a checkpoint first), what
    to print last: that it was, and how to continue (the train job's last log line says both). Only for a train log
    written since ``since`` (the workflow's start): an earlier interruption is not why this workflow failed."""
    path = run.log("train")
    fresh = path.is_file() and path.stat().st_mtime >= since
    lines = path.read_text(errors="replace").strip().splitlines() if fresh else []
    if lines and "training was interrupted" in lines[-1]:
        return f"\nvectorlm: {lines[-1].split(': ', 1)[-1]}\n"
    return None


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def current_evaluation(
    run: RunDir, *, settings: dict[str, Any] | None, fingerprint: dict[str, str] | None
) -> dict[str, Any] | None:
    """evaluate/results.json when it is of the current hf_model, evaluate ``settings`` and task files
    (``fingerprint``), else None."""
    path = run.evaluate.results
    if settings is None or not path.is_file() or not run.hf_model.exists():
        return None
    results = json.loads(path.read_text())
    made = results.get("vectorlm", {})
    if (
        path.stat().st_mtime < run.hf_model.stat().st_mtime
        or without_operational("evaluate", made.get("settings", {})) != settings
        or made.get("fingerprint") != fingerprint
    ):
        return None
    return results


@dataclass(frozen=True)
class Sweep:
    """What the end of a sweep's workflow reports on: its directory, its runs ({name: overrides}) and sweep.select."""

    root: SweepDir
    runs: dict[str, dict[str, Any]]
    select: str


def success_lines(
    run: RunDir,
    *,
    sweep: Sweep | None,
    evaluate_settings: dict[str, Any] | None,
    evaluate_fingerprint: dict[str, str] | None,
) -> list[str]:
    """What to print when the workflow succeeds: the experiment's :func:`summary_lines`, or a sweep's best run."""
    if sweep is None:
        return summary_lines(run, evaluate_settings=evaluate_settings, evaluate_fingerprint=evaluate_fingerprint)
    return sweep_lines(sweep, failed=False)


def failure_lines(runs: list[RunDir], *, sweep: Sweep | None, since: float) -> list[str]:
    """What to print when the workflow fails (``runs``: the experiment's, or each run of a sweep): a sweep's report,
    then, last, for each training that was interrupted, that it was and how to continue (:func:`interrupted_line`)."""
    interrupted = [line for run in runs if (line := interrupted_line(run, since=since)) is not None]
    lines = []
    if sweep is not None:
        try:
            lines = sweep_lines(sweep, failed=True)
        except Exception as error:  # noqa: BLE001 (the lines after it say how to continue: never lose them)
            lines = [f"vectorlm: WARNING: the sweep's report could not be written: {type(error).__name__}: {error}"]
    return lines + interrupted


def sweep_lines(sweep: Sweep, *, failed: bool) -> list[str]:
    """What to print at the end of a sweep. After a success, the best run from rule sweep_report's ``runs.json``.
    After a failure (a run failed; with --keep-going the others finished, and Snakemake skipped sweep_report), the
    same report is written here, listing the failed runs with their logs."""
    root = sweep.root
    if failed:
        from vectorlm.report.sweep_report import write_sweep_report  # numpy and matplotlib: only when needed

        result = write_sweep_report(root.root, sweep.runs, select=sweep.select)
        unfinished = [row["run"] for row in result["runs"] if row["status"] == "failed"]
        return [(f"vectorlm: sweep: {len(unfinished)} of {len(result['runs'])} runs have no finished training "
                 f"({', '.join(unfinished)}); report: {root.table}")]  # fmt: skip
    if not root.runs.is_file():  # a narrower target than all: no sweep report yet
        return []
    result = json.loads(root.runs.read_text())
    return [(f"\nvectorlm: sweep of {len(result['runs'])} runs; best by {result['select']}: {result['best']} "
             f"({root.best}); report: {root.table}\n")]  # fmt: skip
