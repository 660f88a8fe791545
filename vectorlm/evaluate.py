"""Evaluation of a Hugging Face model directory with lm-evaluation-harness (rules ``evaluate`` and ``evaluate_base``).

Tasks are lm-evaluation-harness task names (its ``hf`` backend runs them) or local task files: a YAML task definition
whose relative ``data_files`` are read from the YAML's own folder, so a task and its data can live anywhere and be
used from any working directory. The results, a table of them and greedy generations for a few prompts are written
beside each other; given the base model's results, the table compares them.
"""

from __future__ import annotations

import difflib
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from vectorlm.config import Config, ConfigError, EvaluateConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vectorlm-pipeline[evaluate]'"


def is_local_task(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-evaluation-harness YAML without running it: its tags (``!function utils.process``) become text."""


_TaskLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: f"!{suffix} {loader.construct_scalar(node)}" if isinstance(node, yaml.ScalarNode)
    else f"!{suffix}"
)  # fmt: skip


def read_task_file(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """A local task definition with what it ``include``s merged under it (its own keys win), as lm-evaluation-harness
    merges them, and the YAML files read."""
    config = yaml.load(path.read_text(), Loader=_TaskLoader)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    if not isinstance(config.get("include"), str):
        return config, [path]
    included, files = read_task_file(path.parent / config["include"])
    return {**included, **config}, [path, *files]


def task_files(path: Path) -> tuple[list[Path], list[Path]]:
    """What a local task reads: its definitions (YAML, included YAML, the Python modules of its ``!function`` tags)
    and its data (``dataset_kwargs.data_files``, relative ones from the task file's folder, globs expanded)."""
    config, definitions = read_task_file(path)
    functions = {value.split()[1].rsplit(".", 1)[0] for value in _strings(config) if value.startswith("!function ")}
    definitions += [path.parent / f"{module}.py" for module in sorted(functions)]
    files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    names = [files] if isinstance(files, str) else [n for entry in files for n in ([entry] if isinstance(entry, str) else entry)]  # fmt: skip
    data = []
    for name in names:
        full = path.parent / name  # an absolute name stays itself
        data += sorted(Path(match) for match in glob.glob(str(full))) if glob.has_magic(name) else [full]
        if glob.has_magic(name) and not glob.glob(str(full)):
            data.append(full)  # matches nothing: reported as missing
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
    (``refresh_for``, e.g. a task just added to an editable install) indexes them again once."""
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


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_tasks(tasks: tuple[str, ...]) -> list[Any]:
    """Installed task names as they are; local task files as Task objects, built (which reads their data) inside
    their folder so that relative data_files are found there."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=not all(is_local_task(task) for task in tasks))
    loaded: list[Any] = []
    for task in tasks:
        if not is_local_task(task):
            loaded.append(task)
            continue
        path = Path(task).resolve()
        with working_directory(path.parent):
            loaded += manager.load([str(path)])["tasks"].values()
    return loaded


def evaluate_model(
    model_dir: str | Path,
    settings: EvaluateConfig,
    *,
    results_path: str | Path,
    table_path: str | Path,
    generations_path: str | Path,
    base_results: str | Path | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Runs ``settings.tasks`` on the model in ``model_dir`` (on a GPU when there is one, over all visible GPUs when
    there are several) and greedy generations for ``settings.prompts``; writes the results (JSON), a Markdown table
    (compared with ``base_results`` when given) and the generations (JSON lines). Returns the results.

    ``chat_template`` replaces the tokenizer's: the base model is given the one training used (data.chat_template,
    which the exported model's tokenizer holds), so that both models are prompted alike."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    model_args: dict[str, Any] = {"pretrained": str(Path(model_dir).resolve()), "dtype": "auto",
                                  "trust_remote_code": trust_remote_code, "batch_size": settings.batch_size}  # fmt: skip
    if torch.cuda.device_count() > 1:  # one process, the model's layers spread over the GPUs (device_map="auto")
        model_args["parallelize"] = True
    else:
        model_args["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("loading %s for evaluation on %s (CUDA_VISIBLE_DEVICES=%s)", model_dir,
             model_args.get("device", "all visible GPUs"), os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
    model = HFLM(**model_args)
    if chat_template is not None:
        model.tokenizer.chat_template = chat_template
    results: dict[str, Any] = {"results": {}}
    if settings.tasks:
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=load_tasks(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            apply_chat_template=settings.apply_chat_template,
            log_samples=False,
        )
        results.pop("samples", None)
    generations = generate(model.model, model.tokenizer, settings)
    # What the harness cannot record when it is given a loaded model (its config's model_args and device are null).
    results["vectorlm"] = {"model_dir": str(model_dir), "device": str(model.model.device), "parallelize":
                           model_args.get("parallelize", False), "dtype": str(model.model.dtype),
                           "batch_size": settings.batch_size, "chat_template": settings.apply_chat_template}  # fmt: skip
    if base_results is not None:
        results["compared_to_base"] = compare(json.loads(Path(base_results).read_text())["results"], results["results"])
    Path(results_path).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    Path(generations_path).write_text("".join(json.dumps(g) + "\n" for g in generations))
    table = results_table(results)
    Path(table_path).write_text(table)
    log.info("results of %s:\n%s", model_dir, table)
    for generation in generations:
        log.info("%r -> %r", generation["prompt"], generation["generation"])
    return results


def generate(model: Any, tokenizer: Any, settings: EvaluateConfig) -> list[dict[str, str]]:
    """Greedy continuations of ``settings.prompts`` (as a user turn of the chat template with
    ``settings.apply_chat_template``), one prompt at a time so that no padding is involved."""
    import torch

    generations = []
    for prompt in settings.prompts:
        if settings.apply_chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)  # fmt: skip
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=settings.max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        generations.append({"prompt": prompt, "generation": text})
    return generations


def scores(results: dict[str, dict[str, Any]]) -> dict[tuple[str, str], float]:
    """{(task, metric): value} of the numbers in lm-evaluation-harness's ``results`` (stderrs left out)."""
    return {
        (task, metric): float(value)
        for task, metrics in results.items()
        for metric, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in metric
        and metric not in ("sample_len", "sample_count")
    }  # fmt: skip


def compare(base: dict[str, Any], trained: dict[str, Any]) -> list[dict[str, Any]]:
    """The scores of both models side by side, for every (task, metric) the trained model has."""
    base_scores = scores(base)
    return [
        {"task": task, "metric": metric, "base": base_scores.get((task, metric)), "trained": value,
         "change": None if (task, metric) not in base_scores else value - base_scores[(task, metric)]}
        for (task, metric), value in scores(trained).items()
    ]  # fmt: skip


def results_table(results: dict[str, Any]) -> str:
    """The results as Markdown: the comparison with the base model when there is one, then lm-evaluation-harness's
    own table (groups too)."""
    if not results["results"]:
        return "No tasks were evaluated (evaluate.tasks is empty).\n"
    from lm_eval.utils import make_table

    table = make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
    if "compared_to_base" not in results:
        return table
    rows = ["| task | metric | base | trained | change |", "|---|---|---:|---:|---:|"]
    rows += [f"| {row['task']} | {row['metric']} | {_number(row['base'])} | {_number(row['trained'])} | "
             f"{_number(row['change'], sign=True)} |" for row in results["compared_to_base"]]  # fmt: skip
    return "\n".join(rows) + "\n\n" + table


def _number(value: float | None, *, sign: bool = False) -> str:
    return "n/a" if value is None else f"{value:+.4f}" if sign else f"{value:.4f}"
