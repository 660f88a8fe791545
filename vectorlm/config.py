"""Experiment configuration: typed sections of the config, the shared ground floor every stage and the workflow import.

The schema in ``vectorlm/schema/config.schema.yaml`` is the single description of every key (types, ranges, enums,
defaults, roles: vectorlm/config_schema.py); the Snakefile checks a config against it when it builds the DAG, and
:func:`load_config` does the same for library users. The dataclasses below take their defaults from it, check their
values against it, add the checks a schema cannot express and raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vectorlm.config_schema import ConfigError, check_section, schema_section, section_properties, validate

# The settings of what a source's rows hold; a mixture source that sets any of them replaces data.*'s.
SOURCE_FIELDS = (
    "split",
    "text_field",
    "prompt_field",
    "response_field",
    "messages_field",
    "chat_template",
    "separator",
    "chosen_field",
    "rejected_field",
)
# Those that say what kind of data a source holds (all but where its rows are and its text field).
INSTRUCTION_FIELDS = tuple(key for key in SOURCE_FIELDS if key not in ("split", "text_field"))


@dataclass(frozen=True)
class DataSource:
    """One source of the training data: its ``name`` (unique, used in paths and statistics), its ``weight`` in the
    mixture and ``data``, the data settings it is tokenized with (``data.train`` is its path)."""

    name: str
    weight: float
    data: DataConfig


@schema_section("data")
class DataConfig:
    train: str | tuple[dict[str, Any], ...]
    eval: str | None
    eval_fraction: float
    split: str | None
    text_field: str
    prompt_field: str | None
    response_field: str | None
    messages_field: str | None
    chat_template: str | None
    separator: str | None
    chosen_field: str | None
    rejected_field: str | None
    packing: bool
    chunk_overlap: int
    split_seed: int
    tokenize_batch_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.train, str):
            object.__setattr__(self, "train", tuple(dict(source) for source in self.train))
        check_section("data", to_plain(self))
        if not isinstance(self.train, str):
            self.sources  # noqa: B018 (checks every source's settings now)
        if (self.chosen_field is None) != (self.rejected_field is None):
            raise ConfigError("data.chosen_field and data.rejected_field go together: set both or neither")
        preference = self.chosen_field is not None
        if not preference and (self.prompt_field is None) != (self.response_field is None):
            raise ConfigError("data.prompt_field and data.response_field go together: set both or neither")
        chosen = [key for key, value in (("data.messages_field", self.messages_field),
                                         ("data.prompt_field/response_field", self.response_field),
                                         ("data.chosen_field/rejected_field", self.chosen_field),
                                         ("data.separator", self.separator)) if value is not None]  # fmt: skip
        if len(chosen) > 1:
            raise ConfigError(f"choose one kind of instruction data; got {' and '.join(chosen)}")
        if self.chat_template is not None and self.messages_field is None and not preference:
            raise ConfigError("data.chat_template renders chat rows: it needs data.messages_field or preference "
                              "rows (data.chosen_field)")  # fmt: skip

    @property
    def sources(self) -> list[DataSource]:
        """The training sources: one for a single ``data.train`` path, else one per entry of the list."""
        if isinstance(self.train, str):
            return [DataSource(_source_name(self.train, RESERVED_NAMES), 1.0, self)]
        sources, names = [], set()
        for index, entry in enumerate(self.train):
            path = entry["path"]
            name = entry.get("name") or _source_name(path, names | RESERVED_NAMES)
            if name in names | RESERVED_NAMES:
                taken = "is reserved (tokenized/ held the splits so)" if name in RESERVED_NAMES else "is already taken"
                raise ConfigError(f"data.train[{index}]: the name {name!r} {taken}; choose another")
            names.add(name)
            settings = dataclasses.asdict(self) | {"train": path, "eval": None}
            if any(entry.get(key) is not None for key in INSTRUCTION_FIELDS):
                settings.update(dict.fromkeys(INSTRUCTION_FIELDS))  # the source says what its rows hold
            settings.update({key: entry[key] for key in SOURCE_FIELDS if key in entry})
            try:
                data = DataConfig(**settings)
            except ConfigError as error:
                raise ConfigError(f"data.train[{index}] ({path}): {error}") from None
            sources.append(DataSource(name, float(entry.get("weight", 1)), data))
        kinds = {source.data.kind for source in sources}
        if len(kinds) > 1:
            described = ", ".join(f"{source.name} ({source.data.mode})" for source in sources)
            raise ConfigError(f"data.train: the sources of a mixture must all be text or all instruction or chat data "
                              f"(a loss on every token or on some), or all preference pairs; got {described}")  # fmt: skip
        return sources

    @property
    def paths(self) -> dict[str, str]:
        """{config key: path} of every data file: each training source (in order) and the eval file."""
        paths = {"data.train": self.train} if isinstance(self.train, str) else {
            f"data.train[{i}]": entry["path"] for i, entry in enumerate(self.train)}  # fmt: skip
        if self.eval is not None:
            paths["data.eval"] = self.eval
        return paths

    @property
    def mode(self) -> str:
        """text, prompt_response, messages, separator or preference: what the rows hold and where the loss goes."""
        if self.chosen_field is not None:
            return "preference"
        if self.messages_field is not None:
            return "messages"
        if self.prompt_field is not None:
            return "prompt_response"
        return "separator" if self.separator is not None else "text"

    @property
    def kind(self) -> str:
        """text (a loss on every token), instruction (on some) or preference (pairs of completions)."""
        return {"text": "text", "preference": "preference"}.get(self.mode, "instruction")

    @property
    def fields(self) -> dict[str, str]:
        """The columns the rows must have, each with the config key that names it."""
        if self.mode == "preference":
            sides = {self.chosen_field: "data.chosen_field", self.rejected_field: "data.rejected_field"}
            return sides if self.prompt_field is None else {self.prompt_field: "data.prompt_field", **sides}
        if self.mode == "messages":
            return {self.messages_field: "data.messages_field"}
        if self.mode == "prompt_response":
            return {self.prompt_field: "data.prompt_field", self.response_field: "data.response_field"}
        return {self.text_field: "data.text_field"}


# Names a source cannot have: the directories of tokenize's single-source output of earlier versions.
RESERVED_NAMES = {"train", "eval"}


def _source_name(path: str, taken: set[str]) -> str:
    """A name for the source at ``path``: its file name without extension, made unique among ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path.rstrip("/")).stem).lstrip("._-") or "data"
    name, number = stem, 2
    while name in taken:
        name, number = f"{stem}-{number}", number + 1
    return name


