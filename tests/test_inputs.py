import json
import shutil

import pytest

from tests.conftest import write_jsonl
from vectorlm.config import ConfigError
from vectorlm.inputs import DataError, check_data_file, check_first_row, check_max_seq_len, check_model_dir


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


def test_data_file_checks(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"config key data\.eval: .*data\.csv has unsupported extension '\.csv'"):
        check_data_file(tmp_path / "data.csv", key="data.eval")


def test_first_row_checks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "ok"\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2 is not valid JSON"):
        check_first_row(path, text_field="text")
    write_jsonl(path, [["a", "list"]])
    with pytest.raises(DataError, match="line 1 is not a JSON object"):
        check_first_row(path, text_field="text")
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"line 1 has no field 'text' \(config key data\.text_field\); fields found: content"):
        check_first_row(path, text_field="text")
    check_first_row(path, text_field="content")
