"""The Snakemake workflow itself: a real run of the whole DAG on a tiny config, what reruns after an edit, the
shipped configs, lint and formatting, and bad input caught when the DAG is built."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, write_jsonl
from tests.train.test_attention import tiny_gemma2

pytestmark = pytest.mark.workflow

TINY = {
    "model": "resources/tiny-llama",
    "output_dir": "results/tiny-test",
    "max_seq_len": 128,
    "data": {"train": "corpus.jsonl", "eval_fraction": 0.1},
    "train": {
        "max_steps": 12, "lr": 3.0e-3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 2,
        "eval_every": 6, "log_every": 1, "checkpoint_every": 3,
    },
    "export": {"smoke_test_prompt": "Once upon"},
    "evaluate": {
        "tasks": [str(REPO / "examples" / "tiny" / "eval" / "tiny_stories_cloze.yaml")], "limit": 100,
        "prompts": ["Once upon a time", "Every day,"], "max_new_tokens": 8, "compare_base": True,
    },
}  # fmt: skip


def snakemake(workdir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs Snakemake on this repository's Snakefile in ``workdir``; SIGINT at the limit (it ignores SIGTERM)."""
    command = [
        "timeout", "-s", "INT", "-k", "30", str(timeout), sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=False)


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    if "Nothing to be done" in output:
        return set()
    table = output.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def write_config(workdir: Path, config: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_rows):
    """The whole DAG, from building the example model to hf_model, on a tiny config."""
    workdir = tmp_path_factory.mktemp("workflow")
    write_jsonl(workdir / "corpus.jsonl", corpus_rows[:300])
    config = write_config(workdir, TINY)
    result = snakemake(workdir, f"--configfile={config}", "all")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    return workdir, config