@schema_section("train")
class TrainConfig:
    max_steps: int | None
    num_epochs: float
    seed: int
    lr: float
    micro_batch_size: int
    global_batch_size: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    scheduler: str
    warmup_steps: int
    max_grad_norm: float | None
    sharding: str
    mixed_precision: bool
    activation_checkpointing: str
    attention: str
    compile: bool
    loss: str
    eval_every: int | None
    eval_max_batches: int | None
    checkpoint_every: int | None
    keep_checkpoints: int
    log_every: int
    report_to: tuple[str, ...]
    objective: str
    defer_gradient_sync: bool
    max_nonfinite_steps: int
    async_checkpoint: bool
    collective_timeout_minutes: float
    checkpoint_timeout_minutes: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "report_to", tuple(self.report_to))
        check_section("train", to_plain(self))
        if isinstance(self.activation_checkpointing, bool):  # the documented booleans of earlier versions
            object.__setattr__(self, "activation_checkpointing", "full" if self.activation_checkpointing else "none")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) must be below train.max_steps ({self.max_steps})"
            )

    def grad_accumulation_steps(self, dp_world_size: int) -> int:
        """Micro-steps per optimizer step so that ``dp_world_size`` ranks make one global batch."""
        rows_per_micro_step = self.micro_batch_size * dp_world_size
        if self.global_batch_size % rows_per_micro_step:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by train.micro_batch_size "
                f"({self.micro_batch_size}) x world size ({dp_world_size}) = {rows_per_micro_step}"
            )
        return self.global_batch_size // rows_per_micro_step


@schema_section("lora")
class LoraSettings:
    enabled: bool
    r: int
    alpha: float
    dropout: float
    target_modules: str | tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_section("lora", to_plain(self))


