"""A sweep section expanded into runs: readable names, seeds, named runs crossed with a grid, and every override
checked like the experiment, named by run and key."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO
from vectorlm.config import ConfigError
from vectorlm.pipeline.sweep import sweep_configs, sweep_runs


def experiment(**sweep) -> dict:
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["sweep"] = sweep
    return raw


def test_a_grid_with_seeds_names_every_combination_by_its_values():
    runs = sweep_runs({"grid": {"train.lr": [1.0e-5, 3.0e-5], "lora.r": [8, 16]}, "seeds": [0, 1]})
    assert [run.name for run in runs] == [
        "lr-1e-05_r-8_seed-0", "lr-1e-05_r-8_seed-1", "lr-1e-05_r-16_seed-0", "lr-1e-05_r-16_seed-1",
        "lr-3e-05_r-8_seed-0", "lr-3e-05_r-8_seed-1", "lr-3e-05_r-16_seed-0", "lr-3e-05_r-16_seed-1",
    ]  # fmt: skip
    assert runs[5].overrides == {"train.lr": 3.0e-5, "lora.r": 8, "train.seed": 1}


def test_named_runs_and_the_grid_make_runs_side_by_side():
    """A named run added beside a grid renames no other run: the others' directories and jobs stay."""
    runs = sweep_runs({"runs": {"low": {"train.lr": 1.0e-4}, "high": {"train.lr": 1.0e-3}},
                       "grid": {"train.warmup_steps": [0, 5]}, "seeds": [1]})  # fmt: skip
    assert [run.name for run in runs] == ["low_seed-1", "high_seed-1", "warmup_steps-0_seed-1",
                                          "warmup_steps-5_seed-1"]  # fmt: skip
    assert runs[0].overrides == {"train.lr": 1.0e-4, "train.seed": 1}
    assert [run.name for run in sweep_runs({"runs": {"a": {"train.lr": 1.0e-4}, "b": None}})] == ["a", "b"]
    assert [run.name for run in sweep_runs({"seeds": [3, 4]})] == ["seed-3", "seed-4"]
    with pytest.raises(ConfigError, match="two runs are named 'lr-1'"):
        sweep_runs({"runs": {"lr-1": {}}, "grid": {"train.lr": [1]}})


def test_each_run_is_the_experiment_under_runs_sharing_its_cache():
    configs = sweep_configs(experiment(grid={"train.lr": [1.0e-3, 3.0e-3]}, seeds=[7]))
    first = configs["lr-0.001_seed-7"]
    assert first.output_dir == "results/tiny/runs/lr-0.001_seed-7" and first.cache_dir == "results/cache"
    assert (first.train.lr, first.train.seed, first.train.max_steps) == (1.0e-3, 7, 200)
    assert configs["lr-0.003_seed-7"].data == first.data


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"runs": {"fast": {"train.lr": "quick"}}}, r"sweep run fast \(train.lr=quick\): invalid config:\n.*train.lr"),
        ({"grid": {"train.micro_batch_size": [3]}}, r"sweep run micro_batch_size-3 .*global_batch_size \(16\) must be"),
        ({"runs": {"a": {"data.packing": False}}}, "sweep run a: config key data.packing cannot differ between runs"),
        ({"runs": {"a": {"model": "other"}}}, "sweep run a: config key model cannot differ between runs"),
        ({"runs": {"a": {"lora.enabled": True}}}, "sweep run a: config key lora.enabled cannot differ"),
        ({"runs": {"a": {"train.checkpoint_every": 5}}}, "train.checkpoint_every says how a stage runs"),
        ({"runs": {"a/b": {}}}, "the run name 'a/b' must be a directory name"),
        ({"runs": {"lr-1": {}}, "grid": {}}, None),
        ({"runs": {}}, "the sweep section has no runs"),
        ({"runs": {"a": {"train.seed": 3}}, "seeds": [0]}, "a run sets train.seed and sweep.seeds"),
        ({"seeds": [0], "select": "accuracy"}, "sweep.select: 'accuracy' is neither eval_loss nor <task>/<metric>"),
    ],
)  # fmt: skip
def test_bad_overrides_are_named_by_run_and_key(sweep, message):
    if message is None:
        assert list(sweep_configs(experiment(**sweep))) == ["lr-1"]
        return
    with pytest.raises(ConfigError, match=message):
        sweep_configs(experiment(**sweep))


def test_an_evaluate_metric_selects_only_with_an_evaluate_section_and_dpo_keeps_its_reference():
    raw = experiment(seeds=[0], select="tiny_stories_cloze/acc")
    assert list(sweep_configs(raw)) == ["seed-0"]
    raw.pop("evaluate")
    with pytest.raises(ConfigError, match="is an evaluate metric, and the experiment has no evaluate section"):
        sweep_configs(raw)
    dpo = yaml.safe_load((REPO / "config" / "dpo.yaml").read_text())
    dpo["sweep"] = {"runs": {"ref-free": {"dpo.loss": "simpo"}, "ipo": {"dpo.loss": "ipo"}}}
    with pytest.raises(ConfigError, match="sweep run ref-free: config key dpo.loss cannot switch between simpo"):
        sweep_configs(dpo)
    dpo["sweep"] = {"runs": {"ipo": {"dpo.loss": "ipo", "dpo.beta": 0.5}}}
    assert sweep_configs(dpo)["ipo"].dpo.beta == 0.5
