"""Packing preference pairs: a pair's two documents share a row, chosen first, and are truncated to fit it."""

import itertools

import datasets
import numpy as np
import pytest

from tests.conftest import write_jsonl
from vectorlm.config import DataConfig
from vectorlm.data.loader import document_lengths
from vectorlm.data.pack import pair_lengths, run_pack
from vectorlm.data.tokenize import run_tokenize
from vectorlm.packed import IGNORE_INDEX


def preference_rows(count: int, *, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"prompt": f"Story {i}: the fox" + " ran" * int(rng.integers(1, 8)),
         "chosen": " and smiled" * int(rng.integers(1, 6)), "rejected": " and frowned" * int(rng.integers(1, 6))}
        for i in range(count)
    ]  # fmt: skip


def packed_pairs(tmp_path, model_dir, rows, *, max_seq_len, packing=True, name="data"):
    data = DataConfig(train=str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), prompt_field="prompt",
                      chosen_field="chosen", rejected_field="rejected", eval_fraction=0.1)  # fmt: skip
    run_tokenize(model_dir=model_dir, data=data, output_dir=tmp_path / f"{name}-tok")
    tokenized = datasets.load_from_disk(str(tmp_path / f"{name}-tok"))
    stats = run_pack(tokenized_dir=tmp_path / f"{name}-tok", max_seq_len=max_seq_len, output_dir=tmp_path / name,
                     packing=packing, pairs=True)  # fmt: skip
    return tokenized, datasets.load_from_disk(str(tmp_path / name)), stats


def row_documents(row) -> list[tuple[list[int], list[int]]]:
    lengths = document_lengths(np.asarray(row["position_ids"]))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("packing", [True, False])
def test_each_pair_shares_a_row_chosen_first(tmp_path, tiny_model_dir, packing):
    tokenized, packed, stats = packed_pairs(tmp_path, tiny_model_dir, preference_rows(60), max_seq_len=256,
                                            packing=packing)  # fmt: skip
    assert stats["train"]["pairs_truncated"] == 0
    pairs = {}
    for document in range(0, len(tokenized["train"]), 2):
        chosen, rejected = tokenized["train"][document], tokenized["train"][document + 1]
        pairs[tuple(chosen["input_ids"])] = tuple(rejected["input_ids"])
    seen = 0
    for row in packed["train"]:
        documents = row_documents(row)
        assert len(documents) % 2 == 0
        if not packing:
            assert len(documents) == 2
        for (chosen, _), (rejected, labels) in zip(documents[0::2], documents[1::2]):
            assert pairs[tuple(chosen)] == tuple(rejected)
            assert labels[0] == IGNORE_INDEX and any(label != IGNORE_INDEX for label in labels)
            seen += 1
    assert seen == stats["train"]["pairs"] == len(pairs)
    assert stats["pairs"] is True and stats["train"]["rows"] == len(packed["train"])
    if packing:
        assert stats["train"]["rows"] < seen  # several pairs per row


def test_long_pairs_are_cut_to_share_one_row():
    chosen, rejected = pair_lengths(np.array([10, 300, 300, 40]), np.array([20, 50, 300, 400]), 256)
    assert chosen.tolist() == [10, 206, 128, 40] and rejected.tolist() == [20, 50, 128, 216]
    assert ((chosen + rejected) <= 256).all()


def test_a_pair_that_loses_its_completion_to_truncation_is_dropped(tmp_path, tiny_model_dir):
    rows = preference_rows(20)
    rows[3]["prompt"] = "long " * 200  # the completions start past any share of the row
    _, packed, stats = packed_pairs(tmp_path, tiny_model_dir, rows, max_seq_len=128)
    dropped = stats["train"]["pairs_dropped_no_loss_after_truncation"] + stats["eval"][
        "pairs_dropped_no_loss_after_truncation"]  # fmt: skip
    assert dropped == 1
    assert all(len(row["input_ids"]) <= 128 for row in packed["train"])
