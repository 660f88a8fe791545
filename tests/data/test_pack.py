import hashlib
import itertools
import json

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import requires_gpu
from vectorlm.data.loader import collate
from vectorlm.data.pack import (
    IGNORE_INDEX,
    best_fit_decreasing,
    pack_dataset,
    plan_packing,
    run_pack,
    split_into_chunks,
)
from vectorlm.train.attention import FLASH_VARLEN
from vectorlm.train.step import forward_logits


def tokenized(docs: list[list[int]], masks: list[list[int]] | None = None) -> datasets.Dataset:
    columns = {"input_ids": docs} | ({"loss_mask": masks} if masks is not None else {})
    return datasets.Dataset.from_dict(columns)


def pack(tmp_path, docs, masks=None, **options):
    return pack_dataset(tokenized(docs, masks), path=tmp_path / "packed.arrow", digest=hashlib.sha256(), **options)


def documents_in(row: dict) -> list[list[int]]:
    """The documents of a packed row, split where position_ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [list(row["input_ids"][a:b]) for a, b in itertools.pairwise(starts)]


def test_split_into_chunks():
    doc, start, length = split_into_chunks(np.array([3, 10, 4]), 4)
    assert doc.tolist() == [0, 1, 1, 1, 2]
    assert start.tolist() == [0, 0, 4, 8, 0]
    assert length.tolist() == [3, 4, 4, 2, 4]


def test_a_lone_last_token_is_chunked_with_the_one_before_it():
    doc, start, length = split_into_chunks(np.array([9, 1]), 4)  # 0-3, 4-7, then only the EOS at 8
    assert doc.tolist() == [0, 0, 0, 1] and start.tolist() == [0, 4, 7, 0] and length.tolist() == [4, 4, 2, 1]


def test_split_into_chunks_with_overlap():
    _doc, start, length = split_into_chunks(np.array([10]), 4, overlap=1)
    assert start.tolist() == [0, 3, 6] and length.tolist() == [4, 4, 4]  # 0-3, 3-6, 6-9 then 9 is covered


def test_best_fit_decreasing_fills_bins():
    sizes = np.array([5, 4, 3, 3, 2, 2, 1])  # 20 tokens: two bins of 10 are possible
    bins, num_bins = best_fit_decreasing(sizes, 10)
    assert num_bins == 2
    assert all(sizes[bins == b].sum() <= 10 for b in range(num_bins))


def test_best_fit_decreasing_beats_sequential_packing():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 200, size=2000)
    bins, num_bins = best_fit_decreasing(sizes, 256)
    assert num_bins <= int(np.ceil(sizes.sum() / 256 * 1.02))  # within 2% of the lower bound
    assert np.bincount(bins, weights=sizes).max() <= 256


def test_packed_rows_hold_every_document_once(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 100, size=n).tolist() for n in rng.integers(2, 40, size=300)]
    packed, stats = pack(tmp_path, docs, max_seq_len=64)
    rows = list(packed)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(map(tuple, (d for r in rows for d in documents_in(r)))) == sorted(map(tuple, docs))
    assert stats["rows"] == len(rows) and stats["tokens"] == sum(map(len, docs))
    assert stats["fill_fraction"] > 0.95
    assert stats["loss_tokens"] == sum(len(d) - 1 for d in docs)  # all but each document's first token


def test_labels_mask_each_document_start(tmp_path):
    packed, _ = pack(tmp_path, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], max_seq_len=16)
    (row,) = list(packed)
    for index, position in enumerate(row["position_ids"]):
        expected = IGNORE_INDEX if position == 0 else row["input_ids"][index]
        assert row["labels"][index] == expected


def test_long_documents_are_chunked_and_the_last_token_kept(tmp_path):
    packed, stats = pack(tmp_path, [list(range(2, 23)), [99]], max_seq_len=10)
    rows = list(packed)
    chunks = sorted((d for r in rows for d in documents_in(r)), key=lambda d: d[0])
    # The 1-token tail [22] (a document's EOS) goes with the token before it, which stays context; a 1-token
    # document cannot carry loss and is dropped.
    assert chunks == [list(range(2, 12)), list(range(12, 22)), [21, 22]]
    tail = next(r for r in rows if r["input_ids"][:2] == [21, 22] or [21, 22] in documents_in(r))
    at = tail["input_ids"].index(21)
    assert tail["labels"][at : at + 2] == [IGNORE_INDEX, 22]
    assert stats["documents_split"] == 1 and stats["chunks_dropped_too_short"] == 1


def test_overlapping_chunks_carry_no_loss_on_the_repeated_context(tmp_path):
    packed, _ = pack(tmp_path, [list(range(100, 120))], max_seq_len=8, overlap=2, packing=False)
    rows = sorted(packed, key=lambda r: r["input_ids"][0])
    assert [r["input_ids"][0] for r in rows] == [100, 106, 112] and rows[-1]["input_ids"][-1] == 119
    second = rows[1]
    assert second["input_ids"][:2] == [106, 107]  # repeated from the first chunk
    assert second["labels"][:3] == [IGNORE_INDEX, IGNORE_INDEX, 108]  # 107 was already a target in chunk 1


def test_instruction_documents_are_truncated_and_dropped_without_loss(tmp_path):
    docs = [list(range(10, 30)), list(range(40, 50)), list(range(60, 75))]
    masks = [[0] * 5 + [1] * 15, [0] * 3 + [1] * 7, [0] * 14 + [1]]  # the last trains only on its 15th token
    packed, stats = pack(tmp_path, docs, masks, max_seq_len=12)
    rows = list(packed)
    kept = sorted((d for r in rows for d in documents_in(r)), key=lambda d: d[0])
    assert kept == [list(range(10, 22)), list(range(40, 50))]  # truncated to 12, not chunked; the third dropped
    assert stats["documents_truncated"] == 2 and stats["documents_dropped_no_loss_after_truncation"] == 1
    labels = next(r["labels"] for r in rows if 10 in r["input_ids"])
    start = next(r["input_ids"] for r in rows if 10 in r["input_ids"]).index(10)
    assert labels[start : start + 5] == [IGNORE_INDEX] * 5 and labels[start + 5] == 15
    # Of 15 + 7 + 1 trainable tokens, 8 lie past the 12th token and 1 goes with the dropped document.
    assert stats["loss_tokens_before_packing"] == 23 and stats["loss_tokens_lost_fraction"] == round(9 / 23, 4)


def test_packing_warns_when_truncation_loses_much_of_the_loss(tmp_path, caplog):
    docs, masks = [list(range(10, 40))] * 4, [[0] * 10 + [1] * 20] * 4
    tok = tmp_path / "tok"
    datasets.DatasetDict({"train": tokenized(docs, masks), "eval": tokenized(docs, masks)}).save_to_disk(str(tok))
    with caplog.at_level("WARNING"):
        stats = run_pack(tokenized_dir=tok, max_seq_len=16, output_dir=tmp_path / "packed")
    assert stats["train"]["loss_tokens_lost_fraction"] == round(1 - 6 / 20, 4)  # positions 10-15 of 10-29 left
    assert "packing the train split at max_seq_len 16 lost 70% of its loss tokens" in caplog.text
    saved = json.loads((tmp_path / "packed" / "stats.json").read_text())
    assert len(saved["warnings"]) == 2 and "4 documents truncated" in saved["warnings"][0]


def test_without_packing_each_document_is_a_row(tmp_path):
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    packed, stats = pack(tmp_path, docs, max_seq_len=16, packing=False)
    assert sorted(r["input_ids"] for r in packed) == sorted(docs) and stats["rows"] == 3


def test_plan_is_deterministic():
    lengths = np.random.default_rng(2).integers(1, 300, size=500)
    a, b = plan_packing(lengths, 128), plan_packing(lengths, 128)
    assert np.array_equal(a.row, b.row) and np.array_equal(a.doc, b.doc)


def check_isolation(model, rows, *, flatten: bool, device: str = "cpu") -> int:
    """Compares every document's logits inside the batch with its logits alone; returns how many were checked."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows, flatten=flatten).items()}
    with torch.no_grad():
        logits = forward_logits(model, batch)
        checked, offset = 0, 0
        for r, row in enumerate(rows):
            if not flatten:
                offset = 0
            for doc in documents_in(row):
                alone = model(input_ids=torch.tensor([doc], device=device)).logits[0]
                inside = logits[0 if flatten else r, offset : offset + len(doc)]
                torch.testing.assert_close(
                    inside.float(), alone.float(), atol=1e-5 if device == "cpu" else 2e-2, rtol=0
                )
                offset += len(doc)
                checked += 1
    return checked


