"""The layout of an experiment's output_dir and of the shared cache: the paths the docs promise (a public contract)."""

from pathlib import Path

from vectorlm.run_dir import CacheDir, RunDir, SweepDir, checkpoint_step


def test_the_documented_artifact_paths():
    run = RunDir("results/tiny")
    layout = {
        "tokenized": "tokenized", "packed": "packed", "metrics": "train/metrics.jsonl", "summary": "train/summary.json",
        "job": "train/job.yaml", "checkpoints": "checkpoints", "tracking": "tracking", "consolidated": "consolidated",
        "hf_model": "hf_model", "hf_adapter": "hf_adapter", "tokenize_logs": "logs/tokenize",
    }  # fmt: skip
    assert {name: getattr(run, name) for name in layout} == {k: Path("results/tiny", v) for k, v in layout.items()}
    assert run.log("tokenize/web") == Path("results/tiny/logs/tokenize/web.log")
    assert run.checkpoint(12) == Path("results/tiny/checkpoints/step_12") and checkpoint_step(run.checkpoint(12)) == 12
    assert checkpoint_step(Path("step_12.invalid")) is None and checkpoint_step(Path("archive")) is None
    report = run.report
    assert [report.root, *report.figures, report.summary] == [Path("results/tiny/report", p) for p in (
        "", "loss.png", "optimization.png", "throughput.png", "data.png", "summary.md")]  # fmt: skip
    evaluation = run.evaluate
    assert [evaluation.root, *evaluation.files, *evaluation.base.files] == [Path("results/tiny", p) for p in (
        "evaluate", "evaluate/results.json", "evaluate/results.md", "evaluate/generations.jsonl",
        "evaluate/base/results.json", "evaluate/base/results.md", "evaluate/base/generations.jsonl")]  # fmt: skip
    cache = CacheDir("results/cache")
    assert cache.tokenized("k1") == Path("results/cache/tokenized/k1")
    assert cache.packed("k2") == Path("results/cache/packed/k2")
    assert cache.log("pack", "k2") == Path("results/cache/logs/pack-k2.log")
    assert cache.evaluation("k3").results == Path("results/cache/evaluate/k3/results.json")
    assert RunDir(Path("a/b/")).name == "b"


def test_the_documented_sweep_paths():
    sweep = SweepDir("results/sweep")
    assert sweep.run("lr-1_seed-0") == RunDir("results/sweep/runs/lr-1_seed-0")
    assert [sweep.table, sweep.runs, sweep.figure, sweep.best, sweep.log("sweep_report")] == [
        Path("results/sweep", p) for p in (
            "sweep/summary.md", "sweep/runs.json", "sweep/eval_loss.png", "best", "logs/sweep_report.log")]  # fmt: skip
