"""vectorlm/evaluate.py: local lm-evaluation-harness tasks read from their own folder, greedy generations, the
comparison with the base model, and the checks made before any job starts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO
from vectorlm.config import ConfigError, EvaluateConfig
from vectorlm.evaluate import (
    check_chat_template,
    check_tasks,
    compare,
    evaluate_model,
    installed_task_names,
    results_table,
    task_files,
)

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
    paths = {name: tmp_path / name for name in ("results.json", "results.md", "generations.jsonl")}
    results = evaluate_model(tiny_model_dir, settings, results_path=paths["results.json"],
                             table_path=paths["results.md"], generations_path=paths["generations.jsonl"])  # fmt: skip
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


def write_task(folder: Path, text: str, name: str = "task.yaml") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


def test_local_tasks_are_checked_before_any_job(tmp_path):
    cache = tmp_path / "names.json"
    missing_data = write_task(tmp_path / "a", "task: a\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                              "    test: items.jsonl\n")  # fmt: skip
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[1\]: .*task.yaml reads .*a/items.jsonl, which does not"):
        check_tasks(EvaluateConfig(tasks=(str(SHIPPED_TASK), missing_data)), names_cache=cache)
    nameless = write_task(tmp_path / "b", "dataset_path: json\n")
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\]: .*task.yaml defines no `task` name"):
        check_tasks(EvaluateConfig(tasks=(nameless,)), names_cache=cache)
    group = write_task(tmp_path / "g", "group: g\ntask: [a, b]\n")
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\]: .*task.yaml defines a group; list the YAML files"):
        check_tasks(EvaluateConfig(tasks=(group,)), names_cache=cache)
    # Two entries with one name: the harness would keep only one of them and report it under that name.
    copy = write_task(tmp_path / "d", SHIPPED_TASK.read_text(), "mine.yaml")
    shutil.copy(SHIPPED_TASK.with_suffix(".jsonl"), tmp_path / "d")
    with pytest.raises(
        ConfigError, match=r"evaluate.tasks\[1\]: evaluate.tasks\[0\] is also named 'tiny_stories_cloze'"
    ):
        check_tasks(EvaluateConfig(tasks=(str(SHIPPED_TASK), copy)), names_cache=cache)
    # What lm-evaluation-harness's own task files use: an include (its data files count) and !function tags.
    (tmp_path / "c" / "items.jsonl").parent.mkdir()
    write_task(tmp_path / "c", "dataset_path: json\ndataset_kwargs:\n  data_files: [items.jsonl]\n", "base.yaml")
    including = write_task(tmp_path / "c", "include: base.yaml\ntask: c\nprocess_docs: !function utils.process\n")
    with pytest.raises(ConfigError, match=r"reads .*c/items.jsonl, which does not exist"):
        check_tasks(EvaluateConfig(tasks=(including,)), names_cache=cache)
    (tmp_path / "c" / "items.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"reads .*c/utils.py, which does not exist"):  # the !function's module
        check_tasks(EvaluateConfig(tasks=(including,)), names_cache=cache)
    (tmp_path / "c" / "utils.py").write_text("def process(docs):\n    return docs\n")
    check_tasks(EvaluateConfig(tasks=(including,)), names_cache=cache)
    assert not cache.exists()  # local tasks alone never index the installed ones


def test_everything_a_local_task_reads_is_listed_for_its_fingerprint(tmp_path):
    """What rule evaluate fingerprints: a change to any of these files reruns the evaluations, however it is reached."""
    (tmp_path / "data").mkdir()
    for name in ("b.jsonl", "a.jsonl", "other.txt"):
        (tmp_path / "data" / name).write_text("{}\n")
    write_task(tmp_path / "tasks", "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ../data/*.jsonl\n"
                                   "    validation: [../data/other.txt]\n", "base.yaml")  # fmt: skip
    task = Path(write_task(tmp_path / "tasks", "include: base.yaml\ntask: t\nprocess_docs: !function helpers.f\n"))
    definitions, data = task_files(task)
    assert definitions == [task, task.parent / "base.yaml", task.parent / "helpers.py"]
    assert [p.resolve() for p in data] == [tmp_path / "data" / n for n in ("a.jsonl", "b.jsonl", "other.txt")]


def test_installed_task_names_are_indexed_once_per_installed_version(tmp_path, monkeypatch):
    cache = tmp_path / "names.json"
    names = installed_task_names(cache)
    assert {"hellaswag", "arc_easy", "mmlu"} <= names and len(names) > 1000
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\]: lm-evaluation-harness has no task 'arc_eazy' \(did "
                                          r"you mean arc_easy"):  # fmt: skip
        check_tasks(EvaluateConfig(tasks=("arc_eazy",)), names_cache=cache)

    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", None)  # indexing again would fail
    check_tasks(EvaluateConfig(tasks=("hellaswag",)), names_cache=cache)
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "version": "0.0.1 elsewhere"}))
    with pytest.raises(TypeError):  # another version: indexed again
        installed_task_names(cache)


def test_an_evaluate_section_without_the_harness_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'vectorlm-pipeline\[evaluate\]'"):
        check_tasks(EvaluateConfig(prompts=("Once",)), names_cache="unused.json")


def test_prompts_go_through_the_chat_template_given_for_the_base_model(tiny_model_dir, tmp_path):
    """The base model is given the template training used (data.chat_template), so both are prompted alike."""
    template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% endfor %}[assistant]"
    settings = EvaluateConfig(prompts=("a story",), max_new_tokens=5, apply_chat_template=True)
    paths = {name: tmp_path / name for name in ("results.json", "results.md", "generations.jsonl")}
    evaluate_model(tiny_model_dir, settings, results_path=paths["results.json"], table_path=paths["results.md"],
                   generations_path=paths["generations.jsonl"], chat_template=template)  # fmt: skip
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


def test_a_chat_template_is_required_before_any_job(tiny_model_dir):
    from vectorlm.config import Config

    raw = {"model": str(tiny_model_dir), "output_dir": "out", "max_seq_len": 64, "data": {"train": "x.jsonl"},
           "evaluate": {"prompts": ["Hi"], "apply_chat_template": True}}  # fmt: skip
    with pytest.raises(ConfigError, match="evaluate.apply_chat_template: the tokenizer of .* has no chat template"):
        check_chat_template(Config.from_dict(raw))
    chat = {"train": "x.jsonl", "messages_field": "messages", "chat_template": "{{ messages }}"}
    check_chat_template(Config.from_dict({**raw, "data": chat}))


def test_an_evaluate_section_needs_tasks_or_prompts():
    with pytest.raises(ConfigError, match="needs evaluate.tasks or evaluate.prompts"):
        EvaluateConfig()
    with pytest.raises(ConfigError, match="evaluate.tasks lists a.yaml more than once"):
        EvaluateConfig(tasks=("a.yaml", "a.yaml"))