@pytest.mark.parametrize("instruction", [False, True], ids=["text", "instruction"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("flatten", [False, True], ids=["padded", "flattened"])
def test_documents_in_a_packed_row_do_not_attend_to_each_other(tmp_path, tiny_model_dir, attention, instruction,
                                                               flatten):  # fmt: skip
    rng = np.random.default_rng(3)
    docs = [rng.integers(2, 300, size=n).tolist() for n in (40, 17, 60, 9, 25)]
    masks = [[0] * (len(d) // 2) + [1] * (len(d) - len(d) // 2) for d in docs] if instruction else None
    packed, _ = pack(tmp_path, docs, masks, max_seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    rows = list(packed)
    assert any(len(documents_in(r)) > 1 for r in rows)
    assert check_isolation(model, rows, flatten=flatten) == len(docs)


@requires_gpu
def test_flash_attention_varlen_isolates_documents_on_gpu(tmp_path, tiny_model_dir):
    pytest.importorskip("flash_attn")
    rng = np.random.default_rng(4)
    docs = [rng.integers(2, 300, size=n).tolist() for n in (40, 17, 60, 9, 25)]
    packed, _ = pack(tmp_path, docs, max_seq_len=128)
    model = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=FLASH_VARLEN, dtype=torch.bfloat16)
        .to("cuda")
        .eval()
    )
    assert check_isolation(model, list(packed), flatten=True, device="cuda") == len(docs)


def test_without_restarting_positions_documents_would_leak(tiny_model_dir):
    """The control for the tests above: the same row with plain positions gives different logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    first, second = list(range(10, 30)), list(range(40, 55))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second])).logits[0]
        leaked = model(input_ids=torch.tensor([first + second]), use_cache=False).logits[0, len(first) :]
    assert (leaked - alone).abs().max() > 1e-3
