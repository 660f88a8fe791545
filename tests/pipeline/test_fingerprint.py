"""Content fingerprints: what changes them and what does not."""

import os
import struct
from pathlib import Path

from vectorlm.file_digests import BLOCK, SAMPLE_ABOVE, SAMPLE_BLOCKS, FileDigests, files_under, tree_digest
from vectorlm.pipeline.fingerprint import code_digest, imported_modules

REPO = Path(__file__).resolve().parents[2]


def test_a_file_digest_follows_content_not_timestamps(tmp_path):
    digests = FileDigests(tmp_path / "cache.json")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    first = digests.digest(data)
    os.utime(data, (1, 1))
    assert digests.digest(data) == first
    data.write_text('{"text": "b"}\n')
    assert digests.digest(data) != first
    digests.save()
    again = FileDigests(tmp_path / "cache.json")
    assert again.digest(data) == digests.digest(data) and not again.changed  # read from the cache


def test_large_weights_are_sampled_and_a_changed_block_is_seen(tmp_path):
    weights = tmp_path / "model.safetensors"
    header = b'{"__metadata__":{"format":"pt"}}'
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(SAMPLE_ABOVE + 2**20)  # sparse: nothing written
    digests = FileDigests(tmp_path / "cache.json")
    before = digests.digest(weights)
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(32 * (size - BLOCK) // (SAMPLE_BLOCKS - 1) + 100)  # inside the 33rd of the sampled blocks
        f.write(b"\x01")
    assert digests.digest(weights) != before


def test_trees_leave_hidden_files_out_and_see_renames(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    assert files_under(tmp_path) == [tmp_path / "docs" / "a.txt"]
    digests = FileDigests(tmp_path / "cache.json")
    before = tree_digest(digests, tmp_path)
    (tmp_path / ".git" / "HEAD").write_text("other")
    assert tree_digest(digests, tmp_path) == before
    (tmp_path / "docs" / "a.txt").rename(tmp_path / "docs" / "b.txt")
    assert tree_digest(digests, tmp_path) != before
    assert tree_digest(digests, tmp_path / "missing") == "absent"


def test_code_of_a_stage_is_its_script_and_the_modules_it_imports():
    def modules(script: str) -> set[str]:
        return {p.relative_to(REPO).as_posix() for p in imported_modules(REPO / "workflow_scripts" / script)}

    pack, train, tokenize = modules("pack.py"), modules("train.py"), modules("tokenize.py")
    assert {"vectorlm/data/pack.py", "vectorlm/log.py", "vectorlm/__init__.py", "vectorlm/data/__init__.py"} <= pack
    assert "vectorlm/train/step.py" not in pack and "vectorlm/data/tokenize.py" not in pack
    # train.py imports vectorlm.train.launch, which imports the job, LoRA ... and the ranks' entry point (run as
    # python -m vectorlm.train.rank), which it imports to name it: the ranks' code counts too.
    expected = {"vectorlm/train/step.py", "vectorlm/train/model.py", "vectorlm/train/checkpoint.py",
                "vectorlm/train/trainer.py", "vectorlm/train/rank.py", "vectorlm/data/prefetch.py"}  # fmt: skip
    assert expected <= train, expected - train
    # What the data and training sides share (the ignore index) sits below both: neither is part of the other's code.
    assert "vectorlm/data/pack.py" not in train and "vectorlm/packed.py" in train and "vectorlm/packed.py" in pack
    assert not any(module.startswith("vectorlm/pipeline/") for module in pack | train | tokenize)
    assert code_digest(REPO / "workflow_scripts" / "pack.py") != code_digest(REPO / "workflow_scripts" / "train.py")