@schema_section("dpo")
class DpoSettings:
    beta: float
    loss: str
    simpo_gamma: float
    reference_model: str | None

    def __post_init__(self) -> None:
        check_section("dpo", to_plain(self))

    @property
    def uses_reference(self) -> bool:
        """Whether the loss compares with a reference model's log-probabilities (SimPO does not)."""
        return self.loss != "simpo"

    def in_use(self) -> dict[str, Any]:
        """The settings the loss uses (what a DPO run records and reruns for): simpo_gamma only for simpo, the
        reference model only with a reference."""
        settings = to_plain(self)
        if self.loss != "simpo":
            settings.pop("simpo_gamma")
        if not self.uses_reference:
            settings.pop("reference_model")
        return settings


@schema_section("export")
class ExportConfig:
    max_shard_size: str
    dtype: str
    smoke_test: bool
    smoke_test_prompt: str
    smoke_test_max_size: str

    def __post_init__(self) -> None:
        parse_size(self.max_shard_size, key="export.max_shard_size")  # a friendlier message than the schema's pattern
        parse_size(self.smoke_test_max_size, key="export.smoke_test_max_size")
        check_section("export", to_plain(self))

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size, key="export.max_shard_size")


@schema_section("estimate")
class EstimateConfig:
    gpu: str | None
    gpu_memory: str | None
    mfu: float | None
    check: str

    def __post_init__(self) -> None:
        if self.gpu_memory is not None:
            parse_size(self.gpu_memory, key="estimate.gpu_memory")
        check_section("estimate", to_plain(self))


@schema_section("evaluate")
class EvaluateConfig:
    tasks: tuple[str, ...]
    prompts: tuple[str, ...]
    num_fewshot: int | None
    limit: int | None
    max_new_tokens: int
    batch_size: int | str
    apply_chat_template: bool
    compare_base: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        check_section("evaluate", to_plain(self))
        if not self.tasks and not self.prompts:
            raise ConfigError("the evaluate section needs evaluate.tasks or evaluate.prompts (or remove the section)")
        if duplicates := sorted({task for task in self.tasks if self.tasks.count(task) > 1}):
            raise ConfigError(f"evaluate.tasks lists {', '.join(duplicates)} more than once")


