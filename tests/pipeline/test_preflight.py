"""vectorlm/pipeline/preflight.py: what the Snakefile checks before any job starts (the workflow tests check the
same through Snakemake: tests/test_workflow.py)."""

from __future__ import annotations

import pytest

from tests.conftest import write_jsonl
from vectorlm.config import Config, ConfigError, TrainConfig
from vectorlm.data.sources import DataError
from vectorlm.pipeline.preflight import check_inputs, check_trackers


def test_inputs_are_checked_before_any_job(tmp_path, tiny_model_dir, corpus_rows):
    config = Config.from_dict({"model": str(tiny_model_dir), "output_dir": "o", "max_seq_len": 64,
                               "data": {"train": str(write_jsonl(tmp_path / "d.jsonl", corpus_rows[:3]))}})  # fmt: skip
    check_inputs(config)
    prompts = Config.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "prompt_field": "q",
                                                              "response_field": "a"}})  # fmt: skip
    with pytest.raises(
        DataError, match=r"rows have no field 'q' \(config key data\.prompt_field\); fields found: text"
    ):
        check_inputs(prompts)


def test_a_backend_that_is_not_installed_names_the_key_and_the_package(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else find_spec(name))
    check_trackers(["tensorboard", "wandb"])
    with pytest.raises(
        ConfigError,
        match=r"train.report_to asks for mlflow, which is not installed: .*mlflow-skinny sqlalchemy alembic",
    ):
        check_trackers(["wandb", "mlflow"])
    with pytest.raises(ConfigError, match=r"config key train.report_to.0: 'neptune' is not one of"):
        TrainConfig(report_to=["neptune"])
