"""vectorlm/evaluate/harness.py: local lm-evaluation-harness tasks read from their own folder, greedy generations,
the comparison with the base model (the checks made before any job: tests/pipeline/test_evaluate_tasks.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO
from vectorlm.config import ConfigError, EvaluateConfig
from vectorlm.evaluate import harness as evaluate
from vectorlm.evaluate.harness import compare, evaluate_model, results_table, run_evaluate

pytest.importorskip("lm_eval")
SHIPPED_TASK = REPO / "examples" / "tiny" / "eval" / "tiny_stories_cloze.yaml"


@pytest.fixture
def local_task(tmp_path) -> Path:
    """The shipped task with its first 12 items, in a folder of its own."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(SHIPPED_TASK, folder)
    items = SHIPPED_TASK.with_suffix(".jsonl").read_text().splitlines()[:12]
    (folder / "tiny_stories_cloze.jsonl").write_text("\n".join(items) + "\n")
    return folder / SHIPPED_TASK.name


def test_a_local_task_reads_its_data_from_its_folder_and_generations_are_greedy(tiny_model_dir, local_task, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the task's relative data_files must not be looked for here
    settings = EvaluateConfig(tasks=("../tasks/tiny_stories_cloze.yaml",), prompts=("Once upon", "Every day,"),
                              max_new_tokens=6)  # fmt: skip
    paths = {name: tmp_path / "out" / name for name in ("results.json", "results.md", "generations.jsonl")}
    results = evaluate_model(tiny_model_dir, settings, output_dir=tmp_path / "out")
    assert Path.cwd() == elsewhere
    scores = json.loads(paths["results.json"].read_text())["results"]["tiny_stories_cloze"]
    assert scores == results["results"]["tiny_stories_cloze"]
    assert scores["sample_len"] == 12 and scores["acc,none"] in {i / 12 for i in range(13)}
    assert "|tiny_stories_cloze|" in paths["results.md"].read_text()
    # The generations are the model's own greedy continuations, computed here without the harness.
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    generations = [json.loads(line) for line in paths["generations.jsonl"].read_text().splitlines()]
    for generation in generations:
        inputs = tokenizer(generation["prompt"], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
        assert generation["generation"] == tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :],
                                                            skip_special_tokens=True)  # fmt: skip
    assert [g["prompt"] for g in generations] == ["Once upon", "Every day,"]


def test_the_comparison_with_the_base_model_lists_every_metric_of_the_trained_one():
    base = {"cloze": {"acc,none": 0.25, "acc_stderr,none": 0.04, "alias": "cloze", "sample_len": 100}}
    trained = {"cloze": {"acc,none": 0.75, "acc_stderr,none": 0.04, "acc_norm,none": 0.5, "sample_len": 100}}
    rows = compare(base, trained)
    assert rows == [
        {"task": "cloze", "metric": "acc,none", "base": 0.25, "trained": 0.75, "change": 0.5},
        {"task": "cloze", "metric": "acc_norm,none", "base": None, "trained": 0.5, "change": None},
    ]
    table = results_table({"results": trained, "compared_to_base": rows, "versions": {"cloze": 1},
                           "n-shot": {"cloze": 0}, "higher_is_better": {"cloze": {"acc": True, "acc_norm": True}}})  # fmt: skip
    assert "| cloze | acc,none | 0.2500 | 0.7500 | +0.5000 |" in table
    assert "| cloze | acc_norm,none | n/a | 0.5000 | n/a |" in table
    assert "|cloze|      1|none  |     0|acc     |↑  | 0.75|±  |  0.04|" in table  # the harness's own table below


def test_the_base_models_evaluation_is_made_once_and_shared(tiny_model_dir, local_task, tmp_path, monkeypatch):
    """Two experiments on one base model with the same settings: the base model is evaluated once, into the cache
    entry, and each experiment's evaluate/base holds a copy that its comparison uses; the trained model's files are
    its own."""
    trained = tmp_path / "trained"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # another model: other generations
    model.save_pretrained(trained)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(trained)
    settings = EvaluateConfig(tasks=(str(local_task),), prompts=("Once",), max_new_tokens=3)
    entry = tmp_path / "cache" / "evaluate" / "key"
    evaluated = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(
        evaluate, "evaluate_model", lambda model, *a, **k: evaluated.append(model) or real(model, *a, **k)
    )
    first = run_evaluate(trained, settings, output_dir=tmp_path / "one", base_dir=tiny_model_dir, base_entry=entry)
    second = run_evaluate(trained, settings, output_dir=tmp_path / "two", base_dir=tiny_model_dir, base_entry=entry)
    assert evaluated == [tiny_model_dir, trained, trained]  # the base model once
    assert (tmp_path / "one" / "generations.jsonl").read_text() != (entry / "generations.jsonl").read_text()
    assert sorted(p.name for p in entry.iterdir()) == ["generations.jsonl", "results.json", "results.md"]
    assert not list(entry.parent.glob("*.partial-*"))
    for out, results in ((tmp_path / "one", first), (tmp_path / "two", second)):
        assert (out / "base" / "results.json").read_text() == (entry / "results.json").read_text()
        base = json.loads((entry / "results.json").read_text())["results"]["tiny_stories_cloze"]["acc,none"]
        row = next(r for r in results["compared_to_base"] if r["metric"] == "acc,none")
        assert row["base"] == base and row["trained"] == results["results"]["tiny_stories_cloze"]["acc,none"]
        assert json.loads((out / "results.json").read_text())["vectorlm"]["model_dir"] == str(trained)
    # Without the comparison, no earlier base files stay beside the new results.
    run_evaluate(trained, EvaluateConfig(prompts=("Once",), max_new_tokens=3), output_dir=tmp_path / "one")
    assert not (tmp_path / "one" / "base").exists()


def test_prompts_go_through_the_chat_template_given_for_the_base_model(tiny_model_dir, tmp_path):
    """The base model is given the template training used (data.chat_template), so both are prompted alike."""
    template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% endfor %}[assistant]"
    settings = EvaluateConfig(prompts=("a story",), max_new_tokens=5, apply_chat_template=True)
    paths = {name: tmp_path / name for name in ("results.json", "results.md", "generations.jsonl")}
    evaluate_model(tiny_model_dir, settings, output_dir=tmp_path, chat_template=template)
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    inputs = tokenizer("<s>[user] a story[assistant]", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**inputs, do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert json.loads(paths["generations.jsonl"].read_text())["generation"] == expected
    assert json.loads(paths["results.json"].read_text())["vectorlm"]["chat_template"] is True


def test_an_evaluate_section_needs_tasks_or_prompts():
    with pytest.raises(ConfigError, match="needs evaluate.tasks or evaluate.prompts"):
        EvaluateConfig()
    with pytest.raises(ConfigError, match="evaluate.tasks lists a.yaml more than once"):
        EvaluateConfig(tasks=("a.yaml", "a.yaml"))
