"""A sweep as a user runs it: a grid of 2 learning rates with 2 seeds on the embedded model in one DAG (one tokenize
and one pack job, four trainings), its report and best run; the plans after adding a run and after changing one; a run that fails
while the others finish."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.test_reruns import copy_workflow, snakemake

pytestmark = pytest.mark.workflow

SWEEP = {
    "model": "resources/tiny-llama",
    "output_dir": "results/sweep",
    "max_seq_len": 128,
    "data": {"train": "examples/tiny/corpus.jsonl", "eval_fraction": 0.02},
    "train": {"max_steps": 3, "micro_batch_size": 4, "global_batch_size": 8, "warmup_steps": 1, "log_every": 1,
              "eval_max_batches": 2, "attention": "sdpa"},
    "export": {"smoke_test": False},
    "sweep": {"grid": {"train.lr": [1.0e-3, 5.0e-3]}, "seeds": [0, 1]},  # grids of several keys: tests/pipeline
}  # fmt: skip
GRID = [f"lr-{lr}_seed-{seed}" for lr in ("0.001", "0.005") for seed in (0, 1)]
RUN_STAGES = {"estimate", "link_data", "train", "consolidate", "convert_hf", "report"}


def jobs(output: str) -> list[tuple[str, str | None]]:
    """(rule, run) of every job in Snakemake's output (a dry run's plan, or what a run executed): each job's block
    starts with its rule's line and may name its run among its wildcards."""
    found: list[list] = []
    for line in output.splitlines():
        if header := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line):
            found.append([header.group(1), None])
        elif found and (run := re.match(r"^\s+wildcards: .*?\brun=([^,\s]+)", line)):
            found[-1][1] = run.group(1)
    return [(rule, run) for rule, run in found]


def write(root: Path, name: str, config: dict) -> str:
    (root / name).write_text(yaml.safe_dump(config))
    return f"--configfile={name}"


@pytest.fixture(scope="module")
def sweep_repo(tmp_path_factory):
    """A copy of the workflow with the grid's sweep finished."""
    root = tmp_path_factory.mktemp("repo")
    copy_workflow(root)
    result = snakemake(root, write(root, "sweep.yaml", SWEEP), "all", minutes=25)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root, jobs(result.stdout + result.stderr)


def test_a_grid_with_seeds_runs_the_shared_stages_once_and_every_run_under_runs(sweep_repo):
    root, executed = sweep_repo
    rules = [rule for rule, _ in executed]
    assert rules.count("tokenize") == 1 and rules.count("pack") == 1 and rules.count("sweep_report") == 1
    assert sorted(run for rule, run in executed if rule == "train") == sorted(GRID)
    for run in GRID:
        summary = json.loads((root / "results/sweep/runs" / run / "train/summary.json").read_text())
        assert summary["step"] == 3 and (root / "results/sweep/runs" / run / "hf_model/config.json").is_file()
        config = yaml.safe_load((root / "results/sweep/runs" / run / "hf_model/vectorlm_config.yaml").read_text())
        assert config["train"]["lr"] == float(run.split("_")[0][3:]) and config["train"]["seed"] == int(run[-1])


def test_the_report_has_a_row_per_run_and_best_is_the_lowest_eval_loss(sweep_repo):
    root, _ = sweep_repo
    out = root / "results" / "sweep"
    result = json.loads((out / "sweep" / "runs.json").read_text())
    losses = {run: json.loads((out / "runs" / run / "train/summary.json").read_text())["final_eval_loss"]
              for run in GRID}  # fmt: skip
    assert [row["run"] for row in result["runs"]] == GRID
    assert result["best"] == min(losses, key=losses.get)
    assert (out / "best").resolve() == (out / "runs" / result["best"] / "hf_model").resolve()
    table = (out / "sweep" / "summary.md").read_text()
    assert sum(line.startswith("| lr-") and "finished" in line for line in table.splitlines()) == 4
    assert len(result["over_seeds"]) == 2 and all(g["runs"] == 2 for g in result["over_seeds"])
    assert (out / "sweep" / "eval_loss.png").stat().st_size > 10_000


def test_adding_a_run_plans_only_its_jobs_and_changing_one_replans_only_it(sweep_repo):
    root, _ = sweep_repo
    added = {**SWEEP, "sweep": {**SWEEP["sweep"], "runs": {"warm": {"train.warmup_steps": 2}}}}
    result = snakemake(root, "-n", write(root, "added.yaml", added), "all")
    assert result.returncode == 0, result.stdout + result.stderr
    planned = set(jobs(result.stdout))
    assert planned == {(rule, f"warm_seed-{seed}") for rule in RUN_STAGES for seed in (0, 1)} | {
        ("sweep_report", None), ("all", None)}  # fmt: skip
    one = {**SWEEP, "sweep": {"runs": {name: {"train.lr": 5.0e-3 if "lr-0.005" in name else 1.0e-3,
                                              "train.seed": int(name[-1])} for name in GRID}}}  # fmt: skip
    one["sweep"]["runs"][GRID[0]]["train.weight_decay"] = 0.05  # one run's override changed
    result = snakemake(root, "-n", write(root, "one.yaml", one), "all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(jobs(result.stdout)) == {(rule, GRID[0]) for rule in ("train", "consolidate", "convert_hf", "report")} | {
        ("sweep_report", None), ("all", None)}  # fmt: skip


def test_a_run_that_fails_leaves_the_others_and_the_report_names_it(sweep_repo):
    root, _ = sweep_repo
    failing = {**SWEEP, "sweep": {**SWEEP["sweep"], "seeds": [0], "runs": {"huge": {"train.global_batch_size": 4096,
                                                                                    "train.micro_batch_size": 4}}}}  # fmt: skip
    result = snakemake(root, write(root, "failing.yaml", failing), "--keep-going", "all", minutes=15)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    report = json.loads((root / "results/sweep/sweep/runs.json").read_text())
    rows = {row["run"]: row for row in report["runs"]}
    assert rows["huge_seed-0"]["status"] == "failed" and Path(root, rows["huge_seed-0"]["log"]).is_file()
    assert "global_batch_size" in Path(root, rows["huge_seed-0"]["log"]).read_text()
    assert all(rows[name]["status"] == "finished" for name in GRID if name.endswith("seed-0"))
    assert "1 of 3 runs have no finished training (huge_seed-0)" in output
