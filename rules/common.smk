"""Shared helpers: the validated experiment config, artifact paths, each rule's slice of the config and the
fingerprints of what each rule reads.

Only light modules are imported here (no torch, transformers or datasets): this runs on every Snakemake call,
dry runs included.
"""

import importlib.metadata
import json
import re
from pathlib import Path

from vectorlm.attention_support import check_attention
from vectorlm.config import OPERATIONAL_KEYS, Config, to_plain
from vectorlm.data.cache import cache_key
from vectorlm.eval_tasks import (
    check_chat_template,
    check_tasks,
    is_local_task,
    task_files,
)
from vectorlm.fingerprint import FileDigests, code_digest, model_digests, tree_digest
from vectorlm.inputs import check_inputs
from vectorlm.placement import check_train_resources
from vectorlm.tracking import check_backends

# The embedded example's base model is built by rule build_example instead of being downloaded.
EXAMPLE_MODEL = "resources/tiny-llama"
EXAMPLE_CORPUS = f"{workflow.basedir}/examples/tiny/corpus.jsonl"
EXAMPLE_SIZES = {"vocab_size": 512, "hidden_size": 128, "num_layers": 4, "num_heads": 4}

# Schema (unknown keys, types, defaults) and meaning (e.g. batch divisibility) are checked here, when the DAG is
# built, and so are the input paths: a mistake fails before any job starts.
CFG = Config.from_dict(config)
check_inputs(CFG, model_will_be_built=CFG.model == EXAMPLE_MODEL)
check_backends(CFG.train.report_to)
if CFG.evaluate is not None:
    check_tasks(CFG.evaluate, names_cache=".snakemake/vectorlm-lm-eval-tasks.json")
    check_chat_template(CFG)
# Jobs read settings that are not in their params (OPERATIONAL_KEYS) from the config, with defaults filled in.
config.update(CFG.to_dict())

# Reruns follow content (vectorlm/fingerprint.py): each rule's params carry digests of its code, its input data and
# the model files it reads; external inputs are ancient() so that their timestamps trigger nothing, and the workflow
# profile (profiles/default) turns off Snakemake's timestamp-based code trigger.
DIGESTS = FileDigests(".snakemake/vectorlm-fingerprints.json")
# The example model is not there before build_example makes it, so what makes it (code, corpus, sizes) stands for it.
MODEL_DIGESTS = (
    dict.fromkeys(
        ("files", "weights"),
        "made by build_example "
        + cache_key(
            {
                "code": code_digest(
                    Path(workflow.basedir, "workflow_scripts", "build_example.py")
                ),
                "corpus": tree_digest(DIGESTS, EXAMPLE_CORPUS),
                "sizes": EXAMPLE_SIZES,
            }
        ),
    )
    if CFG.model == EXAMPLE_MODEL
    else model_digests(DIGESTS, CFG.model)
)
# An explicit train.attention the model does not support fails here (the answer is kept per model).
check_attention(
    CFG,
    cache=".snakemake/vectorlm-attention.json",
    model_digest=MODEL_DIGESTS["files"],
)


def fingerprint(script, *, data=None, model=()):
    """Digests of the workflow script ``script`` with the package code it runs, of the ``data`` ({role: path}), and
    of the model's ``files`` and/or ``weights``."""
    digests = {"code": code_digest(Path(workflow.basedir, "workflow_scripts", script))}
    digests.update(
        {
            f"data {role}": tree_digest(DIGESTS, path)
            for role, path in (data or {}).items()
        }
    )
    digests.update({f"model {part}": MODEL_DIGESTS[part] for part in model})
    DIGESTS.save()
    return digests


def model_input():
    """The base model as an input: ancient (content is fingerprinted) unless rule build_example makes it."""
    return CFG.model if CFG.model == EXAMPLE_MODEL else ancient(CFG.model)


def without_operational(section, values):
    """``values`` (a config section) without the settings that never change what a stage writes."""
    return {
        k: v for k, v in values.items() if k not in OPERATIONAL_KEYS.get(section, ())
    }


