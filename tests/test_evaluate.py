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
from vectorlm import evaluate
from vectorlm.config import ConfigError, EvaluateConfig
from vectorlm.eval_tasks import check_chat_template, check_tasks, installed_task_names, task_files
from vectorlm.evaluate import compare, evaluate_model, results_table, run_evaluate

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
    including = write_task(tmp_path / "c", "include: [base.yaml]\ntask: c\nprocess_docs: !function utils.process\n")
    with pytest.raises(ConfigError, match=r"reads .*c/items.jsonl, which does not exist"):
        check_tasks(EvaluateConfig(tasks=(including,)), names_cache=cache)
    (tmp_path / "c" / "items.jsonl").write_text("{}\n")
    check_tasks(EvaluateConfig(tasks=(including,)), names_cache=cache)  # no utils.py: a module the harness imports
    broken = write_task(tmp_path / "e", "task: e\nprocess_docs: !function\n")
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\]: .*'!function ' names no module.function"):
        check_tasks(EvaluateConfig(tasks=(broken,)), names_cache=cache)
    assert not cache.exists()  # local tasks alone never index the installed ones


def test_everything_a_local_task_reads_is_listed_for_its_fingerprint(tmp_path):
    """What rule evaluate fingerprints: a change to any of these files reruns the evaluations, however it is reached."""
    (tmp_path / "data").mkdir()
    for name in ("b.jsonl", "a.jsonl", "other.txt"):
        (tmp_path / "data" / name).write_text("{}\n")
    (tmp_path / "tasks" / "shared" / "lib").mkdir(parents=True)
    (tmp_path / "tasks" / "shared" / "lib" / "fns.py").write_text("def g(docs):\n    return docs\n")
    (tmp_path / "tasks" / "helpers.py").write_text("def f(docs):\n    return docs\n")
    write_task(tmp_path / "tasks" / "shared", "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
               "    test: ../data/**/*.jsonl\n    validation: [../data/other.txt]\nprocess_results: !function "
               "lib.fns.g\n", "base.yaml")  # fmt: skip
    task = Path(
        write_task(tmp_path / "tasks", "include: shared/base.yaml\ntask: t\nprocess_docs: !function helpers.f\n")
    )
    definitions, data = task_files(task)
    # Each !function from the folder of the file that holds it, dotted modules as folders.
    assert definitions == [task, task.parent / "helpers.py", task.parent / "shared" / "base.yaml",
                           task.parent / "shared" / "lib" / "fns.py"]  # fmt: skip
    # Data from the task file's folder, included files' too (the harness loads the task there); globs recursive.
    assert [p.resolve() for p in data] == [tmp_path / "data" / n for n in ("a.jsonl", "b.jsonl", "other.txt")]
    local = Path(write_task(tmp_path / "tasks", "task: l\ndataset_path: ../data\n", "local.yaml"))
    assert [p.resolve() for p in task_files(local)[1]] == [tmp_path / "data"]  # a local dataset folder
    # data_files under data_dir, as datasets reads them.
    under = Path(write_task(tmp_path / "tasks", "task: u\ndataset_path: json\ndataset_kwargs:\n  data_dir: ../data\n"
                                                "  data_files: a.jsonl\n", "under.yaml"))  # fmt: skip
    assert [p.resolve() for p in task_files(under)[1]] == [tmp_path / "data" / "a.jsonl", tmp_path / "data"]
    cycle = write_task(tmp_path / "loop", "include: task.yaml\ntask: x\n")
    with pytest.raises(ConfigError, match=r"evaluate.tasks\[0\]: .*task.yaml is included twice"):
        check_tasks(EvaluateConfig(tasks=(cycle,)), names_cache=tmp_path / "names.json")


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


def test_a_name_missing_from_the_index_indexes_again_once(tmp_path, monkeypatch):
    """A task added to an editable install since the index was made is found; a typo re-indexes only once."""
    import lm_eval.tasks

    cache = tmp_path / "names.json"
    names = sorted(installed_task_names(cache))
    cache.write_text(json.dumps({**json.loads(cache.read_text()), "names": [n for n in names if n != "arc_easy"]}))
    check_tasks(EvaluateConfig(tasks=("arc_easy",)), names_cache=cache)  # indexed again: now it is there
    assert "arc_easy" in json.loads(cache.read_text())["names"]
    with pytest.raises(ConfigError, match="has no task 'arc_eazy'"):
        check_tasks(EvaluateConfig(tasks=("arc_eazy",)), names_cache=cache)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", None)  # indexing again would fail
    with pytest.raises(ConfigError, match="has no task 'arc_eazy'"):
        check_tasks(EvaluateConfig(tasks=("arc_eazy",)), names_cache=cache)


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
