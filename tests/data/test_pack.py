import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from vectorlm.data.loader import collate
from vectorlm.data.pack import IGNORE_INDEX, best_fit_decreasing, pack_dataset, plan_packing, split_into_chunks
from vectorlm.step import forward_logits


def tokenized(docs: list[list[int]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": docs})


def documents_in(row: dict) -> list[list[int]]:
    """The documents of a packed row, split where position_ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    return [list(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]


def test_split_into_chunks():
    doc, start, length = split_into_chunks(np.array([3, 10, 4]), 4)
    assert doc.tolist() == [0, 1, 1, 1, 2]
    assert start.tolist() == [0, 0, 4, 8, 0]
    assert length.tolist() == [3, 4, 4, 2, 4]


def test_best_fit_decreasing_fills_bins():
    sizes = np.array([5, 4, 3, 3, 2, 2, 1])  # 20 tokens: two bins of 10 are possible
    bins, num_bins = best_fit_decreasing(sizes, 10)
    assert num_bins == 2
    assert all(sizes[bins == b].sum() <= 10 for b in range(num_bins))


def test_best_fit_decreasing_beats_sequential_packing():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 200, size=2000)
    _, num_bins = best_fit_decreasing(sizes, 256)
    assert num_bins <= int(np.ceil(sizes.sum() / 256 * 1.02))  # within 2% of the lower bound


def test_packed_rows_hold_every_document_once(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 100, size=n).tolist() for n in rng.integers(2, 40, size=300)]
    packed, stats = pack_dataset(tokenized(docs), max_seq_len=64, cache_dir=tmp_path)
    rows = list(packed)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sorted(map(tuple, (d for r in rows for d in documents_in(r)))) == sorted(map(tuple, docs))
    assert stats["rows"] == len(rows) and stats["tokens"] == sum(map(len, docs))
    assert stats["fill_fraction"] > 0.95


def test_labels_mask_each_document_start(tmp_path):
    packed, _ = pack_dataset(tokenized([[5, 6, 7], [8, 9], [10, 11, 12, 13]]), max_seq_len=16, cache_dir=tmp_path)
    (row,) = list(packed)
    for doc_start, pos in enumerate(row["position_ids"]):
        expected = IGNORE_INDEX if pos == 0 else row["input_ids"][doc_start]
        assert row["labels"][doc_start] == expected


def test_long_documents_are_chunked_and_tiny_chunks_dropped(tmp_path):
    packed, stats = pack_dataset(tokenized([list(range(2, 23))]), max_seq_len=10, cache_dir=tmp_path)
    chunks = sorted((d for r in packed for d in documents_in(r)), key=lambda d: d[0])
    assert chunks == [list(range(2, 12)), list(range(12, 22))]  # the 1-token tail [22] cannot carry loss
    assert stats["documents_split"] == 1 and stats["chunks_dropped"] == 1


def test_plan_is_deterministic():
    lengths = np.random.default_rng(2).integers(1, 300, size=500)
    a, b = plan_packing(lengths, 128), plan_packing(lengths, 128)
    assert np.array_equal(a.row, b.row) and np.array_equal(a.doc, b.doc)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_documents_in_a_packed_row_do_not_attend_to_each_other(tmp_path, tiny_model_dir, attention):
    rng = np.random.default_rng(3)
    docs = [rng.integers(2, 300, size=n).tolist() for n in (40, 17, 60, 9, 25)]
    packed, _ = pack_dataset(tokenized(docs), max_seq_len=128, cache_dir=tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    rows = list(packed)
    batch = collate(rows, flatten=False)  # several rows, padded: the layout training uses
    with torch.no_grad():
        logits = forward_logits(model, batch)
        checked = 0
        for r, row in enumerate(rows):
            offset = 0
            for doc in documents_in(row):
                alone = model(input_ids=torch.tensor([doc])).logits[0]
                inside = logits[r, offset : offset + len(doc)]
                torch.testing.assert_close(inside, alone, atol=1e-5, rtol=0)
                offset += len(doc)
                checked += 1
    assert checked == len(docs) and any(len(documents_in(r)) > 1 for r in rows)


def test_without_restarting_positions_documents_would_leak(tiny_model_dir):
    """The control for the test above: the same row with plain positions gives different logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    first, second = list(range(10, 30)), list(range(40, 55))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([second])).logits[0]
        leaked = model(input_ids=torch.tensor([first + second]), use_cache=False).logits[0, len(first) :]
    assert (leaked - alone).abs().max() > 1e-3
