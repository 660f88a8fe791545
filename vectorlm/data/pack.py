"""The pack stage: tokenized documents into training rows of at most ``max_seq_len`` tokens that never mix documents.

Text documents longer than ``max_seq_len`` are split into chunks (each may repeat ``data.chunk_overlap`` tokens of
the previous one as context, without loss); instruction documents are truncated instead, since a chunk without its
prompt would teach nothing, and dropped (counted) when no trainable token survives. With ``data.packing`` the chunks
are bin-packed into rows (best fit decreasing); without it each chunk is a row of its own, padded per batch later.

In a row, ``position_ids`` restart at 0 for every document, which is what makes attention block-diagonal in
training (see :mod:`vectorlm.data.loader`), and each document's first label is -100 so that nothing is trained to
predict across a boundary. Rows are built a batch at a time with vectorised gathers and written straight to Arrow.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from vectorlm.config import write_stage_config
from vectorlm.data.arrow import ColumnsWriter, ListColumn, list_lengths, partial_dir, ranges
from vectorlm.data.sources import DataError
from vectorlm.log import Progress

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PACKED_COLUMNS = ["input_ids", "labels", "position_ids"]


@dataclass
class PackingPlan:
    """Where every chunk goes: chunk ``i`` is ``input_ids[doc[i]][start[i]:start[i] + length[i]]``, its first
    ``context[i]`` tokens carry no loss, and it lands in row ``row[i]``; chunks are listed row by row."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    context: np.ndarray
    row: np.ndarray
    num_rows: int
    num_dropped: int


