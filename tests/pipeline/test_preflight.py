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


def test_where_the_experiment_writes_is_checked_before_any_job(tmp_path, corpus_rows):
    """An output_dir that is a file (before: tokenize and pack ran, then a Snakemake traceback), and one inside a
    directory of text documents (before: accepted, and the next run trained on the experiment's own report)."""
    from vectorlm.pipeline.preflight import check_outputs

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("A story.")
    (tmp_path / "taken").write_text("a file")
    base = {"model": "m", "max_seq_len": 64, "data": {"train": str(texts)}}
    with pytest.raises(ConfigError, match=r"config key output_dir: .*taken is a file, not a directory"):
        check_outputs(
            Config.from_dict({**base, "output_dir": str(tmp_path / "taken"), "cache_dir": str(tmp_path / "c")})
        )
    with pytest.raises(ConfigError, match=r"config key output_dir: .*texts/run lies inside the data directory"):
        check_outputs(Config.from_dict({**base, "output_dir": str(texts / "run"), "cache_dir": str(tmp_path / "c")}))
    check_outputs(Config.from_dict({**base, "output_dir": str(tmp_path / "run")}))


def test_a_chat_template_that_is_not_jinja_is_named_before_any_job():
    from vectorlm.pipeline.preflight import check_chat_templates

    data = {"train": "c.jsonl", "messages_field": "messages"}
    raw = {"model": "m", "output_dir": "o", "max_seq_len": 64}
    good = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    check_chat_templates(Config.from_dict({**raw, "data": {**data, "chat_template": good}}))
    with pytest.raises(ConfigError, match=r"config key data.chat_template: the chat template is not valid Jinja: "):
        check_chat_templates(Config.from_dict({**raw, "data": {**data, "chat_template": "{% for m in messages %}"}}))