def out(path):
    """An artifact path inside this experiment's output_dir."""
    return f"{CFG.output_dir}/{path}"


# The sources of data.train by name: (config key, settings); each is tokenized by a job of its own.
SOURCES = {
    source.name: (key, source)
    for (key, _), source in zip(CFG.data.paths.items(), CFG.data.sources)
}
FIRST_SOURCE = next(iter(SOURCES))


def source_paths(name):
    """{role: path} of the files the tokenize job of source ``name`` reads: data.eval goes with the first source."""
    paths = {"train": SOURCES[name][1].data.train}
    if CFG.data.eval is not None and name == FIRST_SOURCE:
        paths["eval"] = CFG.data.eval
    return paths


def source_settings(name):
    """What tokenize uses of data.* for source ``name``: packing, chunk_overlap and the weights belong to pack, so
    they do not re-tokenize. Its config key is not among them (read at run time): moving a source in the list must
    not make it another cache entry."""
    _, source = SOURCES[name]
    data = without_operational("data", to_plain(source.data))
    del data["packing"], data["chunk_overlap"]
    data["eval"] = source_paths(name).get("eval")
    return {"data": data, "hold_out": CFG.data.eval is None}


def cached(path):
    """An artifact path inside cache_dir, shared by experiments (vectorlm/data/cache.py)."""
    return f"{CFG.cache_dir}/{path}"


def get_source_files(wildcards):
    return {
        role: ancient(path)
        for role, path in source_paths(KEY_SOURCE[wildcards.key]).items()
    }


def get_source_params(wildcards):
    return source_settings(KEY_SOURCE[wildcards.key])


def get_source_fingerprint(wildcards):
    return fingerprint(
        "tokenize.py", data=source_paths(KEY_SOURCE[wildcards.key]), model=["files"]
    )


def get_pack_params():
    """What pack records and uses of data.*: the sources with their weights, packing, chunk_overlap, split_seed."""
    return without_operational("data", to_plain(CFG.data))


# Cache keys, by content: what tokenize makes of each source (its settings, the digests of its files, of the
# tokenizer's files and of the code), and what pack makes of them all. However an experiment spells the paths, an
# entry holds what its key says, so experiments share it safely and an edit makes a new entry.
SOURCE_KEYS = {
    name: cache_key(
        {
            **source_settings(name),
            "trust_remote_code": CFG.trust_remote_code,
            "digests": fingerprint(
                "tokenize.py", data=source_paths(name), model=["files"]
            ),
        }
    )
    for name in SOURCES
}
KEY_SOURCE = {key: name for name, key in reversed(SOURCE_KEYS.items())}
PACK_KEY = cache_key(
    {
        "sources": list(SOURCE_KEYS.values()),
        "data": get_pack_params(),
        "max_seq_len": CFG.max_seq_len,
        "digests": fingerprint("pack.py"),
    }
)


def get_train_params():
    return without_operational("train", to_plain(CFG.train))


def get_lora_params():
    return to_plain(CFG.lora)


def get_convert_outputs():
    outputs = {"model": directory(out("hf_model"))}
    if CFG.lora.enabled:
        outputs["adapter"] = directory(out("hf_adapter"))
    return outputs


def get_consolidate_params():
    return {"dtype": CFG.export.dtype, "max_shard_size": CFG.export.max_shard_size}


def get_convert_params():
    return {
        "smoke_test": CFG.export.smoke_test,
        "smoke_test_prompt": CFG.export.smoke_test_prompt,
        "smoke_test_max_size": CFG.export.smoke_test_max_size,
    }


def get_evaluate_params():
    return without_operational("evaluate", to_plain(CFG.evaluate))


def get_task_files():
    """{role: path} of every file the local tasks of evaluate.tasks read: definitions, their Python functions, data."""
    files = {}
    for i, task in enumerate(CFG.evaluate.tasks):
        if is_local_task(task):
            definitions, data = task_files(Path(task))
            files.update(
                {f"evaluate.tasks[{i}] {f}": str(f) for f in definitions + data}
            )
    return files


