"""Evaluation of a Hugging Face model directory with lm-evaluation-harness (rules ``evaluate`` and ``evaluate_base``).

Tasks are lm-evaluation-harness task names (its ``hf`` backend runs them) or local task files: a YAML task definition
whose relative ``data_files`` are read from the YAML's own folder, so a task and its data can live anywhere and be
used from any working directory. The results, a table of them and greedy generations for a few prompts are written
beside each other; given the base model's results, the table compares them.
"""

from __future__ import annotations

import difflib
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

from vectorlm.config import ConfigError, EvaluateConfig

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'vectorlm-pipeline[evaluate]'"


def is_local_task(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-evaluation-harness YAML without running it: its tags (``!function utils.process``) become text."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix}")


def read_task_file(path: Path) -> dict[str, Any]:
    """A local task definition with what it ``include``s merged under it (its own keys win), as lm-evaluation-harness
    merges them."""
    config = yaml.load(path.read_text(), Loader=_TaskLoader)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    if isinstance(config.get("include"), str):
        config = {**read_task_file(path.parent / config["include"]), **config}
    return config


def task_data_files(path: Path) -> list[Path]:
    """The local files a task definition reads (``dataset_kwargs.data_files``), relative ones from its folder."""
    files = (read_task_file(path).get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    names = (
        [files]
        if isinstance(files, str)
        else [name for entry in files for name in ([entry] if isinstance(entry, str) else entry)]
    )
    return [path.parent / name for name in names]  # an absolute name stays itself


def check_tasks(settings: EvaluateConfig, *, names_cache: str | Path) -> None:
    """ConfigErrors naming ``evaluate.tasks[i]`` for what would fail in the job: lm-evaluation-harness not installed,
    a local task file that is missing, unreadable or reads missing data, or a name the harness does not know."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"the evaluate section needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    for i, task in enumerate(settings.tasks):
        key = f"evaluate.tasks[{i}]"
        if is_local_task(task):
            path = Path(task)
            if not path.is_file():
                raise ConfigError(f"{key}: the task file {task} does not exist")
            try:
                config = read_task_file(path)
            except (OSError, ValueError, yaml.YAMLError) as error:
                raise ConfigError(f"{key}: cannot read the task file {task}: {error}") from error
            if not config.get("task") and not config.get("group"):
                raise ConfigError(f"{key}: {task} defines no `task` (or `group`) name")
            if missing := [str(file) for file in task_data_files(path) if not file.exists()]:
                raise ConfigError(f"{key}: {task} reads {', '.join(missing)}, which does not exist (relative "
                                  f"data_files are read from the task file's folder)")  # fmt: skip
        elif task not in (names := installed_task_names(names_cache)):
            close = difflib.get_close_matches(task, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{key}: lm-evaluation-harness has no task {task!r}{hint}; a local task is the path of "
                              f"its YAML file")  # fmt: skip


def installed_task_names(cache: str | Path) -> set[str]:
    """The task, group and tag names lm-evaluation-harness ships, kept in ``cache`` per installed version: indexing
    its thousands of YAML files takes seconds, and this runs whenever the DAG is built."""
    cache = Path(cache)
    version = f"{importlib.metadata.version('lm_eval')} {importlib.util.find_spec('lm_eval').origin}"
    if cache.is_file() and (stored := json.loads(cache.read_text())).get("version") == version:
        return set(stored["names"])
    from lm_eval.tasks import TaskManager

    names = TaskManager().all_tasks
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"version": version, "names": names}))
    return set(names)


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
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Runs ``settings.tasks`` on the model in ``model_dir`` (on a GPU when there is one, over all visible GPUs when
    there are several) and greedy generations for ``settings.prompts``; writes the results (JSON), a Markdown table
    (compared with ``base_results`` when given) and the generations (JSON lines). Returns the results."""
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
