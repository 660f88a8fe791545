"""The experiment config's JSON schema (``vectorlm/schema/config.schema.yaml``): the one place where every key, its
type, range, enum, default and role is written.

- :func:`validate` checks a whole config (unknown keys, types, ranges) and fills in the defaults; the Snakefile runs
  it when it builds the DAG, :func:`vectorlm.config.load_config` for library users.
- The typed sections of vectorlm/config.py take their defaults from it (:func:`schema_section`) and check their
  values against it when they are built (:func:`check_section`), so a section built in code is checked as a config
  file is.
- Each key's role is an annotation of its own: ``x-reruns`` names the first stage a change of the key reruns
  (``nothing`` for settings that change how a stage runs, never what it writes: :data:`OPERATIONAL_KEYS`), and
  ``x-resume`` marks the train settings that say how long to train (``length``) or how often to look
  (``observation``), which a resumed run may change (vectorlm/train/resume.py). docs/config.md's "reruns" column
  and its resuming rules are checked against them (tests/test_config.py).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).parent / "schema" / "config.schema.yaml"


class ConfigError(ValueError):
    """A user mistake in the experiment configuration."""


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def section_properties(section: str | None) -> dict[str, dict[str, Any]]:
    """The schema of each key of ``section`` (None: the top level)."""
    properties = schema()["properties"]
    return properties if section is None else properties[section]["properties"]


def schema_section(section: str) -> Callable[[type], type]:
    """Makes the decorated class a frozen dataclass whose fields default to the schema's defaults of ``section`` (lists
    as tuples: the dataclasses are immutable)."""

    def make(cls: type) -> type:
        for name, prop in section_properties(section).items():
            if "default" in prop:
                default = prop["default"]
                setattr(cls, name, tuple(default) if isinstance(default, list) else default)
        return dataclasses.dataclass(frozen=True)(cls)

    return make


def check_section(section: str, values: dict[str, Any]) -> None:
    """``values`` (plain) of the config section ``section`` against its schema: types, ranges, enums.

    Raises:
        ConfigError: naming each offending key, e.g. ``config key train.sharding: 'zero3' is not one of [...]``.
    """
    errors = sorted(_section_validator(section).iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e, prefix=f"{section}.") for e in errors))


@cache
def _section_validator(section: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema()["properties"][section])


def validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Checks ``raw`` against the schema and returns a copy with every default filled in.

    Raises:
        ConfigError: naming the offending key, e.g. ``config key train.lr: 'x' is not of type 'number'``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    resolved = _numbers_from_strings(copy.deepcopy(raw), schema())
    errors = sorted(_filling_validator().iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(_describe(e) for e in errors))
    return resolved


def _filling_validator():
    from jsonschema import Draft202012Validator, validators

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from Draft202012Validator.VALIDATORS["properties"](validator, properties, instance, subschema)

    return validators.extend(Draft202012Validator, {"properties": set_defaults})(schema())


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numbers_from_strings(values: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Numbers YAML 1.1 reads as strings (``1e-4``: PyYAML wants ``1.0e-4``), as numbers, for the keys that take one."""
    for key, prop in schema.get("properties", {}).items():
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, dict):
            _numbers_from_strings(value, prop)
        elif isinstance(value, list) and "items" in prop:
            values[key] = [_numbers_from_strings(item, prop["items"]) if isinstance(item, dict)
                           else _number(item, prop["items"]) for item in value]  # fmt: skip
        else:
            values[key] = _number(value, prop)
    return values


def _number(value: Any, prop: dict[str, Any]) -> Any:
    kinds = prop.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    takes_number = {"number", "integer"} & set(kinds) and "string" not in kinds  # a string key keeps its string
    if not (isinstance(value, str) and takes_number and _NUMBER.fullmatch(value.strip())):
        return value
    number = float(value)
    return int(number) if "number" not in kinds and number.is_integer() else number


def _describe(error, *, prefix: str = "") -> str:
    path = prefix + ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        where = f"{path.rstrip('.')}." if path else ""
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {where}{close[0]}? " if close else ""
            lines.append(f"  unknown config key {where}{key} ({hint}allowed here: {', '.join(allowed)})")
        return "\n".join(lines)
    if error.validator == "required":
        where = path.rstrip(".")
        return f"  missing config key {error.message.split(' is a required')[0]}" + (f" in {where}" if where else "")
    return f"  config key {path.rstrip('.') or '<root>'}: {error.message}"


def rerun_stage(section: str | None, key: str) -> str:
    """The first stage a change of ``section.key`` reruns (the key's ``x-reruns``), or ``nothing``."""
    return section_properties(section)[key]["x-reruns"]


def keys_marked(annotation: str, value: str | bool) -> dict[str, tuple[str, ...]]:
    """{section: its keys whose ``annotation`` (``x-reruns``, ``x-resume``, ``x-estimate``) is ``value``}, for the
    sections that have such keys."""
    marked = {}
    for section, prop in schema()["properties"].items():
        keys = tuple(k for k, p in prop.get("properties", {}).items() if p.get(annotation) == value)
        if keys:
            marked[section] = keys
    return marked


# Settings that change how a stage runs, never what it writes: they are left out of the stages' params, so changing
# one reruns nothing; the stages read them from the resolved config.
OPERATIONAL_KEYS = keys_marked("x-reruns", "nothing")


# The train and lora settings the memory and time estimate depends on (rule estimate's params).
ESTIMATE_KEYS = keys_marked("x-estimate", True)


def estimate_settings(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a config section) reduced to the settings of :data:`ESTIMATE_KEYS`."""
    return {k: v for k, v in values.items() if k in ESTIMATE_KEYS.get(section, ())}


def operational(config: dict[str, Any], section: str) -> dict[str, Any]:
    """The :data:`OPERATIONAL_KEYS` of ``section`` in a resolved ``config``."""
    return {key: config[section][key] for key in OPERATIONAL_KEYS.get(section, ())}


def without_operational(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a config section) without the settings that never change what a stage writes."""
    return {k: v for k, v in values.items() if k not in OPERATIONAL_KEYS.get(section, ())}
