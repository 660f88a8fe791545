"""The pack stage: tokenized documents into rows of at most ``max_seq_len`` tokens that never mix documents.

Each row holds whole documents (or chunks of long ones) back to back. ``position_ids`` restart at 0 for every
document, which is what makes attention block-diagonal in training (see :mod:`vectorlm.data.loader`), and the label
of each document's first token is -100 so that no document is trained to predict across a boundary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np

from vectorlm.config import write_stage_config
from vectorlm.inputs import DataError

log = logging.getLogger(__name__)

# Bumped whenever the packed artifact changes shape, so Snakemake repacks (the rule passes it as a param).
ARTIFACT_VERSION = 2  # 2: stats.json holds the content fingerprint
IGNORE_INDEX = -100
PACKED_FEATURES = datasets.Features(
    {name: datasets.Sequence(datasets.Value("int32")) for name in ("input_ids", "labels", "position_ids")}
)


@dataclass
class PackingPlan:
    """Where every chunk of every document goes: chunk ``i`` is ``input_ids[doc[i]][start[i]:start[i] + length[i]]``
    and lands in row ``row[i]``; chunks are listed row by row."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row: np.ndarray
    num_rows: int
    num_dropped: int


def split_into_chunks(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits documents longer than ``max_len`` into consecutive chunks; returns (doc, start, length) per chunk."""
    num_chunks = np.maximum(1, -(-lengths // max_len))
    doc = np.repeat(np.arange(len(lengths)), num_chunks)
    first_chunk = np.cumsum(num_chunks) - num_chunks
    start = (np.arange(len(doc)) - np.repeat(first_chunk, num_chunks)) * max_len
    length = np.minimum(max_len, lengths[doc] - start)
    return doc, start, length


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assigns items to bins of ``capacity``: longest first, each into the fullest bin it still fits.

    Returns the bin of each item and the number of bins. Open bins are kept in stacks by free space, so finding the
    best fit is one vectorised scan over at most ``capacity`` counters.
    """
    assert lengths.size == 0 or (lengths.min() > 0 and lengths.max() <= capacity)
    bins = np.empty(len(lengths), dtype=np.int64)
    open_count = np.zeros(capacity + 1, dtype=np.int64)
    open_bins: list[list[int]] = [[] for _ in range(capacity + 1)]
    num_bins = 0
    for item in np.argsort(-lengths, kind="stable"):
        size = int(lengths[item])
        fits = np.flatnonzero(open_count[size:])
        if fits.size:
            space = size + int(fits[0])
            target = open_bins[space].pop()
            open_count[space] -= 1
        else:
            space, target = capacity, num_bins
            num_bins += 1
        bins[item] = target
        left = space - size
        if left:
            open_bins[left].append(target)
            open_count[left] += 1
    return bins, num_bins


def plan_packing(lengths: np.ndarray, max_seq_len: int) -> PackingPlan:
    """Chunks documents to ``max_seq_len`` and bin-packs the chunks into rows.

    Chunks of a single token are dropped: their only label is masked, so they could carry no loss.
    """
    doc, start, length = split_into_chunks(np.asarray(lengths, dtype=np.int64), max_seq_len)
    keep = length >= 2
    doc, start, length = doc[keep], start[keep], length[keep]
    row, num_rows = best_fit_decreasing(length, max_seq_len)
    order = np.argsort(row, kind="stable")
    return PackingPlan(doc[order], start[order], length[order], row[order], num_rows, int((~keep).sum()))


def _rows(tokenized: datasets.Dataset, plan: PackingPlan, rows_per_batch: int = 1024) -> Iterator[dict[str, Any]]:
    row_starts = np.searchsorted(plan.row, np.arange(plan.num_rows + 1))
    arrow = tokenized.with_format("arrow")
    for first in range(0, plan.num_rows, rows_per_batch):
        lo, hi = row_starts[first], row_starts[min(first + rows_per_batch, plan.num_rows)]
        docs, local = np.unique(plan.doc[lo:hi], return_inverse=True)
        column = arrow[docs.tolist()]["input_ids"].combine_chunks()
        offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
        for r in range(first, min(first + rows_per_batch, plan.num_rows)):
            pieces = range(row_starts[r] - lo, row_starts[r + 1] - lo)
            ids, labels, positions = [], [], []
            for i in pieces:
                begin = offsets[local[i]] + plan.start[lo + i]
                chunk = values[begin : begin + plan.length[lo + i]]
                ids.append(chunk)
                masked = chunk.copy()
                masked[0] = IGNORE_INDEX
                labels.append(masked)
                positions.append(np.arange(len(chunk), dtype=np.int32))
            yield {
                "input_ids": np.concatenate(ids),
                "labels": np.concatenate(labels),
                "position_ids": np.concatenate(positions),
            }


def pack_dataset(tokenized: datasets.Dataset, *, max_seq_len: int, cache_dir: str | Path) -> tuple[datasets.Dataset, dict]:
    """Packed rows of ``tokenized`` (a Dataset with ``input_ids``) and statistics of the packing."""
    lengths = tokenized.with_format("arrow")["input_ids"].combine_chunks().value_lengths().to_numpy()
    plan = plan_packing(lengths, max_seq_len)
    packed = datasets.Dataset.from_generator(
        _rows, gen_kwargs={"tokenized": tokenized, "plan": plan}, features=PACKED_FEATURES, cache_dir=str(cache_dir)
    )
    num_tokens = int(plan.length.sum())
    slots = plan.num_rows * max_seq_len
    stats = {
        "documents": len(lengths),
        "chunks": len(plan.doc),
        "documents_split": int((lengths > max_seq_len).sum()),
        "chunks_dropped": plan.num_dropped,
        "tokens": num_tokens,
        "rows": plan.num_rows,
        "fill_fraction": round(num_tokens / slots, 4) if slots else 0.0,
        "loss_token_fraction": round((num_tokens - len(plan.doc)) / slots, 4) if slots else 0.0,
    }
    return packed, stats


def fingerprint(packed: dict[str, datasets.Dataset]) -> str:
    """A digest of the packed rows' contents: a checkpoint trained on other data is never resumed on these."""
    digest = hashlib.blake2b(digest_size=16)
    for split in sorted(packed):
        digest.update(split.encode())
        for batch in packed[split].with_format("arrow").iter(batch_size=65536):
            for column in ("input_ids", "labels", "position_ids"):
                values = batch[column].combine_chunks()
                digest.update(values.value_lengths().to_numpy().tobytes())
                digest.update(values.flatten().to_numpy().tobytes())
    return digest.hexdigest()


def run_pack(*, tokenized_dir: str | Path, max_seq_len: int, output_dir: str | Path) -> dict[str, Any]:
    """Packs every split of the tokenized DatasetDict into ``output_dir``; writes and returns the statistics."""
    output_dir = Path(output_dir)
    tokenized = datasets.load_from_disk(str(tokenized_dir))
    splits, stats = {}, {"max_seq_len": max_seq_len}
    with tempfile.TemporaryDirectory(prefix="pack-", dir=output_dir.parent) as cache_dir:
        for split, dataset in tokenized.items():
            splits[split], stats[split] = pack_dataset(dataset, max_seq_len=max_seq_len, cache_dir=cache_dir)
            if stats[split]["rows"] == 0:
                raise DataError(f"the {split} split packs into no rows: every document is shorter than 2 tokens")
            log.info("packed %s: %s", split, json.dumps(stats[split]))
        datasets.DatasetDict(splits).save_to_disk(str(output_dir))
        stats["fingerprint"] = fingerprint(splits)
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_stage_config(output_dir, {"max_seq_len": max_seq_len}, upstream=tokenized_dir)
    return stats
