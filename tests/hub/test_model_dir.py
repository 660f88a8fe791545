import json
import shutil

import pytest

from vectorlm.config import ConfigError
from vectorlm.data.tokenize import load_tokenizer
from vectorlm.hub.model_dir import check_max_seq_len, check_model_dir, read_header


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


def test_a_broken_config_or_truncated_weights_are_named_before_any_job(tmp_path, tiny_model_dir):
    """Before, a config.json that is not JSON raised a bare JSONDecodeError while the DAG was built, and truncated
    weights were found only after tokenize and pack, in two ranks' tracebacks."""
    broken = tmp_path / "broken-config"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match=r"config key model: .*broken-config/config.json is not valid JSON"):
        check_model_dir(broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=r"config key model: .*truncated/model.safetensors is truncated: "):
        check_model_dir(truncated)
    indexed = tmp_path / "indexed"
    shutil.copytree(tiny_model_dir, indexed)
    (indexed / "model.safetensors").rename(indexed / "model-00001-of-00001.safetensors")
    names = dict.fromkeys(read_header(indexed / "model-00001-of-00001.safetensors"), "model-00001-of-00002.safetensors")
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    with pytest.raises(ConfigError, match=r"model-00001-of-00002.safetensors is missing"):
        check_model_dir(indexed)
