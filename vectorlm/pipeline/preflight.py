"""What the Snakefile checks when it builds the DAG, before any job starts: a mistake fails at once with a message that
names the config key (or resource) and what would work.

- the inputs: the data files exist, are not empty and have the fields the config names; the model directory has a
  config, safetensors weights and a tokenizer, and ``max_seq_len`` fits it;
- the experiment trackers of ``train.report_to`` are installed;
- the evaluate section's tasks and chat template (vectorlm/pipeline/evaluate_tasks.py);
- an explicit ``train.attention`` is one the model supports;
- the train rule's resources can work (:func:`check_resources`);
- and, once rule estimate has run, that training fits the GPUs (:func:`check_fit`).

Each stage repeats the checks that concern it, so the library is just as safe without Snakemake.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vectorlm.config import Config, ConfigError
from vectorlm.config_schema import without_operational
from vectorlm.data.sources import check_source
from vectorlm.hub.model_dir import check_max_seq_len, check_model_dir, read_model_config
from vectorlm.pipeline.evaluate_tasks import check_chat_template, check_tasks
from vectorlm.run_dir import RunDir
from vectorlm.train.placement import Placement, check_train_resources


def check_experiment(config: Config, *, model_will_be_built: bool, state_dir: str | Path) -> None:
    """The inputs, the trackers and the evaluate section: every check of :mod:`this module
    <vectorlm.pipeline.preflight>` but the attention's (which needs the model's digest) and the resources'.

    Args:
        config: the experiment.
        model_will_be_built: the model directory is the output of a workflow rule (the example model), so it may not
            exist yet and its limits are checked by the stages instead.
        state_dir: where answers that are slow to find are kept (Snakemake's ``.snakemake``).
    """
    check_inputs(config, model_will_be_built=model_will_be_built)
    check_trackers(config.train.report_to)
    check_chat_templates(config)
    if config.evaluate is not None:
        check_tasks(config.evaluate, names_cache=Path(state_dir, "vectorlm-lm-eval-tasks.json"))
        check_chat_template(config)


def check_inputs(config: Config, *, model_will_be_built: bool = False) -> None:
    """The data files, the model directory and where the experiment writes (:func:`check_experiment`). A model
    directory that holds a config.json and nothing else (no weights, no tokenizer: examples/llama-3.1-8b) is one to
    estimate (``snakemake estimate``); any stage that reads more of it fails at its start, naming what is missing."""
    check_outputs(config)
    for (key, path), source in zip(config.data.paths.items(), config.data.sources):
        check_source(path, key=key, fields=source.data.fields, split=source.data.split)
    if config.data.eval is not None:  # read with the first source's settings, by its tokenize job
        first = config.data.sources[0].data
        check_source(config.data.eval, key="data.eval", fields=first.fields, split=first.split)
    check_reference_model(config, model_will_be_built=model_will_be_built)
    if model_will_be_built and not Path(config.model).exists():
        return
    if is_config_only(config.model):
        read_model_config(config.model)
    else:
        check_model_dir(config.model)
    check_max_seq_len(config.max_seq_len, config.model)


def check_reference_model(config: Config, *, model_will_be_built: bool = False) -> None:
    """dpo.reference_model, when set and used: a model directory whose vocabulary is the model's, so that the packed
    token ids (the model's tokenizer's) mean the same to it."""
    reference = config.dpo.reference_model
    if reference is None or config.train.objective != "dpo" or not config.dpo.uses_reference:
        return
    try:
        check_model_dir(reference)
    except ConfigError as error:
        raise ConfigError(f"dpo.reference_model: {error}") from None
    if model_will_be_built and not Path(config.model).exists():
        return
    sizes = [read_model_config(path).get("text_config", read_model_config(path)).get("vocab_size")
             for path in (config.model, reference)]  # fmt: skip
    if sizes[0] != sizes[1]:
        raise ConfigError(f"dpo.reference_model ({reference}) has a vocabulary of {sizes[1]} tokens and the model "
                          f"({config.model}) of {sizes[0]}: the reference must share the model's tokenizer")  # fmt: skip


def is_config_only(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` is a directory that holds a config.json and no other file (a model described, not a
    model)."""
    if not Path(model_dir).is_dir():
        return False
    files = [path.name for path in Path(model_dir).iterdir() if not path.name.startswith(".")]
    return files == ["config.json"]


def check_outputs(config: Config) -> None:
    """output_dir and cache_dir are directories (or do not exist yet), and neither lies inside a directory of
    training data, which the next run would read back: the experiment's own report and logs as documents."""
    for key, path in (("output_dir", config.output_dir), ("cache_dir", config.cache_dir)):
        where = Path(path)
        if where.exists() and not where.is_dir():
            raise ConfigError(f"config key {key}: {path} is a file, not a directory; choose another {key}")
        for data_key, data_path in config.data.paths.items():
            data = Path(data_path).resolve()
            if data.is_dir() and (where.resolve() == data or data in where.resolve().parents):
                raise ConfigError(f"config key {key}: {path} lies inside the data directory {data_path} "
                                  f"({data_key}), whose files are read as documents: the next run would train on "
                                  f"the experiment's own files; choose a {key} outside it")  # fmt: skip


def check_chat_templates(config: Config) -> None:
    """Every chat template the config gives (data.chat_template, a mixture source's) parses as Jinja, as transformers
    compiles it (with its ``{% generation %}`` tag and loop controls); one that raises while it renders a row is
    named, with the row, by the tokenize job."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' AssistantTracker tag: {% generation %} ... {% endgeneration %}
        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])  # fmt: skip
    sources = [("data.chat_template", config.data.chat_template)] + [
        (f"{key} chat_template", source.data.chat_template)
        for key, source in zip(config.data.paths, config.data.sources) if not isinstance(config.data.train, str)
    ]  # fmt: skip
    for key, template in sources:
        if template is None:
            continue
        try:
            environment.parse(template)
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(f"config key {key}: the chat template is not valid Jinja: {error.message} (line "
                              f"{error.lineno} of the template)") from error  # fmt: skip


# tracker -> the modules it needs and the packages that provide them (MLflow's local store is SQLite, through
# SQLAlchemy and alembic: the full mlflow package has them, mlflow-skinny does not)
TRACKER_PACKAGES = {"tensorboard": (("tensorboard",), "tensorboard"), "wandb": (("wandb",), "wandb"),
                    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic")}  # fmt: skip


def check_trackers(names: tuple[str, ...] | list[str]) -> None:
    """A ConfigError naming ``train.report_to`` and the package for each tracker that is not installed."""

    def needs(name: str) -> tuple[str, ...]:
        local = name != "mlflow" or not os.environ.get("MLFLOW_TRACKING_URI")
        return TRACKER_PACKAGES[name][0] if local else TRACKER_PACKAGES[name][0][:1]

    missing = [name for name in names if any(importlib.util.find_spec(m) is None for m in needs(name))]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[name][1] for name in missing)
        raise ConfigError(
            f"train.report_to asks for {', '.join(missing)}, which is not installed: pip install "
            f"'vectorlm-pipeline[tracking]' (all backends) or pip install {packages}"
        )


def check_attention(config: Config, *, cache: str | Path, model_digest: str) -> None:
    """An explicit train.attention that the model does not support (Gemma-2 and sdpa, GPT-2 and flex attention) fails
    here, naming the ones it supports. Finding them imports torch and transformers (seconds), so the answer is kept in
    ``cache`` per model (``model_digest``) and transformers version; auto needs no check (it picks among them)."""
    requested = config.train.attention
    if requested == "auto" or not Path(config.model).is_dir():  # the example model is built by the workflow
        return
    # "v2": the answers of earlier versions offered our flash-attn path to models with attention sinks.
    key = f"v2 {model_digest} {config.trust_remote_code} transformers {importlib.metadata.version('transformers')}"
    cache = Path(cache)
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in stored:
        from vectorlm.hub.meta_model import causal_lm_class
        from vectorlm.train.attention import supported_attention

        model_class = causal_lm_class(config.model, trust_remote_code=config.trust_remote_code)
        stored = {key: {"class": model_class.__name__, "supported": list(supported_attention(model_class))}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(stored))
        partial.replace(cache)
    if requested not in stored[key]["supported"]:
        from vectorlm.train.attention import unsupported_attention

        raise ConfigError(unsupported_attention(requested, stored[key]["class"], stored[key]["supported"]))


def check_resources(resources: Mapping[str, Any], *, config: Config) -> Placement:
    """The train rule's resources (as set by the rule, a profile or --set-resources: Snakemake's raw values), checked
    for sense before any job is submitted (vectorlm/train/placement.py)."""
    return check_train_resources(resources, train=config.train, threads=resources["_cores"])


def trains_anew(run: RunDir, *, train: dict[str, Any], lora: dict[str, Any]) -> bool:
    """Whether the experiment in ``run`` will train with these ``train`` and ``lora`` settings (its config's) for the
    first time: it has not finished a training, or the one it ran (``train/job.yaml``) had other settings (the
    operational ones aside, which change no training). Only such a training waits for the fit check: gating a
    finished one would make Snakemake plan what follows it again whenever the estimate is redone."""
    if not run.summary.is_file() or not run.job.is_file():
        return True
    ran = yaml.safe_load(run.job.read_text()) or {}
    return (
        without_operational("train", ran.get("train", {})) != without_operational("train", train)
        or ran.get("lora") != lora
    )


def check_fit(estimate: str | Path, *, check: str) -> None:
    """Stops the workflow before train is queued when rule estimate's ``estimate`` (estimate.json) says the run will
    not fit its GPUs and ``check`` (estimate.check) is error: a ConfigError with the breakdown, the largest
    micro-batch that fits, the levers and the key that makes it a warning."""
    from vectorlm.estimate.table import does_not_fit

    result = json.loads(Path(estimate).read_text())
    if check == "error" and (result.get("memory") or {}).get("fits") is False:
        raise ConfigError(does_not_fit(result))