def split_into_chunks(
    lengths: np.ndarray, max_len: int, *, overlap: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits documents longer than ``max_len`` into chunks that each start ``max_len - overlap`` tokens after the
    previous one; returns (doc, start, length) per chunk.

    A last chunk of a single token (the document's EOS, when ``overlap`` is 0) could carry no loss, since a chunk's
    first token is never a target: it starts one token earlier instead, so that EOS is still learnt.
    """
    stride = max_len - overlap
    num_chunks = np.maximum(1, -(-np.maximum(lengths - overlap, 1) // stride))
    doc = np.repeat(np.arange(len(lengths)), num_chunks)
    first_chunk = np.cumsum(num_chunks) - num_chunks
    start = (np.arange(len(doc)) - np.repeat(first_chunk, num_chunks)) * stride
    length = np.minimum(max_len, lengths[doc] - start)
    lone_tail = (length == 1) & (start > 0)
    start[lone_tail] -= 1
    length[lone_tail] = 2
    return doc, start, length


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Assigns items to bins of ``capacity``: longest first, each into the fullest bin it still fits.

    Returns the bin of each item and the number of bins. Open bins are kept in stacks by free space, and the free
    spaces that have a stack in a sorted list, so the best fit is one binary search.
    """
    assert lengths.size == 0 or (lengths.min() > 0 and lengths.max() <= capacity)
    bins = np.empty(len(lengths), dtype=np.int64)
    open_bins: dict[int, list[int]] = {}
    spaces: list[int] = []  # sorted free spaces that have open bins
    num_bins = 0
    order = np.argsort(-lengths, kind="stable")
    for item, size in zip(order.tolist(), lengths[order].tolist()):
        at = bisect.bisect_left(spaces, size)
        if at < len(spaces):
            space = spaces[at]
            stack = open_bins[space]
            target = stack.pop()
            if not stack:
                del spaces[at]
        else:
            space, target = capacity, num_bins
            num_bins += 1
        bins[item] = target
        left = space - size
        if left:
            stack = open_bins.setdefault(left, [])
            if not stack:
                bisect.insort(spaces, left)
            stack.append(target)
    return bins, num_bins


def plan_packing(
    lengths: np.ndarray, max_seq_len: int, *, overlap: int = 0, truncate: bool = False, packing: bool = True
) -> PackingPlan:
    """Chunks (or truncates) documents to ``max_seq_len`` and assigns the chunks to rows.

    Chunks of a single token are dropped: their only label is masked, so they could carry no loss.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if truncate:
        doc, start, length = np.arange(len(lengths)), np.zeros(len(lengths), np.int64), np.minimum(lengths, max_seq_len)
    else:
        doc, start, length = split_into_chunks(lengths, max_seq_len, overlap=overlap)
    context = np.where(start > 0, overlap, 0)
    keep = length >= 2
    doc, start, length, context = doc[keep], start[keep], length[keep], context[keep]
    if packing:
        row, num_rows = best_fit_decreasing(length, max_seq_len)
    else:
        row, num_rows = np.arange(len(length)), len(length)
    order = np.argsort(row, kind="stable")
    return PackingPlan(
        doc[order], start[order], length[order], context[order], row[order], num_rows, int((~keep).sum())
    )


def _materialize(tokenized: datasets.Dataset, plan: PackingPlan, writer: ColumnsWriter, digest, rows_per_batch=4096):
    """Builds and writes the planned rows; returns the number of loss tokens."""
    row_starts = np.searchsorted(plan.row, np.arange(plan.num_rows + 1))
    table = tokenized.data.table
    input_ids = ListColumn(table.column("input_ids"))
    loss_mask = ListColumn(table.column("loss_mask")) if "loss_mask" in table.column_names else None
    loss_tokens = 0
    progress = Progress(plan.num_rows, desc="pack", unit="rows")
    for first in range(0, plan.num_rows, rows_per_batch):
        lo, hi = row_starts[first], row_starts[min(first + rows_per_batch, plan.num_rows)]
        docs, starts, length = plan.doc[lo:hi], plan.start[lo:hi], plan.length[lo:hi]
        tokens = input_ids.gather(docs, starts, length)
        positions = ranges(np.zeros(len(length), np.int64), length)
        labels = tokens.copy()
        labels[positions < np.maximum(np.repeat(plan.context[lo:hi], length), 1)] = IGNORE_INDEX
        if loss_mask is not None:
            labels[loss_mask.gather(docs, starts, length) == 0] = IGNORE_INDEX
        row_lengths = np.bincount(plan.row[lo:hi] - first, weights=length).astype(np.int64)
        batch = writer.write(row_lengths, input_ids=tokens, labels=labels, position_ids=positions)
        for array in batch.columns:
            digest.update(array.offsets.to_numpy().tobytes())
            digest.update(array.flatten().to_numpy().tobytes())
        loss_tokens += int((labels != IGNORE_INDEX).sum())
        progress.update(len(row_lengths))
    progress.close()
    return loss_tokens


def instruction_losses(
    tokenized: datasets.Dataset, max_seq_len: int, batch_size: int = 65536
) -> tuple[np.ndarray, int]:
    """For instruction documents, in one pass over their loss masks: whether any loss token survives truncation to
    ``max_seq_len``, per document, and how many loss tokens all documents hold before anything is cut (a document's
    first token never carries loss)."""
    trainable, total = [], 0
    for batch in tokenized.with_format("arrow").select_columns(["loss_mask"]).iter(batch_size=batch_size):
        masks = batch["loss_mask"].combine_chunks()
        lengths = masks.value_lengths().to_numpy()
        kept = np.minimum(lengths, max_seq_len)
        flags = masks.flatten().to_numpy()
        positions = ranges(np.zeros(len(lengths), np.int64), lengths)
        total += int(flags[positions >= 1].sum())
        counted = np.where((positions >= 1) & (positions < np.repeat(kept, lengths)), flags, 0)
        trainable.append(np.add.reduceat(counted, np.cumsum(lengths) - lengths) > 0 if len(counted) else kept > 0)
    return (np.concatenate(trainable) if trainable else np.zeros(0, dtype=bool)), total


def pack_dataset(
    tokenized: datasets.Dataset, *, max_seq_len: int, path: Path, digest, overlap: int = 0, packing: bool = True
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Packed rows of ``tokenized`` written to the Arrow file ``path``, and statistics of the packing."""
    lengths = list_lengths(tokenized)
    truncate = "loss_mask" in tokenized.column_names
    usable = lengths
    no_loss = np.zeros(len(lengths), dtype=bool)
    targets = int(np.maximum(lengths - 1, 0).sum())  # text: every token but a document's first
    if truncate:
        trainable, targets = instruction_losses(tokenized, max_seq_len)
        no_loss = ~trainable
        usable = np.where(no_loss, 0, lengths)  # zero-length documents are dropped by the plan
    plan = plan_packing(usable, max_seq_len, overlap=overlap, truncate=truncate, packing=packing)
    writer = ColumnsWriter(path, PACKED_COLUMNS)
    loss_tokens = _materialize(tokenized, plan, writer, digest)
    packed = writer.finish()
    num_tokens, slots = int(plan.length.sum()), plan.num_rows * max_seq_len
    too_long = int((lengths > max_seq_len).sum())
    stats = {
        "documents": len(lengths),
        "chunks": len(plan.doc),
        "documents_split": 0 if truncate else too_long,
        "documents_truncated": too_long if truncate else 0,
        "documents_dropped_no_loss_after_truncation": int(no_loss.sum()),
        "chunks_dropped_too_short": int(plan.num_dropped - no_loss.sum()),
        "tokens": num_tokens,
        "loss_tokens": loss_tokens,
        "rows": plan.num_rows,
        "fill_fraction": round(num_tokens / slots, 4) if slots else 0.0,
        "loss_token_fraction": round(loss_tokens / slots, 4) if slots else 0.0,
        "loss_tokens_before_packing": targets,
        "loss_tokens_lost_fraction": round(1 - loss_tokens / targets, 4) if targets else 0.0,
    }
    return packed, stats


# Above this share of the loss tokens cut away by truncation, dropped documents and chunk starts, pack warns (in its log
# and in the workflow's final summary).
LOST_LOSS_WARNING = 0.05


def lost_loss_warning(split_stats: dict[str, Any], *, split: str, max_seq_len: int) -> str | None:
    """A warning when packing cut away more than :data:`LOST_LOSS_WARNING` of a split's loss tokens, else None."""
    lost = split_stats.get("loss_tokens_lost_fraction", 0.0)
    if lost <= LOST_LOSS_WARNING:
        return None
    return (
        f"packing the {split} split at max_seq_len {max_seq_len} lost {lost:.0%} of its loss tokens "
        f"({split_stats['documents_truncated']:,} documents truncated, "
        f"{split_stats['documents_dropped_no_loss_after_truncation']:,} dropped with no loss left): raise max_seq_len "
        "or shorten the documents"
    )


def run_pack(
    *, tokenized_dir: str | Path, max_seq_len: int, output_dir: str | Path, overlap: int = 0, packing: bool = True
) -> dict[str, Any]:
    """Packs every split of the tokenized DatasetDict into ``output_dir``; writes and returns the statistics."""
    output_dir = Path(output_dir)
    tokenized = datasets.load_from_disk(str(tokenized_dir))
    splits, stats = {}, {"max_seq_len": max_seq_len, "packing": packing, "chunk_overlap": overlap}
    digest = hashlib.sha256()  # hardware-accelerated: ~2x blake2b here
    with partial_dir(output_dir) as tmp:
        for split, dataset in tokenized.items():
            digest.update(split.encode())
            splits[split], stats[split] = pack_dataset(dataset, max_seq_len=max_seq_len, path=tmp / split,
                                                       digest=digest, overlap=overlap, packing=packing)  # fmt: skip
            if stats[split]["rows"] == 0:
                raise DataError(f"the {split} split packs into no rows: {json.dumps(stats[split])}")
            log.info("packed %s: %s", split, json.dumps(stats[split]))
            if warning := lost_loss_warning(stats[split], split=split, max_seq_len=max_seq_len):
                log.warning("%s", warning)
                stats.setdefault("warnings", []).append(warning)
        datasets.DatasetDict(splits).save_to_disk(str(output_dir))
    # What a checkpoint must have been trained on to be resumed on these rows (see vectorlm.resume).
    stats["fingerprint"] = digest.hexdigest()[:32]
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_stage_config(output_dir, {"max_seq_len": max_seq_len}, upstream=tokenized_dir)
    return stats
