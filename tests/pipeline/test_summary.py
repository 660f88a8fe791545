"""What the workflow prints when it succeeds, from what the stages wrote into the run directory."""

from __future__ import annotations

import json
import os

from tests.report.test_sweep_report import make_runs
from vectorlm.pipeline.summary import Sweep, failure_lines, interrupted_line, success_lines, summary_lines
from vectorlm.run_dir import RunDir, SweepDir

SETTINGS = {"tasks": ["cloze.yaml"], "prompts": [], "limit": None}
FINGERPRINT = {"code": "c", "data evaluate.tasks[0] cloze.yaml": "d"}


def finished(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "exp")
    run.train.mkdir(parents=True)
    run.summary.write_text(json.dumps({"initial_eval_loss": 6.25, "final_eval_loss": 0.5, "step": 200,
                                       "tokens_per_second": 11539.4, "world_size": 2}))  # fmt: skip
    run.hf_model.mkdir()
    run.packed.mkdir()
    (run.packed / "stats.json").write_text(json.dumps({"warnings": ["packing the train split lost 9% of its loss"]}))
    run.evaluate.root.mkdir()
    rows = [{"task": "cloze", "metric": "acc,none", "base": 0.235, "trained": 0.995},
            {"task": "cloze", "metric": "acc_norm,none", "base": None, "trained": 0.9}]  # fmt: skip
    made = {"settings": {**SETTINGS, "batch_size": 64}, "fingerprint": FINGERPRINT}  # batch_size: operational
    run.evaluate.results.write_text(json.dumps({"compared_to_base": rows, "vectorlm": made}))
    return run


def test_a_finished_run_prints_its_losses_model_evaluation_and_warnings(tmp_path):
    run = finished(tmp_path)
    lines = summary_lines(run, evaluate_settings=SETTINGS, evaluate_fingerprint=FINGERPRINT)
    speed = "11,539 tokens/s on 2 rank(s)"
    assert lines == [
        f"\nvectorlm: eval loss 6.2500 -> 0.5000 after 200 steps ({speed}); model: {run.hf_model}\n",
        "vectorlm: evaluate: cloze acc,none 0.2350 (base) -> 0.9950 (trained)",
        "vectorlm: evaluate: cloze acc_norm,none 0.9000",
        f"vectorlm: evaluation: {run.evaluate.table}\n",
        f"vectorlm: WARNING: packing the train split lost 9% of its loss (see {run.packed / 'stats.json'})\n",
    ]


def test_an_evaluation_of_other_settings_tasks_or_an_older_model_is_not_printed(tmp_path):
    run = finished(tmp_path)

    def evaluated(settings=SETTINGS, fingerprint=FINGERPRINT) -> bool:
        lines = summary_lines(run, evaluate_settings=settings, evaluate_fingerprint=fingerprint)
        return any("evaluate:" in line for line in lines)

    assert evaluated()
    assert not evaluated(settings={**SETTINGS, "limit": 10})
    assert not evaluated(fingerprint={**FINGERPRINT, "code": "edited"})
    assert not evaluated(settings=None)  # no evaluate section
    later = run.evaluate.results.stat().st_mtime + 10
    os.utime(run.hf_model, (later, later))  # a model exported after the evaluation
    assert not evaluated()


def test_a_run_that_stopped_early_prints_what_there_is(tmp_path):
    run = RunDir(tmp_path / "nothing-yet")
    assert summary_lines(run, evaluate_settings=None, evaluate_fingerprint=None) == []


def test_a_workflow_that_failed_because_training_was_interrupted_says_so_last(tmp_path):
    run = RunDir(tmp_path / "exp")
    assert interrupted_line(run) is None
    run.logs.mkdir(parents=True)
    run.log("train").write_text("12:00 INFO vectorlm.train.trainer: step 7/24 ...\n12:01 WARNING vectorlm: training "
                                "was interrupted by a stop signal (SIGTERM, SIGUSR1 or Ctrl-C) after saving a checkpoint "
                                "of step 7; rerun the same command to continue it (see logs/train.log)\n")  # fmt: skip
    assert interrupted_line(run).startswith("\nvectorlm: training was interrupted by a stop signal")
    written = run.log("train").stat().st_mtime
    assert interrupted_line(run, since=written + 1) is None  # an earlier workflow's interruption: not why this failed
    run.log("train").write_text("12:01 ERROR vectorlm: train failed: RuntimeError: training failed: ...\n")
    assert interrupted_line(run) is None


def test_a_sweep_prints_its_best_run_and_after_a_failure_writes_its_report_then_the_interruption_last(tmp_path):
    sweep = Sweep(SweepDir(tmp_path), make_runs(tmp_path), select="eval_loss")
    assert success_lines(RunDir(tmp_path / "unused"), sweep=sweep, evaluate_settings=None,
                         evaluate_fingerprint=None) == []  # a narrower target than all: no sweep report yet  # fmt: skip
    runs = [sweep.root.run(name) for name in sweep.runs]
    runs[1].log("train").write_text("12:01 WARNING vectorlm: training was interrupted by a stop signal after saving a "
                                    "checkpoint of step 3; rerun the same command to continue it\n")  # fmt: skip
    lines = failure_lines(runs, sweep=sweep, since=0.0)
    assert lines == [
        f"vectorlm: sweep: 1 of 4 runs have no finished training (lr-2_seed-1); report: {sweep.root.table}",
        (
            "\nvectorlm: training was interrupted by a stop signal after saving a checkpoint of step 3; rerun the same "
            "command to continue it\n"
        ),
    ]
    assert json.loads(sweep.root.runs.read_text())["best"] == "lr-2_seed-0"  # the report the failed workflow wrote
    assert success_lines(runs[0], sweep=sweep, evaluate_settings=None, evaluate_fingerprint=None) == [
        (
            f"\nvectorlm: sweep of 4 runs; best by eval_loss: lr-2_seed-0 ({tmp_path / 'best'}); report: "
            f"{sweep.root.table}\n"
        )
    ]


def test_a_failed_experiment_says_last_that_its_training_was_interrupted(tmp_path):
    run = RunDir(tmp_path / "exp")
    assert failure_lines([run], sweep=None, since=0.0) == []
    run.logs.mkdir(parents=True)
    run.log("train").write_text("WARNING vectorlm: training was interrupted after saving a checkpoint of step 7\n")
    assert failure_lines([run], sweep=None, since=0.0) == [
        "\nvectorlm: training was interrupted after saving a checkpoint of step 7\n"
    ]


def test_a_sweep_report_that_cannot_be_written_loses_not_the_interruption(tmp_path):
    sweep = Sweep(SweepDir(tmp_path), make_runs(tmp_path), select="eval_loss")
    sweep.root.best.mkdir()  # not a link the sweep made: the report refuses to replace it
    run = sweep.root.run("lr-1_seed-0")
    run.log("train").write_text("WARNING vectorlm: training was interrupted after saving a checkpoint of step 3\n")
    lines = failure_lines([run], sweep=sweep, since=0.0)
    assert lines[0].startswith("vectorlm: WARNING: the sweep's report could not be written: FileExistsError")
    assert lines[-1] == "\nvectorlm: training was interrupted after saving a checkpoint of step 3\n"