def get_evaluate_outputs():
    """What rule evaluate writes into {output_dir}/evaluate (the table is shown by `snakemake --report`), and the base
    model's evaluation into evaluate/base with evaluate.compare_base."""
    outputs = {
        "results": out("evaluate/results.json"),
        "table": report(
            out("evaluate/results.md"),
            caption="captions/evaluate.rst",
            category="evaluate",
            labels={"file": "results.md"},
        ),
        "generations": out("evaluate/generations.jsonl"),
    }
    if CFG.evaluate.compare_base:
        outputs.update(
            {
                f"base_{name}": out(f"evaluate/base/{path}")
                for name, path in (
                    ("results", "results.json"),
                    ("table", "results.md"),
                    ("generations", "generations.jsonl"),
                )
            }
        )
    return outputs


def get_evaluate_inputs():
    inputs = {"model": rules.convert_hf.output.model}
    if CFG.evaluate.compare_base:
        inputs["base"] = model_input()
    return inputs


def get_base_evaluation_params():
    """With evaluate.compare_base: the cache entry of the base model's evaluation, named by everything its results
    depend on (the base model's files, or how the example model is built; the settings and chat template; the task
    files and the code), so that experiments on one base model share it; and the chat template it is given.
    """
    if not CFG.evaluate.compare_base:
        return None
    chat_template = CFG.data.chat_template if CFG.evaluate.apply_chat_template else None
    settings = {
        "evaluate": get_evaluate_params(),
        "chat_template": chat_template,
        "trust_remote_code": CFG.trust_remote_code,
        "model": MODEL_DIGESTS,
        "digests": fingerprint("evaluate.py", data=get_task_files()),
        # Scores of two harness versions (prompts, metrics) are not comparable: an upgrade evaluates the base again.
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("lm_eval", "transformers")
        },
    }
    return {"key": cache_key(settings), "chat_template": chat_template}


def get_evaluate_targets():
    """Rule evaluate's results, which `all` asks for when the config has an evaluate section."""
    return [rules.evaluate.output.results] if CFG.evaluate is not None else []


def check_train_resources_now(rule):
    """The train rule's resources as set by the rule, a profile or --set-resources, checked for sense."""
    raw = {name: resource.raw for name, resource in rule.resources.items()}
    check_train_resources(raw, train=CFG.train, threads=raw["_cores"])


def current_evaluation():
    """evaluate/results.json when it is of the current hf_model, evaluate settings and task files (a narrower target,
    such as convert_hf, can leave an older one)."""
    path, model = Path(out("evaluate/results.json")), Path(out("hf_model"))
    if CFG.evaluate is None or not path.is_file() or not model.exists():
        return None
    results = json.loads(path.read_text())
    made = results.get("vectorlm", {})
    if (
        path.stat().st_mtime < model.stat().st_mtime
        or without_operational("evaluate", made.get("settings", {}))
        != get_evaluate_params()
        or made.get("fingerprint") != fingerprint("evaluate.py", data=get_task_files())
    ):
        return None
    return results


def report_summary():
    """Printed when the workflow succeeds: how the eval loss moved, where the model is, and what went wrong quietly."""
    summary_path = Path(out("train/summary.json"))
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        print(
            f"\nvectorlm: eval loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f} "
            f"after {summary['step']} steps ({summary['tokens_per_second']:,.0f} tokens/s on "
            f"{summary['world_size']} rank(s)); model: {out('hf_model')}\n"
        )
    if (results := current_evaluation()) is not None:
        for row in results.get("compared_to_base", []):
            print(
                f"vectorlm: evaluate: {row['task']} {row['metric']} {row['base']:.4f} (base) -> "
                f"{row['trained']:.4f} (trained)"
                if row["base"] is not None
                else f"vectorlm: evaluate: {row['task']} {row['metric']} {row['trained']:.4f}"
            )
        print(f"vectorlm: evaluation: {out('evaluate/results.md')}\n")
    packed_stats = Path(out("packed/stats.json"))
    if packed_stats.is_file():
        for warning in json.loads(packed_stats.read_text()).get("warnings", []):
            print(f"vectorlm: WARNING: {warning} (see {packed_stats})\n")
