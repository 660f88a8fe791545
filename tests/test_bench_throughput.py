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


def table_rows(report: str) -> dict[str, list[str]]:
    """The cells of each table row, by its first cell (the configuration)."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "configuration":
            rows[cells[0]] = cells
    return rows


def test_tiny_benchmark_measures_every_configuration_and_the_hf_trainer_baselines(tmp_path):
    bench = load_bench()
    output = tmp_path / "results.md"
    # Inductor compiles each compiled configuration for 30 s or more on 2 cores when its cache is cold.
    done = subprocess.run(
        [sys.executable, "bench/throughput.py", "--tiny", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]
    report = output.read_text()
    assert report in done.stdout
    rows = table_rows(report)
    for label in [label for label, _ in [*bench.CONFIGS.values(), *bench.BASELINES.values()]]:
        assert label in rows, f"no table row for {label}:\n{report}"
        _, micro_batch, tokens_per_second, _, peak_memory, ratio, _ = rows[label]
        assert int(micro_batch) >= 1 and float(tokens_per_second.replace(",", "")) > 0, rows[label]
        assert float(peak_memory) > 0 and ratio.endswith("x"), rows[label]
    assert "1.00x" in [rows[label][5] for label, _ in bench.BASELINES.values()]
