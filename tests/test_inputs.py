import shutil

import pytest

from tests.conftest import write_jsonl
from vectorlm.config import Config, ConfigError
from vectorlm.data.sources import DataError
from vectorlm.inputs import check_inputs, check_max_seq_len, check_model_dir


def test_model_dir_checks(tmp_path, tiny_model_dir):
    assert check_model_dir(tiny_model_dir) == tiny_model_dir
    with pytest.raises(ConfigError, match="config key model: model directory .*nope does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_model_dir(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"has no \.safetensors weights"):
        check_model_dir(pickled)


def test_max_seq_len_limit(tiny_model_dir):
    check_max_seq_len(512, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"max_seq_len: 513 is above the model's max_position_embeddings \(512\)"):
        check_max_seq_len(513, tiny_model_dir)


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
