"""What the evaluate stage is asked to run, checked when the DAG is built: lm-evaluation-harness task names and local
task files (YAML), with the files each local task reads (for the fingerprint that reruns the evaluation).

Light on purpose (no torch, no lm_eval import unless installed names must be indexed): this runs on every Snakemake
call. A local task's relative paths are read from its own folder, as vectorlm/evaluate/harness.py loads it there.
"""

from __future__ import annotations

import difflib
import glob
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from vectorlm.config import Config, ConfigError, EvaluateConfig
from vectorlm.evaluate.harness import is_local_task

INSTALL_HINT = "pip install 'vectorlm-pipeline[evaluate]'"


def local_task_files(settings: EvaluateConfig) -> dict[str, str]:
    """{role: path} of every file the local tasks of evaluate.tasks read (definitions, their Python functions, data),
    for the fingerprint of the evaluate stage."""
    files = {}
    for i, task in enumerate(settings.tasks):
        if is_local_task(task):
            definitions, data = task_files(Path(task))
            files.update({f"evaluate.tasks[{i}] {f}": str(f) for f in definitions + data})
    return files


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-evaluation-harness YAML without running it: its tags (``!function utils.process``) become text."""


_TaskLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}" if isinstance(node, yaml.ScalarNode)
    else f"!{suffix}"
)  # fmt: skip


def read_task_file(path: Path, _seen: set[Path] | None = None) -> tuple[dict[str, Any], list[Path]]:
    """A local task definition with what it ``include``s (a file or a list of them, from its own folder) merged
    under it, its own keys winning, as lm-evaluation-harness merges them (an included ``task_list`` is dropped, and a
    file is included once); and the files that make it up: the YAML files and the local Python modules of their
    ``!function`` tags (each resolved from the YAML file that holds it; a module that is not there is one the harness
    imports)."""
    _seen = set() if _seen is None else _seen
    if path.resolve() in _seen:
        raise ConfigError(f"{path} is included twice (or includes itself)")
    _seen.add(path.resolve())
    config = yaml.load(path.read_text(), Loader=_TaskLoader)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    files = [path]
    for value in _strings(config):
        if value.startswith("!function "):
            parts = value.split()
            if len(parts) != 2 or "." not in parts[1]:
                raise ConfigError(f"{path}: {value!r} names no module.function")
            module = path.parent / (parts[1].rsplit(".", 1)[0].replace(".", "/") + ".py")
            files += [module] if module.is_file() else []
    includes = config.get("include") or []
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        included, included_files = read_task_file(path.parent / include, _seen)
        included.pop("task_list", None)
        merged.update(included)
        files += included_files
    return {**merged, **config}, files


def task_files(path: Path) -> tuple[list[Path], list[Path]]:
    """What a local task reads: its definitions (:func:`read_task_file`) and its data: ``dataset_kwargs.data_files``
    (globs expanded; one that matches nothing is listed as it is, to be reported missing), and ``dataset_path`` or
    ``dataset_kwargs.data_dir`` where they name a local file or folder. Relative names are read as the harness's
    ``datasets.load_dataset`` reads them in the task file's folder: data files under a local dataset folder and
    ``data_dir``."""
    config, definitions = read_task_file(path)
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") or []
    entries = list(files.values()) if isinstance(files, dict) else [files]
    names = [name for entry in entries for name in ([entry] if isinstance(entry, str) else entry)]
    if bad := [name for name in names if not isinstance(name, str)]:
        raise ConfigError(f"{path}: dataset_kwargs.data_files holds {bad[0]!r}, not a file name")
    folder = path.parent
    local_path = config.get("dataset_path")
    if isinstance(local_path, str) and (path.parent / local_path).is_dir():
        folder /= local_path
    if isinstance(kwargs.get("data_dir"), str):
        folder /= kwargs["data_dir"]
    data = []
    for name in names:
        full = folder / name  # an absolute name stays itself
        matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True)) if glob.has_magic(name) else []
        data += matches or [full]
    for local in (config.get("dataset_path"), kwargs.get("data_dir")):
        if isinstance(local, str) and (path.parent / local).exists():
            data.append(path.parent / local)
    return definitions, data


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def check_tasks(settings: EvaluateConfig, *, names_cache: str | Path) -> None:
    """ConfigErrors naming ``evaluate.tasks[i]`` for what would fail in the job or go wrong silently: the harness not
    installed, a local task file that is missing, unreadable, a group, or reads missing files, a name the harness does
    not know, and two entries with one task name (the harness would keep one of them)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"the evaluate section needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    seen: dict[str, str] = {}
    for i, task in enumerate(settings.tasks):
        key = f"evaluate.tasks[{i}]"
        name = local_task_name(Path(task), key=key) if is_local_task(task) else task
        if not is_local_task(task) and task not in installed_task_names(names_cache, refresh_for=task):
            close = difflib.get_close_matches(task, installed_task_names(names_cache), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{key}: lm-evaluation-harness has no task {task!r}{hint}; a local task is the path of "
                              f"its YAML file")  # fmt: skip
        if name in seen:
            raise ConfigError(f"{key}: {seen[name]} is also named {name!r}; lm-evaluation-harness keeps one task per "
                              "name, so give each task its own name")  # fmt: skip
        seen[name] = key


