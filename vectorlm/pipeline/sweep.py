"""The runs of a sweep: an experiment's ``sweep`` section expanded into named runs, each the experiment with a few
dotted-key overrides, validated like the experiment itself .

A sweep names runs (``sweep.runs: {name: {train.lr: 1.0e-4}}``), a grid (``sweep.grid: {train.lr: [1.0e-5, 3.0e-5],
lora.r: [8, 16]}``: a run for every combination, named by its values, ``lr-1e-05_r-8``) or both, and ``sweep.seeds``
repeats every run with each ``train.seed`` (``..._seed-0``). Adding a run leaves every other run's name, and so its
directory and its jobs, as they were. Each run is laid out under
``{output_dir}/runs/{name}`` as a single experiment is under ``output_dir``. Torch-free: the Snakefile imports it.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass
from typing import Any

from vectorlm.config import Config, ConfigError
from vectorlm.config_schema import OPERATIONAL_KEYS, section_properties
from vectorlm.run_dir import SweepDir

# What a run may change: how it trains and what follows. The data, the model and what is evaluated are the
# experiment's, shared by every run (one tokenize, one pack, one evaluation of the base model).
SWEEPABLE_SECTIONS = ("train", "lora", "dpo", "export", "estimate")
# Keys of those sections that change what the shared stages are or write: the experiment's, not a run's.
SHARED_KEYS = ("lora.enabled", "train.objective", "dpo.reference_model")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its ``name`` (a directory name under ``{output_dir}/runs``) and its ``overrides``
    ({dotted key: value}, the seed's included)."""

    name: str
    overrides: dict[str, Any]


def sweep_runs(sweep: dict[str, Any]) -> list[SweepRun]:
    """The runs of a ``sweep`` section, in order: the named runs, then a run for each point of the grid, each for
    every seed (or once, without seeds); seeds alone repeat the experiment itself.

    Raises:
        ConfigError: naming the run and key of a key no run may change, or of two runs with one name.
    """
    named = sweep.get("runs") or {}
    grid = sweep.get("grid") or {}
    seeds = sweep.get("seeds") or []
    for name in named:
        if not RUN_NAME.match(name):
            raise ConfigError(f"sweep.runs: the run name {name!r} must be a directory name of letters, digits, '.', "
                              "'_' and '-'")  # fmt: skip
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    bases = [(name, dict(overrides or {})) for name, overrides in named.items()]
    bases += [("_".join(f"{_short(key)}-{_value(value)}" for key, value in point.items()), point) for point in points]
    if not bases and not seeds:
        raise ConfigError("the sweep section has no runs: give sweep.runs, sweep.grid or sweep.seeds (or remove it)")
    if seeds and any("train.seed" in overrides for _, overrides in bases):
        raise ConfigError("sweep: a run sets train.seed and sweep.seeds repeats every run with its seeds; use one")
    runs, seen = [], {}
    for (base, overrides), seed in itertools.product(bases or [("", {})], seeds or [None]):
        values = {**overrides, **({"train.seed": seed} if seed is not None else {})}
        name = "_".join([*([base] if base else []), *([f"seed-{seed}"] if seed is not None else [])]) or "run"
        if name in seen:
            raise ConfigError(f"sweep: two runs are named {name!r} ({seen[name]} and {values}); name the runs apart")
        seen[name] = values
        runs.append(SweepRun(name, values))
    for run in runs:
        for key in run.overrides:
            _check_key(run.name, key)
    return runs


def _short(key: str) -> str:
    """A grid key's part of a run name: its last part (``train.lr`` -> ``lr``)."""
    return key.rsplit(".", 1)[-1]


def _value(value: Any) -> str:
    """A value as it reads in a run name: ``1e-05``, ``8``, ``true``; other characters become ``-``."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "-", text)


def _check_key(run: str, key: str) -> None:
    section, _, name = key.partition(".")
    if not name or section not in SWEEPABLE_SECTIONS:
        raise ConfigError(f"sweep run {run}: config key {key} cannot differ between runs: a run may change the "
                          f"keys of {', '.join(SWEEPABLE_SECTIONS)} (the data, the model and the evaluation are the "
                          "experiment's)")  # fmt: skip
    if name in OPERATIONAL_KEYS.get(section, ()):
        raise ConfigError(f"sweep run {run}: config key {key} says how a stage runs, not what it computes; set it for "
                          "the experiment")  # fmt: skip
    if key in SHARED_KEYS:
        raise ConfigError(f"sweep run {run}: config key {key} cannot differ between runs: it changes what the runs "
                          "share; make another experiment")  # fmt: skip


def run_config(raw: dict[str, Any], run: SweepRun) -> dict[str, Any]:
    """The experiment ``raw`` (as written, without its sweep section) with ``run``'s overrides, laid out under
    ``{output_dir}/runs/{name}``; its cache stays the experiment's (so that the runs share it)."""
    config = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
    output_dir = config["output_dir"]
    if config.get("cache_dir") is None:  # the experiment's default (beside output_dir), not one beside the run
        config["cache_dir"] = Config.from_dict(config).cache_dir
    for key, value in run.overrides.items():
        section, name = key.split(".", 1)
        config.setdefault(section, {})
        config[section] = {**(config[section] or {}), name: value}
    config["output_dir"] = str(SweepDir(output_dir).run(run.name).root)
    return config


def sweep_configs(raw: dict[str, Any]) -> dict[str, Config]:
    """{run name: its validated config} of the experiment ``raw``'s sweep section.

    Raises:
        ConfigError: naming the run and the config key of a run whose overrides are not valid.
    """
    experiment = Config.from_dict(run_config(raw, SweepRun("", {})))
    check_select(raw["sweep"], evaluating=experiment.evaluate is not None)
    configs = {}
    for run in sweep_runs(raw["sweep"]):
        if (raw.get("train") or {}).get("objective") == "dpo" and "train.mixed_precision" in run.overrides:
            raise ConfigError(f"sweep run {run.name}: config key train.mixed_precision cannot differ between DPO runs: "
                              "the reference log-probabilities they share are computed in the experiment's precision")  # fmt: skip
        try:
            configs[run.name] = Config.from_dict(run_config(raw, run))
        except ConfigError as error:
            raise ConfigError(f"sweep run {run.name} ({_describe(run.overrides)}): {error}") from None
        if (
            configs[run.name].dpo.uses_reference != experiment.dpo.uses_reference
            and experiment.train.objective == "dpo"
        ):
            raise ConfigError(f"sweep run {run.name}: config key dpo.loss cannot switch between simpo and a loss with a "
                              "reference model within a sweep: the reference log-probabilities are the experiment's")  # fmt: skip
    return configs


def check_select(sweep: dict[str, Any], *, evaluating: bool) -> None:
    """``sweep.select``: eval_loss, or ``<task>/<metric>`` of the evaluate section's results."""
    select = sweep_select(sweep)
    if select == "eval_loss":
        return
    if not re.fullmatch(r"[^/\s]+/[^/\s]+", select):
        raise ConfigError(f"sweep.select: {select!r} is neither eval_loss nor <task>/<metric> (e.g. "
                          "tiny_stories_cloze/acc)")  # fmt: skip
    if not evaluating:
        raise ConfigError(f"sweep.select: {select!r} is an evaluate metric, and the experiment has no evaluate section")


def _describe(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in overrides.items()) or "no overrides"


def sweep_select(sweep: dict[str, Any]) -> str:
    """``sweep.select``, its schema default when the section leaves it out."""
    return sweep.get("select") or section_properties("sweep")["select"]["default"]
