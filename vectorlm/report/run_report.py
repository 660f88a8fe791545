"""A run's report: figures of its training and of its data, and a short summary, in ``{output_dir}/report``.

- ``loss.png``: train and eval loss against optimizer steps and against tokens trained;
- ``optimization.png``: the learning rate each step used and the gradient norm;
- ``throughput.png``: tokens/s and MFU (when the GPU's peak is known);
- ``data.png``: the document lengths of the tokenized training data and how full the packed rows are;
- ``summary.md``: final eval loss, throughput, steps, parameters, peak memory and where the model is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vectorlm.packed import STATS_FILE
from vectorlm.run_dir import Report, RunDir
from vectorlm.train.metrics_log import read_metrics

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: compute nodes have no display
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


def tokens_trained(steps: list[dict[str, Any]]) -> np.ndarray:
    """Tokens trained by each logged step: a logged step's tokens stand for every step since the previous log."""
    done, previous, total = [], 0, 0.0
    for record in steps:
        total += record["tokens"] * (record["step"] - previous)
        previous = record["step"]
        done.append(total)
    return np.asarray(done)


def plot_training(steps: list[dict[str, Any]], evals: list[dict[str, Any]], output: Report) -> None:
    plt = _pyplot()
    step = [s["step"] for s in steps]
    tokens = tokens_trained(steps)
    figure, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_step.plot(step, [s["loss"] for s in steps], label="train")
    by_step.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o--", label="eval")
    per_step = dict(zip(step, tokens))
    evals_with_tokens = [e for e in evals if e["step"] in per_step or e["step"] == 0]
    by_tokens.plot(tokens / 1e6, [s["loss"] for s in steps], label="train")
    by_tokens.plot([per_step.get(e["step"], 0.0) / 1e6 for e in evals_with_tokens],
                   [e["eval_loss"] for e in evals_with_tokens], "o--", label="eval")  # fmt: skip
    for axes, label in ((by_step, "optimizer step"), (by_tokens, "tokens trained (millions)")):
        axes.set_xlabel(label)
        axes.set_ylabel("loss (mean token cross-entropy, nats)")
        axes.grid(True, alpha=0.3)
        axes.legend()
    by_step.set_title("Loss against steps")
    by_tokens.set_title("Loss against tokens")
    _save(figure, output.loss)

    figure, (lr, norm) = plt.subplots(1, 2, figsize=(11, 4.2))
    lr.plot(step, [s["lr"] for s in steps])
    lr.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate each step used")
    norm.plot(step, [s["grad_norm"] for s in steps])
    norm.set(xlabel="optimizer step", ylabel="global gradient norm (before clipping)", title="Gradient norm")
    for axes in (lr, norm):
        axes.grid(True, alpha=0.3)
    _save(figure, output.optimization)

    figure, (speed, mfu) = plt.subplots(1, 2, figsize=(11, 4.2))
    speed.plot(step, [s["tokens_per_second"] for s in steps])
    speed.set(xlabel="optimizer step", ylabel="tokens/s (all ranks)", title="Throughput")
    values = [s["mfu"] for s in steps]
    if any(v is not None for v in values):
        mfu.plot(step, [100 * v if v is not None else np.nan for v in values])
        mfu.set(xlabel="optimizer step", ylabel="MFU (% of the GPUs' bf16 peak)", title="Model FLOPs utilisation")
    else:
        mfu.text(0.5, 0.5, "MFU: no known peak for this device", ha="center", va="center", transform=mfu.transAxes)
        mfu.set(title="Model FLOPs utilisation", xticks=[], yticks=[])
    for axes in (speed, mfu):
        axes.grid(True, alpha=0.3)
    _save(figure, output.throughput)


def plot_data(document_lengths: np.ndarray, row_lengths: np.ndarray, max_seq_len: int, output: Report) -> None:
    plt = _pyplot()
    figure, (docs, rows) = plt.subplots(1, 2, figsize=(11, 4.2))
    docs.hist(document_lengths, bins=min(60, max(10, len(document_lengths) // 20)))
    docs.axvline(max_seq_len, color="C3", linestyle="--", label=f"max_seq_len {max_seq_len}")
    docs.set(xlabel="document length (tokens)", ylabel="documents", title="Documents of the training data")
    docs.legend()
    rows.hist(100 * row_lengths / max_seq_len, bins=np.linspace(0, 100, 41))
    rows.set(xlabel=f"row filled (% of {max_seq_len} tokens)", ylabel="packed rows", title="Packing fill")
    for axes in (docs, rows):
        axes.grid(True, alpha=0.3)
    _save(figure, output.data)


def _number(value: float | None) -> str:
    """A number of the summary as the report prints it, or n/a where the run did not record it."""
    return "n/a" if value is None else f"{value:,.0f}"


def write_report(run: RunDir) -> dict[str, Any]:
    """Writes the figures and ``summary.md`` of the experiment in ``run`` into its ``report/``; returns the summary's
    numbers."""
    import datasets

    from vectorlm.data.arrow import list_lengths

    output, model = run.report, run.hf_model
    output.root.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run.metrics)
    steps, evals = [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]
    plot_training(steps, evals, output)
    stats = json.loads((run.packed / STATS_FILE).read_text())
    max_seq_len = stats["max_seq_len"]
    tokenized = sorted(path for path in run.tokenized.iterdir() if not path.name.startswith("."))  # one per source
    document_lengths = np.concatenate([list_lengths(datasets.load_from_disk(str(path))["train"]) for path in tokenized])
    row_lengths = list_lengths(datasets.load_from_disk(str(run.packed))["train"])
    plot_data(document_lengths, row_lengths, max_seq_len, output)
    result = json.loads(run.summary.read_text())
    numbers = {
        "final_eval_loss": result["final_eval_loss"],
        "initial_eval_loss": result["initial_eval_loss"],
        "tokens_per_second": result["tokens_per_second"],
        "steps": result["step"],
        "parameters": result["parameters"],
        "trainable_parameters": result["trainable_parameters"],
        "peak_memory_mb": result["peak_memory_mb"],
        "model": str(model.resolve()),
        "packing_fill": float(row_lengths.sum() / (len(row_lengths) * max_seq_len)) if len(row_lengths) else 0.0,
    }
    lines = [
        "# Run summary", "",
        (f"- eval loss: {numbers['initial_eval_loss']:.4f} before training, {numbers['final_eval_loss']:.4f} after "
         f"{numbers['steps']} steps"),
        f"- throughput: {_number(numbers['tokens_per_second'])} tokens/s (median of the logged steps)",
        f"- parameters: {_number(numbers['parameters'])} ({_number(numbers['trainable_parameters'])} trained)",
        f"- peak memory per rank: {_number(numbers['peak_memory_mb'])} MB",
        (f"- data: {len(document_lengths):,} training documents, {len(row_lengths):,} packed rows of {max_seq_len} "
         f"tokens, {numbers['packing_fill']:.1%} filled"),
        f"- model: {model.resolve()}",
        "", f"Figures: {', '.join(path.name for path in output.figures)}",
    ]  # fmt: skip
    if run.estimate.is_file():  # what rule estimate predicted before training, beside what the run measured
        from vectorlm.estimate.table import format_estimate

        lines += ["", "## The estimate before training (rule estimate)", "", *format_estimate(
            json.loads(run.estimate.read_text()))]  # fmt: skip
    output.summary.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", output.root)
    return numbers
