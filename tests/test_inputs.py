import json
import shutil

import pytest

from tests.conftest import write_jsonl
from vectorlm.config import Config, ConfigError
from vectorlm.data.sources import DataError
from vectorlm.data.tokenize import load_tokenizer
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
    untokenized = tmp_path / "untokenized"
    shutil.copytree(tiny_model_dir, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(
        ConfigError, match=r"config key model: .*untokenized has no tokenizer \(none of tokenizer\.json"
    ):
        check_model_dir(untokenized)


def test_a_tokenizer_that_does_not_load_names_the_model_directory(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config key model: cannot load the tokenizer of .*broken: "):
        load_tokenizer(broken)


def test_max_seq_len_limit(tmp_path, tiny_model_dir):
    check_max_seq_len(512, tiny_model_dir)
    with pytest.raises(ConfigError, match=r"max_seq_len: 513 is above the model's max_position_embeddings \(512\)"):
        check_max_seq_len(513, tiny_model_dir)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024, "n_embd": 768}))
    check_max_seq_len(1024, tmp_path)
    with pytest.raises(ConfigError, match=r"max_seq_len: 2048 is above the model's n_positions \(1024\)"):
        check_max_seq_len(2048, tmp_path)


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
