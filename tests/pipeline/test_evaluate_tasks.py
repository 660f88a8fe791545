"""vectorlm/pipeline/evaluate_tasks.py: what the evaluate stage is asked to run, checked before any job, and every
file a local task reads (for the fingerprint that reruns the evaluations)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from vectorlm.config import Config, ConfigError, EvaluateConfig
from vectorlm.pipeline.evaluate_tasks import check_chat_template, check_tasks, installed_task_names, task_files

pytest.importorskip("lm_eval")
SHIPPED_TASK = REPO / "examples" / "tiny" / "eval" / "tiny_stories_cloze.yaml"


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


def test_an_evaluate_section_without_the_harness_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'vectorlm-pipeline\[evaluate\]'"):
        check_tasks(EvaluateConfig(prompts=("Once",)), names_cache="unused.json")


def test_a_chat_template_is_required_before_any_job(tiny_model_dir):
    raw = {"model": str(tiny_model_dir), "output_dir": "out", "max_seq_len": 64, "data": {"train": "x.jsonl"},
           "evaluate": {"prompts": ["Hi"], "apply_chat_template": True}}  # fmt: skip
    with pytest.raises(ConfigError, match="evaluate.apply_chat_template: the tokenizer of .* has no chat template"):
        check_chat_template(Config.from_dict(raw))
    chat = {"train": "x.jsonl", "messages_field": "messages", "chat_template": "{{ messages }}"}
    check_chat_template(Config.from_dict({**raw, "data": chat}))


def test_the_python_file_a_function_tag_runs_is_the_one_fingerprinted(tmp_path):
    """Which file lm-evaluation-harness runs for ``!function lib.fns.g``, asked of its own task loader: lib/fns.py
    beside the YAML (not lib.fns.py); that file is the one the evaluate stage's fingerprint watches."""
    from lm_eval.tasks._yaml_loader import load_yaml

    (tmp_path / "lib.fns.py").write_text("def g(docs):\n    return 'ran lib.fns.py'\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fns.py").write_text("def g(docs):\n    return 'ran lib/fns.py'\n")
    task = Path(write_task(tmp_path, "task: t\nprocess_docs: !function lib.fns.g\n"))
    assert load_yaml(task, resolve_func=True)["process_docs"](None) == "ran lib/fns.py"
    assert task_files(task)[0] == [task, tmp_path / "lib" / "fns.py"]