@dataclass(frozen=True)
class Config:
    model: str
    output_dir: str
    max_seq_len: int
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    evaluate: EvaluateConfig | None = None  # the evaluate stage runs only when the config has the section
    trust_remote_code: bool = section_properties(None)["trust_remote_code"]["default"]
    cache_dir: str | None = section_properties(None)["cache_dir"]["default"]

    def __post_init__(self) -> None:
        if self.cache_dir is None:  # beside the experiment, so that experiments side by side share it
            object.__setattr__(self, "cache_dir", str(Path(self.output_dir).parent / "cache"))
        output, cache = Path(self.output_dir).resolve(), Path(self.cache_dir).resolve()
        if output == cache or output in cache.parents or cache in output.parents:
            raise ConfigError(f"output_dir ({self.output_dir}) and cache_dir ({self.cache_dir}, shared by experiments) "
                              "must not contain each other: choose another output_dir, or set cache_dir")  # fmt: skip
        paths = (("model", self.model), ("output_dir", self.output_dir), ("cache_dir", self.cache_dir))
        for key, path in (*paths, *self.data.paths.items()):
            if "{" in path or "}" in path:
                raise ConfigError(f"config key {key}: {path!r} contains {{ or }}, which Snakemake reads as a wildcard; "
                                  "choose a path without braces")  # fmt: skip
        preference = {source.data.kind == "preference" for source in self.data.sources} == {True}
        if preference != (self.train.objective == "dpo"):
            raise ConfigError("train.objective dpo trains on preference pairs, and preference pairs "
                              f"(data.chosen_field, data.rejected_field) train only with it; got train.objective "
                              f"{self.train.objective} with {'' if preference else 'no '}preference data")  # fmt: skip
        if self.data.chunk_overlap >= self.max_seq_len // 2:
            raise ConfigError(f"data.chunk_overlap ({self.data.chunk_overlap}) must be below half of max_seq_len "
                              f"({self.max_seq_len})")  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Validates ``raw`` against the schema, fills defaults and builds the typed config."""
        resolved = validate(raw)
        return cls(
            model=resolved["model"],
            output_dir=resolved["output_dir"],
            max_seq_len=resolved["max_seq_len"],
            trust_remote_code=resolved["trust_remote_code"],
            cache_dir=resolved["cache_dir"],
            data=DataConfig(**resolved["data"]),
            train=TrainConfig(**resolved["train"]),
            export=ExportConfig(**resolved["export"]),
            lora=LoraSettings(**resolved["lora"]),
            dpo=DpoSettings(**resolved["dpo"]),
            estimate=EstimateConfig(**resolved["estimate"]),
            evaluate=EvaluateConfig(**resolved["evaluate"]) if resolved.get("evaluate") is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(obj: Any) -> Any:
    """A dataclass (or nested one) as plain dicts, lists and scalars, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def load_config(*paths: str | Path) -> Config:
    """Reads YAML experiment config files, merged in order as ``--configfile a.yaml b.yaml`` merges them (the later
    file's keys win), validated, with defaults filled in."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _merge(merged, read_config_file(path))
    return Config.from_dict(merged)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys a YAML config file holds.

    Raises:
        ConfigError: naming the file (and the line, for a YAML syntax error) when it does not exist, is not YAML or
            holds no mapping of keys at its top level.
    """
    path = Path(path)
    if not path.is_file():
        hint = (f"; an option that takes several values (--configfile) reads a target after it as a file: write "
                f"--configfile=x.yaml {path}" if not path.suffix else "")  # fmt: skip
        raise ConfigError(f"config file {path} does not exist{hint}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"config file {path}{where}: not valid YAML ({problem})") from None
    if raw is None:
        raise ConfigError(f"config file {path} holds no keys; an experiment config is a mapping of keys (model:, "
                          "output_dir:, data:, train: ...)")  # fmt: skip
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} holds a {type(raw).__name__} at its top level; an experiment config is "
                          "a mapping of keys (model:, output_dir:, data:, train: ...)")  # fmt: skip
    return raw


SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_size(text: str, *, key: str) -> int:
    """``'5GB'`` -> 5_000_000_000; a ConfigError naming ``key`` when ``text`` is no size."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", text)
    if not match:
        raise ConfigError(f"{key}: cannot read size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


STAGE_CONFIG = "vectorlm_config.yaml"


def write_stage_config(directory: str | Path, settings: dict[str, Any], *, upstream: str | Path | None = None) -> dict:
    """Saves the resolved configuration behind an artifact next to it, as ``vectorlm_config.yaml``.

    ``settings`` are the keys this stage used; those recorded beside its ``upstream`` artifact are merged in first, so
    the file beside the final model holds everything that produced it.
    """
    resolved = resolved_config(settings, upstream=upstream)
    with open(Path(directory, STAGE_CONFIG), "w") as f:
        f.write(yaml.safe_dump(resolved, sort_keys=False))
        f.flush()
        os.fsync(f.fileno())  # a checkpoint holds it: on the disk before the checkpoint is renamed into place
    return resolved


def resolved_config(settings: dict[str, Any], *, upstream: str | Path | None = None) -> dict[str, Any]:
    """``settings`` merged over the configuration recorded beside the ``upstream`` artifact."""
    return _merge(read_stage_config(upstream) if upstream is not None else {}, to_plain(settings))


def read_stage_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory, STAGE_CONFIG)
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv: list[str] | None = None) -> None:
    """``python -m vectorlm.config a.yaml [b.yaml ...]``: checks experiment config files as the workflow reads them."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m vectorlm.config",
        description="Checks experiment config files as the workflow reads them (merged in order, as --configfile "
        "a.yaml b.yaml merges them) and names the file and line, or the key, of a mistake. Snakemake reads the files "
        "of --configfile before the workflow's code runs, and its own messages name neither.",
    )
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        config = load_config(*args.files)
    except ConfigError as error:
        sys.exit(f"vectorlm: {error}")
    print(f"{' + '.join(map(str, args.files))}: a valid experiment config (model {config.model}, output_dir "
          f"{config.output_dir})")  # fmt: skip


if __name__ == "__main__":
    main()
