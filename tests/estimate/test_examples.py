"""The README's estimates of Llama-3.1-8B and 70B: every number in its tables is what the examples give today."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from vectorlm.config import load_config
from vectorlm.estimate.run_estimate import estimate_stage
from vectorlm.estimate.table import format_estimate


def readme_table(title: str) -> list[str]:
    """The rows of the README table whose header starts with ``title``."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {title}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            return rows
        rows.append(line)
    return rows


@pytest.mark.parametrize(
    ("example", "resources", "title"),
    [
        ("llama-3.1-8b.yaml", {"tasks": 8}, "Llama-3.1-8B, 8 x H100"),
        ("llama-3.1-70b-lora.yaml", {"tasks": 32, "nodes": 4}, "Llama-3.1-70B + LoRA, 32 x H100"),
    ],
)
def test_the_readme_shows_what_the_examples_estimate(example, resources, title, tmp_path):
    config = load_config(REPO / "examples" / example)
    result = estimate_stage(REPO / config.model, tmp_path / "estimate.json", train=config.train, lora=config.lora,
                            export=config.export, settings={"gpu": config.estimate.gpu}, max_seq_len=config.max_seq_len,
                            resources=resources)  # fmt: skip
    table = [line for line in format_estimate(result) if line.startswith("| ") and not line.startswith("| per GPU")]
    assert readme_table(title) == table
    facts = "\n".join(format_estimate(result)[len(table) + 4 :])
    readme = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    per_step = re.search(r"At 30% MFU: (\S+ \S+) per step, (\S+ \S+) in all, (\S+) tokens/s per GPU", facts).groups()
    assert f"{per_step[0]} per step" in readme and per_step[1] in readme and f"({per_step[2]} tokens/s" in readme


def test_snakemake_estimate_plans_the_estimate_alone_for_a_model_without_weights():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "estimate",
         "--configfile=examples/llama-3.1-8b.yaml", "--set-resources", "train:tasks=8"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    assert [line.split()[0] for line in table.splitlines()[3:] if line.strip()] == ["estimate"]