def local_task_name(path: Path, *, key: str) -> str:
    """The name a local task file defines, after checking that it and everything it reads exist."""
    if not path.is_file():
        raise ConfigError(f"{key}: the task file {path} does not exist")
    try:
        config, _ = read_task_file(path)
        definitions, data = task_files(path)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{key}: cannot read the task file {path}: {error}") from error
    if "group" in config:
        raise ConfigError(f"{key}: {path} defines a group; list the YAML files of its tasks in evaluate.tasks instead "
                          "(local groups are not supported)")  # fmt: skip
    if not isinstance(config.get("task"), str) or not config["task"]:
        raise ConfigError(f"{key}: {path} defines no `task` name")
    if missing := [str(file) for file in definitions + data if not file.exists()]:
        raise ConfigError(f"{key}: {path} reads {', '.join(missing)}, which does not exist (relative data_files are "
                          "read from the task file's folder)")  # fmt: skip
    return config["task"]


def installed_task_names(cache: str | Path, *, refresh_for: str | None = None) -> set[str]:
    """The task, group and tag names lm-evaluation-harness ships, kept in ``cache`` per installed version: indexing
    its thousands of YAML files takes seconds, and this runs whenever the DAG is built. A name missing from the cache
    (``refresh_for``, e.g. a task just added to an editable install) indexes them again, once for that name."""
    cache = Path(cache)
    version = f"{importlib.metadata.version('lm_eval')} {importlib.util.find_spec('lm_eval').origin}"
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    fresh = refresh_for is None or refresh_for in stored.get("names", ()) or stored.get("refreshed_for") == refresh_for
    if stored.get("version") == version and fresh:
        return set(stored["names"])
    from lm_eval.tasks import TaskManager

    names = TaskManager().all_tasks
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"version": version, "names": names, "refreshed_for": refresh_for}))
    partial.replace(cache)  # atomic: a concurrent reader sees the old file or the new one
    return set(names)


def check_chat_template(config: Config) -> None:
    """evaluate.apply_chat_template needs a chat template: data.chat_template (which the exported model keeps, and the
    base model is given), or the base model's tokenizer's own."""
    if config.evaluate is None or not config.evaluate.apply_chat_template or config.data.chat_template is not None:
        return
    model = Path(config.model)
    if not model.is_dir():  # the example model, not built yet
        return
    tokenizer_config = model / "tokenizer_config.json"
    own = tokenizer_config.is_file() and json.loads(tokenizer_config.read_text()).get("chat_template")
    if not own and not any((model / name).exists() for name in ("chat_template.jinja", "chat_template.json")):
        raise ConfigError(f"evaluate.apply_chat_template: the tokenizer of {config.model} has no chat template; give "
                          "one in data.chat_template")  # fmt: skip
