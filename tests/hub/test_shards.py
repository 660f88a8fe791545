"""Streaming safetensors reading and writing against the safetensors library itself."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vectorlm.hub.shards import INDEX_FILE, plan_shards, read_tensors, tensor_shapes, weight_files, write_sharded

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).bfloat16(),
    "c": torch.arange(4, dtype=torch.int64),
    "scalar": torch.tensor(2.5, dtype=torch.float16),
    "empty": torch.zeros(0, 3),
}


def test_plan_shards():
    assert plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


def test_reads_what_the_safetensors_library_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    files = weight_files(tmp_path)
    assert tensor_shapes(files) == {name: tuple(t.shape) for name, t in TENSORS.items()}
    for name, tensor in read_tensors(files, list(TENSORS)).items():
        assert tensor.dtype == TENSORS[name].dtype and torch.equal(tensor, TENSORS[name])


def test_writes_shards_the_library_reads_and_reads_them_back(tmp_path, caplog):
    shapes = {name: tuple(t.shape) for name, t in TENSORS.items() if t.is_floating_point()}
    with caplog.at_level("INFO"):
        index = write_sharded(tmp_path, shapes, dtype=torch.float32, max_shard_bytes=40,
                              load=lambda names: {n: TENSORS[n].clone() for n in names})  # fmt: skip
    # Consolidating a large model says what it is doing: the whole, then each file with the time left.
    assert "writing 4 tensors, 0.00 GB in torch.float32, to 2 file(s)" in caplog.text
    assert "model-00002-of-00002.safetensors (2 of 2 files, 3 tensors; 0.00 of 0.00 GB, 0s left)" in caplog.text
    assert (tmp_path / INDEX_FILE).is_file() and len(set(index["weight_map"].values())) == 2  # [a], [b, scalar, empty]
    assert index["metadata"]["total_size"] == 4 * (15 + 7 + 1)
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / file, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), TENSORS[name].float())
    assert set(read_tensors(weight_files(tmp_path), list(shapes))) == set(shapes)


def test_a_truncated_file_is_an_error(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="tensor a is truncated"):
        read_tensors(weight_files(tmp_path), ["a"])