def test_whole_pipeline_produces_a_loadable_model_that_learned(finished_run):
    workdir, _ = finished_run
    out = workdir / "results" / "tiny-test"
    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf_model")
    generated = model.generate(**tokenizer("Once upon", return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > len(tokenizer("Once upon")["input_ids"])
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0
    assert (out / "checkpoints" / "step_12" / ".metadata").is_file()
    assert (out / "consolidated" / "model.safetensors.index.json").is_file()
    resolved = yaml.safe_load((out / "hf_model" / "vectorlm_config.yaml").read_text())
    assert resolved["train"]["lr"] == 3.0e-3 and resolved["data"]["train"] == "corpus.jsonl"
    for log in ("tokenize/corpus", "pack", "train", "consolidate", "convert_hf"):  # tokenize: a log per source
        assert (out / "logs" / f"{log}.log").stat().st_size > 0, log
    assert "smoke test: 'Once upon' ->" in (out / "logs" / "convert_hf.log").read_text()
    # The report: a figure per aspect (readable: not blank) and a summary with the run's numbers.
    import matplotlib.image

    for figure in ("loss", "optimization", "throughput", "data"):
        pixels = matplotlib.image.imread(out / "report" / f"{figure}.png")
        assert pixels.shape[1] > 1000 and np.std(pixels[..., :3]) > 0.05, figure
    report = (out / "report" / "summary.md").read_text()
    assert f"{summary['final_eval_loss']:.4f} after 12 steps" in report and str(out / "hf_model") in report


def drawn_fraction(png: bytes) -> float:
    """The share of a screenshot's pixels that differ from its most common colour (the background)."""
    import io

    import matplotlib.image

    pixels = (matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint8)
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    return float(np.any(flat != colours[counts.argmax()], axis=1).mean())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_snakemake_report_shows_every_figure_in_a_browser(finished_run, tmp_path):
    """`snakemake --report report.html` as a person sees it, in headless Chromium: the stages' categories, each
    figure drawn at its full size with its caption, and the summary."""
    from playwright.sync_api import sync_playwright

    workdir, config = finished_run
    result = snakemake(workdir, f"--configfile={config}", "--report", str(tmp_path / "report.html"))
    assert result.returncode == 0, result.stdout + result.stderr
    figures = {"train": {"loss": "loss", "learning rate and gradient norm": "optimization",
                         "throughput and MFU": "throughput"},
               "tokenize and pack": {"document lengths and packing fill": "data"}}  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto((tmp_path / "report.html").as_uri())
        assert "Fine-tuning run results/tiny-test" in page.inner_text("body")
        first = page.screenshot(path=tmp_path / "report.png")
        assert drawn_fraction(first) > 0.05, "the report's first page is blank"
        for category, labels in figures.items():
            for label, name in labels.items():
                page.goto((tmp_path / "report.html").as_uri())  # the report's pages are not in the browser history
                page.get_by_role("link", name=category, exact=True).click()
                row = page.locator("tr", has_text=label)
                row.locator("a[iconname=eye]").click()
                image = page.locator(f"img[src*='filename={name}.png']")
                width, height = image.evaluate("e => [e.naturalWidth, e.naturalHeight]")
                png = (workdir / "results" / "tiny-test" / "report" / f"{name}.png").read_bytes()
                assert (width, height) == (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
                assert drawn_fraction(image.screenshot()) > 0.05, f"{name}.png is blank in the report"
                row.locator("a[iconname=information-circle]").click()
                caption = (REPO / "rules" / "captions" / f"{name}.rst").read_text().split()[:4]
                assert " ".join(caption) in page.inner_text("body"), name
        page.goto((tmp_path / "report.html").as_uri())
        page.get_by_role("link", name="summary", exact=True).click()
        assert page.locator("tr", has_text="summary.md").count() == 1
        page.goto((tmp_path / "report.html").as_uri())
        page.get_by_role("link", name="evaluate", exact=True).click()
        assert page.locator("tr", has_text="results.md").count() == 1
        browser.close()


def test_a_finished_run_plans_nothing(finished_run):
    workdir, config = finished_run
    assert planned_jobs(snakemake(workdir, f"--configfile={config}", "-n")) == set()


def test_changing_lr_reruns_training_onward_only(finished_run):
    workdir, _ = finished_run
    edited = write_config(workdir, {**TINY, "train": {**TINY["train"], "lr": 1.0e-3}}, "lr.yaml")
    jobs = planned_jobs(snakemake(workdir, f"--configfile={edited}", "-n"))
    assert jobs == {"train", "consolidate", "convert_hf", "evaluate", "report", "all"}


def test_changing_max_seq_len_reruns_packing_onward(finished_run):
    workdir, _ = finished_run
    edited = write_config(workdir, {**TINY, "max_seq_len": 64}, "seq.yaml")
    jobs = planned_jobs(snakemake(workdir, f"--configfile={edited}", "-n"))
    assert jobs == {"estimate", "pack", "link_data", "train", "consolidate", "convert_hf", "evaluate", "report", "all"}


def test_the_estimate_ran_before_training_and_its_table_is_in_the_report(finished_run):
    workdir, _ = finished_run
    out = workdir / "results" / "tiny-test"
    estimate = json.loads((out / "estimate" / "estimate.json").read_text())
    assert estimate["target"]["world_size"] == 2 and estimate["settings"]["micro_batch_size"] == 2
    assert estimate["steps"] == 12 and estimate["memory"]["fits"] is None  # CPU ranks: no GPU memory to compare
    assert "| **peak** |" in (out / "logs" / "estimate.log").read_text()
    summary = (out / "report" / "summary.md").read_text()
    assert "## The estimate before training (rule estimate)" in summary and "| **peak** |" in summary


def test_another_gpu_redoes_the_estimate_and_reruns_no_training(finished_run):
    """The plan and the real run: a finished training does not wait for the estimate, so redoing it reruns only the
    report that shows it."""
    workdir, config = finished_run
    out = workdir / "results" / "tiny-test"
    train_log, model_time = (out / "logs" / "train.log").read_text(), (out / "hf_model" / "config.json").stat().st_mtime
    edited = write_config(workdir, {**TINY, "estimate": {"gpu": "H100", "gpu_memory": "40GB"}}, "gpu.yaml")
    assert planned_jobs(snakemake(workdir, f"--configfile={edited}", "-n")) == {"estimate", "report", "all"}
    result = snakemake(workdir, f"--configfile={edited}", "all")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads((out / "estimate" / "estimate.json").read_text())["memory"]["fits"] is True
    assert (out / "logs" / "train.log").read_text() == train_log
    assert (out / "hf_model" / "config.json").stat().st_mtime == model_time
    assert snakemake(workdir, f"--configfile={config}", "all").returncode == 0  # back, for the plans tested after


def test_a_run_that_will_not_fit_stops_before_training_with_the_levers(finished_run):
    """A 1 GB GPU cannot hold the CUDA context's allowance alone: the workflow stops after the estimate, naming the
    levers it tried and the key that makes it a warning, and train (whose lr changed) never starts; going back to
    the experiment as it was plans no training."""
    workdir, config = finished_run
    out = workdir / "results" / "tiny-test"
    train_log = (out / "logs" / "train.log").read_text()
    tiny = {**TINY, "train": {**TINY["train"], "lr": 1.0e-3}, "estimate": {"gpu": "H100", "gpu_memory": "1GB"}}
    result = snakemake(workdir, f"--configfile={write_config(workdir, tiny, 'small.yaml')}", "all")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    log = (out / "logs" / "estimate.log").read_text()
    assert "more than the 0.9 GiB of a H100 (estimate.gpu_memory); train was not queued" in log
    assert "- train.activation_checkpointing: full: peak" in log
    assert "train was not queued" in output and "set estimate.check: warn" in output
    assert (out / "logs" / "train.log").read_text() == train_log  # training never started
    assert (out / "hf_model" / "config.json").is_file()
    back = snakemake(workdir, f"--configfile={config}", "all")  # the experiment as it was: the estimate, no training
    assert back.returncode == 0, back.stdout + back.stderr[-3000:]
    assert (out / "logs" / "train.log").read_text() == train_log


def test_changing_the_smoke_test_reruns_only_convert_hf(finished_run):
    workdir, _ = finished_run
    edited = write_config(workdir, {**TINY, "export": {"smoke_test": False}}, "export.yaml")
    jobs = planned_jobs(snakemake(workdir, f"--configfile={edited}", "-n"))
    assert jobs == {"convert_hf", "evaluate", "report", "all"}


def test_evaluate_writes_both_models_results_side_by_side(finished_run):
    """The evaluation's files and their agreement; that training wins on the task is tested on the embedded default
    (tests/test_reruns.py), whose 200 steps are enough to learn it, unlike these 12."""
    workdir, _ = finished_run
    out = workdir / "results" / "tiny-test" / "evaluate"
    trained = json.loads((out / "results.json").read_text())["results"]["tiny_stories_cloze"]
    base = json.loads((out / "base" / "results.json").read_text())["results"]["tiny_stories_cloze"]
    assert trained["sample_len"] == base["sample_len"] == 100  # evaluate.limit
    compared = json.loads((out / "results.json").read_text())["compared_to_base"]
    assert {"task": "tiny_stories_cloze", "metric": "acc,none", "base": base["acc,none"],
            "trained": trained["acc,none"], "change": trained["acc,none"] - base["acc,none"]} in compared  # fmt: skip
    row = f"| tiny_stories_cloze | acc,none | {base['acc,none']:.4f} | {trained['acc,none']:.4f} |"
    assert row in (out / "results.md").read_text()
    assert row in (workdir / "results" / "tiny-test" / "logs" / "evaluate.log").read_text()
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == ["Once upon a time", "Every day,"]
    assert all(g["generation"].strip() for g in generations)
    (entry,) = (workdir / "results" / "cache" / "evaluate").iterdir()  # the base model's, for other experiments too
    assert (entry / "results.json").read_text() == (out / "base" / "results.json").read_text()


def test_changing_what_is_evaluated_reruns_only_the_evaluations(finished_run):
    workdir, _ = finished_run
    prompts = write_config(workdir, {**TINY, "evaluate": {**TINY["evaluate"], "prompts": ["Once"]}}, "prompts.yaml")
    assert planned_jobs(snakemake(workdir, f"--configfile={prompts}", "-n")) == {"evaluate", "all"}
    batch = write_config(workdir, {**TINY, "evaluate": {**TINY["evaluate"], "batch_size": 2}}, "batch.yaml")
    assert planned_jobs(snakemake(workdir, f"--configfile={batch}", "-n")) == set()  # how, not what
    alone = write_config(workdir, {**TINY, "evaluate": {**TINY["evaluate"], "compare_base": False}}, "alone.yaml")
    assert planned_jobs(snakemake(workdir, f"--configfile={alone}", "-n")) == {"evaluate", "all"}


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (["train:tasks=3"], "must be divisible by train.micro_batch_size (2) x world size (3) = 6"),
        (["train:tasks=3", "train:nodes=2"], "resources: train tasks (3) must be divisible by nodes (2)"),
        (["train:gres='gpu:2'"], "resources: train needs tasks_per_gpu: 1 with GPUs"),
    ],
)
def test_resources_that_cannot_work_fail_before_any_job(finished_run, resources, message):
    workdir, _config = finished_run
    edited = write_config(workdir, {**TINY, "train": {**TINY["train"], "lr": 1.0e-3}}, "lr.yaml")
    result = snakemake(workdir, f"--configfile={edited}", "--set-resources", *resources, "--", "all")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Job stats" not in result.stdout + result.stderr
    assert (workdir / "results" / "tiny-test" / "hf_model" / "config.json").is_file()


def test_killed_run_resumes_after_unlock_and_ends_with_the_same_model(finished_run, tmp_path, corpus_rows):
    reference_dir, _ = finished_run
    write_jsonl(tmp_path / "corpus.jsonl", corpus_rows[:300])
    shutil.copytree(reference_dir / "resources", tmp_path / "resources")  # the same example model, not rebuilt
    config = write_config(tmp_path, TINY)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--cores", "2", f"--configfile={config}", "all"]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "results" / "tiny-test" / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (metrics.is_file() and '"step": 5,' in metrics.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "training did not reach step 5"
            time.sleep(0.05)
    finally:  # the kill under test, and the clean-up when the wait fails
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert snakemake(tmp_path, f"--configfile={config}", "all").returncode != 0  # the killed run left its lock
    assert snakemake(tmp_path, f"--configfile={config}", "--unlock").returncode == 0
    result = snakemake(tmp_path, f"--configfile={config}", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "resumed from results/tiny-test/checkpoints/step_"
        in (tmp_path / "results/tiny-test/logs/train.log").read_text()
    )
    ours = safetensors_tensors(tmp_path / "results" / "tiny-test" / "hf_model")
    reference = safetensors_tensors(reference_dir / "results" / "tiny-test" / "hf_model")
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    assert planned_jobs(snakemake(tmp_path, f"--configfile={config}", "-n")) == set()


def safetensors_tensors(directory: Path) -> dict:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


BAD_INPUTS = [
    ({"model": "no/such/model"}, "config key model: model directory no/such/model does not exist"),
    ({"data": {"train": "missing.jsonl"}}, "config key data.train: data file missing.jsonl does not exist"),
    ({"train": {"learning_rate": 0.1}}, "unknown config key train.learning_rate"),
    ({"train": {"lr": "fast"}}, "config key train.lr: 'fast' is not of type 'number'"),
    ({"data": {"train": "corpus.jsonl", "text_field": "body"}}, "rows have no field 'body' (config key data.text_field)"),
    ({"data": {"train": "corpus.csv"}}, "corpus.csv: unsupported data format '.csv'"),
    ({"data": {"train": "corpus.jsonl", "prompt_field": "q", "response_field": "a"}}, "rows have no field 'q' (config key data.prompt_field)"),
    ({"data": {"train": "empty.jsonl"}}, "config key data.train: data file empty.jsonl is empty"),
    ({"data": {"train": "blank.jsonl"}}, "config key data.train: data file blank.jsonl has no rows"),
    ({"max_seq_len": 100000}, "config key max_seq_len: 100000 is above the model's max_position_embeddings (1024)"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, "train.global_batch_size (10) must be a multiple"),
    ({"output_dir": "results/{lr}"}, "config key output_dir: 'results/{lr}' contains { or }"),
    ({"model": "untokenized"}, "config key model: untokenized has no tokenizer"),
    ({"data": {"train": "array.json"}}, "array.json holds an empty JSON array: it has no rows"),
    ({"evaluate": {"tasks": ["hellaswagg"]}}, "evaluate.tasks[0]: lm-evaluation-harness has no task 'hellaswagg' (did you mean hellaswag"),
    ({"evaluate": {"tasks": ["no/such/task.yaml"]}}, "evaluate.tasks[0]: the task file no/such/task.yaml does not exist"),
    ({"evaluate": {}}, "the evaluate section needs evaluate.tasks or evaluate.prompts"),
    ({"model": "gemma2", "train": {**TINY["train"], "attention": "sdpa"}}, "train.attention: Gemma2ForCausalLM does not support sdpa; it supports flash_attention_2, flex_attention, eager"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS, ids=[m.split(":")[0][:40] for _, m in BAD_INPUTS])
def test_bad_input_fails_before_any_job_and_loses_nothing(finished_run, change, message):
    workdir, _ = finished_run
    (workdir / "empty.jsonl").write_text("")
    (workdir / "corpus.csv").write_text("text\nhello\n")
    (workdir / "blank.jsonl").write_text("\n\n")
    (workdir / "array.json").write_text("[]")
    if not (workdir / "gemma2").exists():
        tiny_gemma2(workdir / "gemma2", workdir / "resources" / "tiny-llama")
    if not (workdir / "untokenized").exists():
        shutil.copytree(workdir / "resources" / "tiny-llama", workdir / "untokenized",
                        ignore=shutil.ignore_patterns("tokenizer*"))  # fmt: skip
    config = write_config(workdir, {**TINY, **change}, "bad.yaml")
    result = snakemake(workdir, f"--configfile={config}", "all")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert (workdir / "results" / "tiny-test" / "hf_model" / "config.json").is_file()


@pytest.mark.parametrize("path", sorted((REPO / "config").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_plans_the_whole_dag(path):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", "2", f"--configfile={path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "convert_hf" in result.stdout


def test_lint_finds_only_the_missing_conda_environments():
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lints = {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip().startswith("*")}
    assert lints == {"* Specify a conda environment or container for each rule.:"}


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=" ".join)
def test_ruff(command):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ruff"), *command], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "snakefmt"), "--check", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
