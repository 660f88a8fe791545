"""Runs side by side: their loss curves in one figure and a table of results and the settings that differ.

    python -m vectorlm.report.compare results/lr-1e-4 results/lr-3e-4 results/lr-1e-3 [--output compare.png]

Each argument is a run's ``output_dir``. A run still in progress is read as far as it got. The table gives the final
(or latest) eval loss, the median tokens/s and MFU of the logged steps, the steps trained, and every config key
whose value differs between the runs (from the settings saved with the packed data and the training job).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from vectorlm.config import STAGE_CONFIG, flatten
from vectorlm.run_dir import RunDir
from vectorlm.train.metrics_log import read_metrics

SKIPPED_KEYS = {
    "output_dir",
    "packed",
    "train.report_to",
}  # they differ between any two runs and say nothing about them


def read_run(path: Path) -> dict[str, Any]:
    """A run's metric records, summary (if finished) and settings as dotted keys."""
    run = RunDir(path)
    if not run.metrics.is_file():
        raise SystemExit(f"{path}: no {run.metrics.relative_to(path)} (is it a run's output_dir, and has training "
                         "started?)")  # fmt: skip
    records = read_metrics(run.metrics)
    settings: dict[str, Any] = {}
    for source in (run.packed / STAGE_CONFIG, run.job):
        if source.is_file():
            settings.update(yaml.safe_load(source.read_text()))
    summary = run.summary
    return {
        "name": str(path),
        "steps": [r for r in records if "loss" in r],
        "evals": [r for r in records if "eval_loss" in r],
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "settings": {k: v for k, v in flatten(settings).items() if k not in SKIPPED_KEYS},
    }


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values are not the same in every run (a key missing from a run counts as differing)."""
    keys = sorted({key for run in runs for key in run["settings"]})
    return [k for k in keys if len({json.dumps(run["settings"].get(k), sort_keys=True) for run in runs}) > 1]


def results_table(runs: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per run, its results and the settings that differ."""
    keys = differing_keys(runs)
    header = ["run", "final eval loss", "tokens/s", "MFU", "steps", *keys]
    rows = []
    for run in runs:
        speeds = [s["tokens_per_second"] for s in run["steps"]]
        mfus = [s["mfu"] for s in run["steps"] if s.get("mfu") is not None]
        final = run["evals"][-1]["eval_loss"] if run["evals"] else None
        rows.append([
            run["name"], f"{final:.4f}" if final is not None else "-",
            f"{statistics.median(speeds):,.0f}" if speeds else "-",
            f"{statistics.median(mfus):.1%}" if mfus else "-",
            str(run["steps"][-1]["step"]) if run["steps"] else "0",
            *(str(run["settings"].get(k, "-")) for k in keys),
        ])  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def plot_losses(runs: list[dict[str, Any]], output: Path) -> None:
    """Training loss (lines) and eval loss (markers) against steps, one colour per run."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # files only, no display (compute nodes, CI)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        axes.plot([s["step"] for s in run["steps"]], [s["loss"] for s in run["steps"]], color=colour,
                  label=f"{run['name']} (train)")  # fmt: skip
        if run["evals"]:
            axes.plot([e["step"] for e in run["evals"]], [e["eval_loss"] for e in run["evals"]], "o--",
                      color=colour, label=f"{run['name']} (eval)")  # fmt: skip
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean token cross-entropy, nats)")
    axes.set_yscale("log")
    for axis in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):  # 0.3, not 3 x 10^-1
        axis(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axes.set_title("Loss of each run")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run")
    parser.add_argument("--output", type=Path, default=Path("compare.png"), help="figure to write (PNG)")
    args = parser.parse_args(argv)
    runs = [read_run(path) for path in args.runs]
    plot_losses(runs, args.output)
    print(results_table(runs))
    print(f"\nloss curves: {args.output}")


if __name__ == "__main__":
    main()
