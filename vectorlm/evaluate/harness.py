"""Evaluation of a Hugging Face model directory with lm-evaluation-harness (rule ``evaluate``).

Tasks are lm-evaluation-harness task names (its ``hf`` backend runs them) or local task files: a YAML task definition
whose relative ``data_files`` are read from the YAML's own folder, so a task and its data can live anywhere and be
used from any working directory (vectorlm/pipeline/evaluate_tasks.py checks them before any job). The results, a
table of them and greedy generations for a few prompts are written beside each other. The base model's evaluation,
for the comparison, is kept in a cache entry that experiments on the same base model share.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vectorlm.config import EvaluateConfig, to_plain
from vectorlm.run_dir import Evaluation

log = logging.getLogger(__name__)


def is_local_task(task: str) -> bool:
    """Whether an entry of evaluate.tasks is a local task file (else the name of one the harness ships)."""
    return task.endswith((".yaml", ".yml"))


def run_evaluate(
    model_dir: str | Path,
    settings: EvaluateConfig,
    *,
    output_dir: str | Path,
    base_dir: str | Path | None = None,
    base_entry: str | Path | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluates the model in ``model_dir`` into ``output_dir`` (:class:`~vectorlm.run_dir.Evaluation`), with
    ``provenance`` (e.g. the workflow's fingerprint of what it read) recorded in the results. With ``base_dir``, the
    base model is evaluated first into the cache entry ``base_entry`` (unless an experiment already did: the entry's
    name is a digest of everything its results depend on), copied beside the results (``base/``) and compared; it is
    given ``chat_template``, the template training used, which the exported model's tokenizer holds, so that both are
    prompted alike."""
    output = Evaluation(output_dir)
    base_results = None
    shutil.rmtree(output.base.root, ignore_errors=True)  # never an earlier comparison's files beside these
    if base_dir is not None:
        assert base_entry is not None
        entry = evaluate_base(base_dir, settings, entry=base_entry, chat_template=chat_template,
                              trust_remote_code=trust_remote_code)  # fmt: skip
        output.base.root.mkdir(parents=True)
        for source, target in zip(entry.files, output.base.files, strict=True):
            shutil.copyfile(source, target)
        base_results = output.base.results
    return evaluate_model(model_dir, settings, output_dir=output_dir, base_results=base_results,
                          trust_remote_code=trust_remote_code, provenance=provenance)  # fmt: skip


def evaluate_base(base_dir: str | Path, settings: EvaluateConfig, *, entry: str | Path, chat_template: str | None,
                  trust_remote_code: bool = False) -> Evaluation:  # fmt: skip
    """The base model's evaluation in the cache entry ``entry``, made now unless an experiment already did (the
    entry's name is a digest of everything its results depend on); entries appear whole, by rename."""
    entry = Evaluation(entry)
    if entry.results.is_file():
        log.info("the base model's evaluation was made by an earlier run: %s", entry.root)
        return entry
    log.info("evaluating the base model %s first, into %s", base_dir, entry.root)
    entry.root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{entry.root.name}.partial-", dir=entry.root.parent))
    evaluate_model(base_dir, settings, output_dir=partial, chat_template=chat_template,
                   trust_remote_code=trust_remote_code)  # fmt: skip
    if entry.root.is_dir() and not entry.results.is_file():
        shutil.rmtree(entry.root)  # incomplete (not made here: entries appear whole, by rename)
    try:
        partial.rename(entry.root)
    except OSError:  # another experiment made the same entry meanwhile
        shutil.rmtree(partial)
    return entry


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
    output_dir: str | Path,
    base_results: str | Path | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs ``settings.tasks`` on the model in ``model_dir`` (on a GPU when there is one, over all visible GPUs when
    there are several) and greedy generations for ``settings.prompts``; writes the results (JSON), a Markdown table
    (compared with ``base_results`` when given) and the generations (JSON lines) into ``output_dir``
    (:class:`~vectorlm.run_dir.Evaluation`).
    ``chat_template`` replaces the tokenizer's. Returns the results."""
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
                           "batch_size": settings.batch_size, "chat_template": settings.apply_chat_template,
                           "settings": to_plain(settings), **(provenance or {})}  # fmt: skip
    if base_results is not None:
        results["compared_to_base"] = compare(json.loads(Path(base_results).read_text())["results"], results["results"])
    output = Evaluation(output_dir)
    output.root.mkdir(parents=True, exist_ok=True)
    output.results.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    output.generations.write_text("".join(json.dumps(g) + "\n" for g in generations))
    table = results_table(results)
    output.table.write_text(table)
    log.info("results of %s:\n%s", model_dir, table)
    for generation in generations:
        log.info("%r -> %r", generation["prompt"], generation["generation"])
    del model  # before the next model is loaded (the trained one after the base): its memory, GPUs' included
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
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
