"""The throughput benchmark (bench/throughput.py) runs end to end on CPU, so that it cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.workflow


def load_bench():
    """bench/throughput.py as a module (bench/ is no package), for its configuration names."""
    spec = importlib.util.spec_from_file_location("bench_throughput", REPO / "bench" / "throughput.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def tables(report: str) -> list[list[dict[str, str]]]:
    """Each Markdown table of the report as a list of rows, each row its cells by column header."""
    found, header = [], None
    for line in report.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            found.append([])
        elif not set(line) <= set("|-: "):
            found[-1].append(dict(zip(header, cells, strict=True)))
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%x"))


def test_tiny_benchmark_measures_vectorlm_and_the_hf_trainer_side_by_side(tmp_path):
    bench = load_bench()
    output = tmp_path / "results.md"
    # --tiny ends in under 3 minutes on 2 idle cores (bench/results/*-throughput-cpu.md); the budget is raised so
    # that a slower machine still runs every row instead of skipping some.
    done = subprocess.run(
        [sys.executable, "bench/throughput.py", "--tiny", "--budget", "600", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    report = output.read_text()
    assert report in done.stdout
    table, headline = tables(report)
    rows = {row["configuration"]: row for row in table}
    assert set(rows) == {bench.label_of(config) for config in bench.DEFAULT_CONFIGS}, report
    for row in table:
        assert number(row["micro-batch"]) >= 1 and number(row["tokens/step"]) > 0, row
        assert number(row["tokens/s"]) > 0 and number(row["MFU (measured peak)"]) > 0, row
        assert row["MFU (data sheet)"] == "n/a", row  # no data-sheet peak for a CPU
        assert number(row["spread"]) >= 0 and number(row["compile s"]) >= 0 and number(row["row s"]) > 0, row
        assert number(row["peak GiB"]) > 0 and row["vs best HF"].endswith("x"), row
        assert "?" not in [row[key] for key in ("attention", "loss", "compile", "checkpointing")], row
    # Equal tokens per optimizer step on every row (the same packed rows, the same global batch).
    tokens_per_step = [number(row["tokens/step"]) for row in table]
    assert max(tokens_per_step) < 1.02 * min(tokens_per_step), table
    # What each vectorlm row used is read from its own run.
    assert rows["vectorlm, compiled"]["compile"] == "blocks + loss (aot_eager)"
    assert rows["vectorlm, eager"]["compile"] == "none"
    # rule estimate's prediction beside every vectorlm row's measured peak (calibrated on the first GPU run)
    assert number(rows["vectorlm, eager"]["estimate GiB"]) > 0 and rows["HF Trainer, default"]["estimate GiB"] == "-"
    assert rows["vectorlm, compiled"]["loss"] == rows["vectorlm, eager"]["loss"] != "-"
    assert rows["HF Trainer, best"]["compile"].startswith("blocks, regional")
    assert "without Liger" in rows["HF Trainer, best"]["notes"]
    assert "1.00x" in [rows[label]["vs best HF"] for label in ("HF Trainer, best", "HF Trainer, default")]
    # The headline: the fastest row of each side by side, with the targets.
    assert [row["fastest of each"] for row in headline] == ["tokens/s", "MFU (data sheet)", "MFU (measured peak)",
                                                            "ratio"]  # fmt: skip
    assert headline[-1]["target"] == ">= 1.5x"
