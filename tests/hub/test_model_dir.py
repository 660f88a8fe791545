import json
import shutil

import pytest

from vectorlm.config import ConfigError
from vectorlm.data.tokenize import load_tokenizer
from vectorlm.hub.model_dir import check_max_seq_len, check_model_dir


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
