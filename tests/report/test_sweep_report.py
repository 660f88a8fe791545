"""The sweep's report from its runs' directories: every run a row (failed ones with their log), the mean and spread
over seeds, the best run by eval loss or by an evaluate metric, and {output_dir}/best linked to its model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from vectorlm.report.sweep_report import write_sweep_report
from vectorlm.run_dir import RunDir

RUNS = {"lr-1_seed-0": 0.9, "lr-1_seed-1": 0.7, "lr-2_seed-0": 0.5, "lr-2_seed-1": None}  # None: failed


def make_runs(root: Path) -> dict[str, dict]:
    for name, loss in RUNS.items():
        run = RunDir(root / "runs" / name)
        run.train.mkdir(parents=True)
        run.logs.mkdir()
        run.log("train").write_text("RuntimeError: out of memory\n")
        if loss is None:
            continue
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in [
            {"step": 0, "eval_loss": 2.0}, {"step": 4, "loss": 1.5, "tokens": 64, "tokens_per_second": 900.0,
                                             "mfu": 0.25}, {"step": 4, "eval_loss": loss}]))  # fmt: skip
        run.summary.write_text(json.dumps({"final_eval_loss": loss, "tokens_per_second": 900.0, "train_seconds": 3.5}))
        run.hf_model.mkdir()
        run.evaluate.root.mkdir()
        score = {"lr-1_seed-0": 0.8, "lr-1_seed-1": 0.6, "lr-2_seed-0": 0.7}[name]
        run.evaluate.results.write_text(json.dumps({"results": {"cloze": {"acc,none": score, "acc_stderr,none": 0.1}}}))
    return {name: {"train.lr": int(name[3]), "train.seed": int(name[-1])} for name in RUNS}


def test_every_run_is_a_row_and_the_lowest_eval_loss_is_best(tmp_path):
    result = write_sweep_report(tmp_path, make_runs(tmp_path))
    rows = {row["run"]: row for row in result["runs"]}
    assert [row["status"] for row in result["runs"]] == ["finished", "finished", "finished", "failed"]
    assert rows["lr-2_seed-1"]["log"].endswith("runs/lr-2_seed-1/logs/train.log")
    assert rows["lr-1_seed-0"]["mfu"] == 0.25 and rows["lr-1_seed-0"]["metrics"] == {"cloze/acc": 0.8}
    assert result["best"] == "lr-2_seed-0"
    assert (tmp_path / "best").resolve() == (tmp_path / "runs" / "lr-2_seed-0" / "hf_model").resolve()
    groups = {g["group"]: g for g in result["over_seeds"]}
    assert groups["lr-1"]["mean_eval_loss"] == pytest.approx(0.8)
    assert groups["lr-1"]["std_eval_loss"] == pytest.approx(statistics.stdev([0.9, 0.7]))
    assert (groups["lr-2"]["runs"], groups["lr-2"]["finished"]) == (2, 1)
    table = (tmp_path / "sweep" / "summary.md").read_text()
    assert table.count("| lr-") == 6  # four runs, two groups
    assert "failed (log: " in table and (tmp_path / "sweep" / "eval_loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "sweep" / "runs.json").read_text())["best"] == "lr-2_seed-0"


def test_an_evaluate_metric_selects_the_highest_and_the_link_moves(tmp_path):
    runs = make_runs(tmp_path)
    write_sweep_report(tmp_path, runs)
    result = write_sweep_report(tmp_path, runs, select="cloze/acc")
    assert result["best"] == "lr-1_seed-0"
    assert (tmp_path / "best").resolve() == (tmp_path / "runs" / "lr-1_seed-0" / "hf_model").resolve()


def test_a_run_without_its_model_is_failed_and_a_real_best_directory_is_left_alone(tmp_path):
    runs = make_runs(tmp_path)
    (tmp_path / "runs" / "lr-2_seed-0" / "hf_model").rmdir()  # trained, but its export failed
    result = write_sweep_report(tmp_path, runs)
    assert {row["run"]: row["status"] for row in result["runs"]}["lr-2_seed-0"] == "failed"
    assert result["best"] == "lr-1_seed-1"
    (tmp_path / "best").unlink()
    (tmp_path / "best").mkdir()
    with pytest.raises(FileExistsError, match="is not a link the sweep made"):
        write_sweep_report(tmp_path, runs)
