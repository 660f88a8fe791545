"""Every benchmark under bench/ runs end to end in a tiny form on CPU, so that none can rot between the runs that
measure (bench/consolidate_scale.py did: it no longer wrote the base weights consolidation reads). The GPU throughput
benchmark has a test of its own (tests/test_bench_throughput.py); bench/dryrun.py times `snakemake -n` in a copy of
the workflow (its default is this very checkout, which a test must not touch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_reruns import copy_workflow

pytestmark = pytest.mark.workflow

TINY = {
    "dpo_memory.py": ["--hidden", "64", "--layers", "1", "--vocab", "300", "--rows", "1", "--tokens", "256"],
    "activation_memory.py": [
        "--hidden",
        "64",
        "--intermediate",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--tokens",
        "64",
    ],
    "checkpoint_stall.py": ["--hidden", "64", "--layers", "2", "--saves", "2"],
    "dryrun.py": ["--repeats", "1"],  # and --checkout: a copy of the workflow
    "consolidate_memory.py": ["--hidden", "64", "--layers", "2", "--vocab", "256"],
    "consolidate_scale.py": ["--hidden", "64", "128", "--layers", "2", "--ranks", "2", "--vocab", "256"],
    "export_memory.py": ["--hidden", "64", "--layers", "2"],
    "lora_vs_full.py": ["--hidden", "64", "--layers", "2", "--steps", "2", "--ranks", "1"],
    "loss_memory.py": ["--vocab", "512", "--hidden", "32", "--rows", "1", "--tokens", "64"],
    "moe_load_memory.py": ["--hidden", "64", "--layers", "1", "--experts", "2"],
    "sampler.py": ["--rows", "1000", "--global-batch-size", "8", "--steps", "5"],
    "tokenize_pack.py": ["--megabytes", "0.05", "--max-seq-len", "128"],
}


def test_every_benchmark_has_a_tiny_run():
    assert set(TINY) == {p.name for p in (REPO / "bench").glob("*.py")} - {
        "throughput.py",
        "hf_baseline.py",
    }


@pytest.mark.parametrize("script", sorted(TINY))
def test_the_benchmark_runs(script, tmp_path, tiny_model_dir):
    arguments = TINY[script] + (["--model", str(tiny_model_dir)] if script == "tokenize_pack.py" else [])
    if script == "dryrun.py":
        (tmp_path / "workflow").mkdir()
        copy_workflow(tmp_path / "workflow")
        shutil.copytree(tiny_model_dir, tmp_path / "workflow" / "resources" / "tiny-llama")
        arguments += ["--checkout", str(tmp_path / "workflow")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *arguments], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.strip(), "the benchmark printed no result"
