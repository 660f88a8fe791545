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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from vectorlm.config import write_stage_config
from vectorlm.data.arrow import ColumnsWriter, ListColumn, list_lengths, partial_dir, ranges
from vectorlm.data.sources import DataError
from vectorlm.log import Progress
from vectorlm.packed import COLUMNS, IGNORE_INDEX, STATS_FILE

log = logging.getLogger(__name__)


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


def _materialize(tokenized: datasets.Dataset, plan: PackingPlan, writer: ColumnsWriter, digest, groups: np.ndarray,
                 rows_per_batch=4096) -> np.ndarray:  # fmt: skip
    """Builds and writes the planned rows; returns the number of loss tokens of each group (``groups``: the group of
    each document)."""
    row_starts = np.searchsorted(plan.row, np.arange(plan.num_rows + 1))
    table = tokenized.data.table
    input_ids = ListColumn(table.column("input_ids"))
    loss_mask = ListColumn(table.column("loss_mask")) if "loss_mask" in table.column_names else None
    loss_tokens = np.zeros(int(groups.max(initial=0)) + 1, dtype=np.int64)
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
        token_groups = np.repeat(groups[docs], length)
        loss_tokens += np.bincount(token_groups[labels != IGNORE_INDEX], minlength=len(loss_tokens))
        progress.update(len(row_lengths))
    progress.close()
    return loss_tokens


def _write_rows(tokenized, plan: PackingPlan, *, path: Path, digest, groups: np.ndarray, max_seq_len: int,
                targets: int) -> tuple[datasets.Dataset, np.ndarray, dict[str, Any]]:  # fmt: skip
    """Writes the planned rows to the Arrow file ``path``; returns them, the loss tokens of each group and the
    statistics of any packing: tokens, loss tokens, rows, how full they are, and the share of the ``targets`` (loss
    tokens before packing) lost."""
    writer = ColumnsWriter(path, list(COLUMNS))
    group_loss_tokens = _materialize(tokenized, plan, writer, digest, groups)
    loss_tokens, num_tokens, slots = int(group_loss_tokens.sum()), int(plan.length.sum()), plan.num_rows * max_seq_len
    return (
        writer.finish(),
        group_loss_tokens,
        {
            "tokens": num_tokens,
            "loss_tokens": loss_tokens,
            "rows": plan.num_rows,
            "fill_fraction": round(num_tokens / slots, 4) if slots else 0.0,
            "loss_token_fraction": round(loss_tokens / slots, 4) if slots else 0.0,
            "loss_tokens_before_packing": targets,
            "loss_tokens_lost_fraction": round(1 - loss_tokens / targets, 4) if targets else 0.0,
        },
    )


def instruction_losses(
    tokenized: datasets.Dataset, max_seq_len: int | np.ndarray, batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """For instruction documents, in one pass over their loss masks: whether any loss token survives truncation to
    ``max_seq_len`` (or each document's own length in an array), and how many loss tokens each holds before anything
    is cut (a document's first token never carries loss)."""
    trainable, totals = [], []
    first = 0
    for batch in tokenized.with_format("arrow").select_columns(["loss_mask"]).iter(batch_size=batch_size):
        masks = batch["loss_mask"].combine_chunks()
        lengths = masks.value_lengths().to_numpy()
        limit = max_seq_len if np.isscalar(max_seq_len) else max_seq_len[first : first + len(lengths)]
        first += len(lengths)
        kept = np.minimum(lengths, limit)
        flags = masks.flatten().to_numpy()
        positions = ranges(np.zeros(len(lengths), np.int64), lengths)
        starts = np.cumsum(lengths) - lengths
        targets = np.where(positions >= 1, flags, 0)
        counted = np.where(positions < np.repeat(kept, lengths), targets, 0)
        nonempty = lengths > 0
        total, survive = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
        total[nonempty] = np.add.reduceat(targets, starts[nonempty]) if len(targets) else 0
        survive[nonempty] = np.add.reduceat(counted, starts[nonempty]) if len(counted) else 0
        trainable.append(survive > 0)
        totals.append(total)
    if not totals:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    return np.concatenate(trainable), np.concatenate(totals)


def pack_dataset(
    tokenized: datasets.Dataset,
    *,
    max_seq_len: int,
    path: Path,
    digest,
    overlap: int = 0,
    packing: bool = True,
    groups: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    seed: int = 0,
    names: list[str] | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Packed rows of ``tokenized`` written to the Arrow file ``path``, and statistics of the packing.

    With ``groups`` (the source of each document) and ``weights`` (one per source), documents are sampled so that
    each source makes that share of the training tokens (see :func:`mixture`); the statistics then have a
    ``sources`` list, in the order of the weights (``names``); the other statistics count the sampled documents.
    """  # fmt: skip
    lengths = list_lengths(tokenized)
    groups = np.zeros(len(lengths), dtype=np.int64) if groups is None else groups
    truncate = "loss_mask" in tokenized.column_names
    usable = lengths
    no_loss = np.zeros(len(lengths), dtype=bool)
    targets = np.maximum(lengths - 1, 0)  # text: every token but a document's first
    if truncate:
        trainable, targets = instruction_losses(tokenized, max_seq_len)
        no_loss = ~trainable
        usable = np.where(no_loss, 0, np.minimum(lengths, max_seq_len))  # zero-length documents are dropped
    sample, tokenized_usable = np.arange(len(lengths)), usable
    if weights is not None:
        sample = mixture(planned_tokens(usable, max_seq_len, overlap=overlap, truncate=truncate), groups, weights,
                         seed=seed, names=names)  # fmt: skip
    lengths, usable, no_loss, targets = lengths[sample], usable[sample], no_loss[sample], int(targets[sample].sum())
    plan = plan_packing(usable, max_seq_len, overlap=overlap, truncate=truncate, packing=packing)
    plan.doc = sample[plan.doc]
    packed, group_loss_tokens, written = _write_rows(tokenized, plan, path=path, digest=digest, groups=groups,
                                                     max_seq_len=max_seq_len, targets=targets)  # fmt: skip
    too_long = int((lengths > max_seq_len).sum())
    stats = {
        "documents": len(lengths),
        "chunks": len(plan.doc),
        "documents_split": 0 if truncate else too_long,
        "documents_truncated": too_long if truncate else 0,
        "documents_dropped_no_loss_after_truncation": int(no_loss.sum()),
        "chunks_dropped_too_short": int(plan.num_dropped - no_loss.sum()),
        **written,
    }
    if weights is not None:
        stats["sources"] = _source_stats(plan, tokenized_usable, groups, sample, group_loss_tokens, weights)
    return packed, stats


def pair_lengths(chosen: np.ndarray, rejected: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The lengths a pair's two documents are truncated to so that both fit one row: unchanged when they fit, else
    each gets half the row, and the rest of a side shorter than half goes to the other."""
    half = max_seq_len // 2
    fits = chosen + rejected <= max_seq_len
    kept_chosen = np.where(fits, chosen, np.minimum(chosen, np.maximum(half, max_seq_len - rejected)))
    kept_rejected = np.where(fits, rejected, np.minimum(rejected, max_seq_len - kept_chosen))
    return kept_chosen, kept_rejected


def pack_pairs(
    tokenized: datasets.Dataset,
    *,
    max_seq_len: int,
    path: Path,
    digest,
    packing: bool = True,
    groups: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    seed: int = 0,
    names: list[str] | None = None,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Packed rows of preference pairs (documents ``2p`` and ``2p + 1`` of ``tokenized``: chosen, rejected), like
    :func:`pack_dataset` with a pair as the unit: its two documents always share a row, one right after the other,
    so that a pair's loss never needs another micro-batch or rank. A pair longer than a row is truncated
    (:func:`pair_lengths`); one whose side keeps no loss token is dropped. With ``weights``, pairs are sampled."""
    lengths = list_lengths(tokenized)
    assert len(lengths) % 2 == 0, "preference documents come in pairs"
    groups = np.zeros(len(lengths), dtype=np.int64) if groups is None else groups
    chosen, rejected = pair_lengths(lengths[0::2], lengths[1::2], max_seq_len)
    kept = np.stack([chosen, rejected], axis=1).ravel()
    trainable, targets = instruction_losses(tokenized, kept)
    usable_pairs = trainable[0::2] & trainable[1::2]
    pair_tokens = np.where(usable_pairs, chosen + rejected, 0)
    sample = np.flatnonzero(usable_pairs)
    if weights is not None:
        sample = mixture(pair_tokens, groups[0::2], weights, seed=seed, names=names)
    if packing:
        pair_row, num_rows = best_fit_decreasing(pair_tokens[sample], max_seq_len)
    else:
        pair_row, num_rows = np.arange(len(sample)), len(sample)
    doc = np.stack([2 * sample, 2 * sample + 1], axis=1).ravel()
    row = np.repeat(pair_row, 2)
    order = np.argsort(row, kind="stable")  # a pair's documents stay next to each other, chosen first
    plan = PackingPlan(doc[order], np.zeros(len(doc), np.int64), kept[doc][order], np.zeros(len(doc), np.int64),
                       row[order], num_rows, int((~usable_pairs).sum()))  # fmt: skip
    packed, group_loss_tokens, written = _write_rows(tokenized, plan, path=path, digest=digest, groups=groups,
                                                     max_seq_len=max_seq_len, targets=int(targets[doc].sum()))  # fmt: skip
    stats = {
        "pairs": len(sample),
        "documents": len(doc),
        "pairs_truncated": int((lengths[0::2] + lengths[1::2] > max_seq_len)[sample].sum()),
        "pairs_dropped_no_loss_after_truncation": int((~usable_pairs).sum()),
        **written,
    }
    if weights is not None:
        stats["sources"] = _source_stats(plan, kept, groups, doc, group_loss_tokens, weights)
    return packed, stats


def planned_tokens(usable: np.ndarray, max_seq_len: int, *, overlap: int, truncate: bool) -> np.ndarray:
    """The tokens each document will make in packed rows: its chunks' (which repeat ``overlap`` tokens) or its
    truncation's, without the chunks too short to train on."""
    plan = plan_packing(usable, max_seq_len, overlap=overlap, truncate=truncate, packing=False)
    return np.bincount(plan.doc, weights=plan.length, minlength=len(usable)).astype(np.int64)


def mixture(lengths: np.ndarray, groups: np.ndarray, weights: np.ndarray, *, seed: int,
            names: list[str] | None = None) -> np.ndarray:  # fmt: skip
    """The documents to train on, with repetitions, so that source ``g`` makes ``weights[g] / sum(weights)`` of the
    tokens while the total stays that of all sources together (``lengths``: the tokens each document makes in packed
    rows, ``groups``: its source, ``names``: the sources' names for errors).

    A source with too few tokens for its share is repeated whole as often as fits, and documents drawn at random
    (seeded per source) make up the rest; one with more is subsampled the same way. The draw stops at the document
    that brings the source closest to its share. Documents that make no tokens are never drawn.
    """
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    total = float(lengths.sum())
    picked = []
    for group, share in enumerate(shares):
        docs = np.flatnonzero((groups == group) & (lengths > 0))
        available = float(lengths[docs].sum())
        if available == 0:
            name = names[group] if names else f"number {group}"
            raise DataError(f"mixture source {name} has no tokens to train on: every document is empty, or lost all "
                            "its loss tokens to truncation at max_seq_len")  # fmt: skip
        repeats, rest = divmod(share * total, available)
        order = np.random.default_rng([seed, group]).permutation(docs)
        cumulative = np.cumsum(lengths[order])
        count = int(np.searchsorted(cumulative, rest))  # the first count documents stay below rest
        if count < len(order) and cumulative[count] - rest < rest - (cumulative[count - 1] if count else 0):
            count += 1
        picked += [np.tile(docs, int(repeats)), order[:count]]
    return np.concatenate(picked)


def _source_stats(plan, lengths, groups, sample, loss_tokens, weights) -> list[dict[str, Any]]:
    chunk_tokens = np.bincount(groups[plan.doc], weights=plan.length, minlength=len(weights))
    available = np.bincount(groups, weights=lengths, minlength=len(weights))
    sampled = np.bincount(groups[sample], weights=lengths[sample], minlength=len(weights))
    total = chunk_tokens.sum()
    return [
        {
            "weight": float(weights[g]),
            "documents": int((groups == g).sum()),
            "documents_sampled": int((groups[sample] == g).sum()),
            "tokens": int(chunk_tokens[g]),
            "loss_tokens": int(loss_tokens[g]),
            "times_repeated": round(float(sampled[g] / available[g]), 4) if available[g] else 0.0,
            "share": round(float(chunk_tokens[g] / total), 4) if total else 0.0,
            "target_share": round(float(weights[g] / np.sum(weights)), 4),
        }
        for g in range(len(weights))
    ]


# Above this share of the loss tokens cut away by truncation, dropped documents and chunk starts, pack warns (in its log
# and in the workflow's final summary).
LOST_LOSS_WARNING = 0.05


def lost_loss_warning(split_stats: dict[str, Any], *, split: str, max_seq_len: int) -> str | None:
    """A warning when packing cut away more than :data:`LOST_LOSS_WARNING` of a split's loss tokens, else None."""
    lost = split_stats.get("loss_tokens_lost_fraction", 0.0)
    if lost <= LOST_LOSS_WARNING:
        return None
    unit = "pairs" if "pairs" in split_stats else "documents"
    return (
        f"packing the {split} split at max_seq_len {max_seq_len} lost {lost:.0%} of its loss tokens "
        f"({split_stats[f'{unit}_truncated']:,} {unit} truncated, "
        f"{split_stats[f'{unit}_dropped_no_loss_after_truncation']:,} dropped with no loss left): raise max_seq_len "
        "or shorten the documents"
    )


# A mixture source that is repeated more than this many times is named in a warning: a model memorises what it sees
# that often.
REPEAT_WARNING = 10


def run_pack(
    *,
    tokenized_dir: str | Path | Sequence[str | Path],
    max_seq_len: int,
    output_dir: str | Path,
    overlap: int = 0,
    packing: bool = True,
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
    data: dict[str, Any] | None = None,
    pairs: bool = False,
) -> dict[str, Any]:
    """Packs every split of the tokenized DatasetDict(s) into ``output_dir``; writes and returns the statistics.

    With ``weights`` (one per directory), the directories are the sources of a mixture: their training documents are
    sampled to the weights' shares of the training tokens (see :func:`mixture`, seeded by ``seed``) and
    ``stats.json`` reports each source by its name (``names``, default the directories' names) under ``sources``.
    Their eval splits are used whole. ``data`` (the experiment's data settings) is recorded beside the rows. With
    ``pairs`` the documents are preference pairs (:func:`pack_pairs`).
    """  # fmt: skip
    output_dir = Path(output_dir)
    dirs = [tokenized_dir] if isinstance(tokenized_dir, (str, Path)) else list(tokenized_dir)
    names = list(names) if names is not None else [Path(d).name for d in dirs]
    parts = [datasets.load_from_disk(str(d)) for d in dirs]
    columns = {name: tuple(part["train"].column_names) for name, part in zip(names, parts)}
    if len(set(columns.values())) > 1:
        raise DataError(f"the sources of a mixture must all be text or all instruction data; got {columns}")
    mixed = weights is not None
    splits, stats = {}, {"max_seq_len": max_seq_len, "packing": packing, "chunk_overlap": overlap, "pairs": pairs}
    digest = hashlib.sha256()  # hardware-accelerated: ~2x blake2b here
    with partial_dir(output_dir) as tmp:
        for split in ("train", "eval"):  # a source of a mixture with data.eval has no eval split
            sizes = [len(part[split]) if split in part else 0 for part in parts]
            present = [part[split] for part in parts if split in part]
            if not present:
                raise DataError(f"no source has a {split} split: {', '.join(map(str, dirs))}")
            dataset = datasets.concatenate_datasets(present) if len(present) > 1 else present[0]
            digest.update(split.encode())
            common = {"max_seq_len": max_seq_len, "path": tmp / split, "digest": digest, "packing": packing,
                      "seed": seed, "names": names, "groups": np.repeat(np.arange(len(parts)), sizes),
                      "weights": np.asarray(weights, dtype=np.float64) if mixed and split == "train" else None}  # fmt: skip
            if pairs:
                splits[split], stats[split] = pack_pairs(dataset, **common)
            else:
                splits[split], stats[split] = pack_dataset(dataset, overlap=overlap, **common)
            if stats[split]["rows"] == 0:
                raise DataError(f"the {split} split packs into no rows: {json.dumps(stats[split])}")
            log.info("packed %s: %s", split, json.dumps(stats[split]))
            if warning := lost_loss_warning(stats[split], split=split, max_seq_len=max_seq_len):
                log.warning("%s", warning)
                stats.setdefault("warnings", []).append(warning)
        datasets.DatasetDict(splits).save_to_disk(str(output_dir))
    if mixed:  # by name, beside the splits' statistics
        stats["sources"] = dict(zip(names, stats["train"].pop("sources")))
        for name, part in zip(names, parts):
            source = stats["sources"][name]
            source["eval_documents"] = len(part["eval"]) if "eval" in part else 0
            log.info("source %s: %s of the training tokens (weight share %s), %.2f times its tokens", name,
                     f"{source['share']:.1%}", f"{source['target_share']:.1%}", source["times_repeated"])  # fmt: skip
            for warning in _mixture_warnings(name, source):
                log.warning("%s", warning)
                stats.setdefault("warnings", []).append(warning)
    # What a checkpoint must have been trained on to be resumed on these rows (see vectorlm.train.resume).
    stats["fingerprint"] = digest.hexdigest()[:32]
    (output_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    record = data if data is not None else {"packing": packing, "chunk_overlap": overlap}
    write_stage_config(output_dir, {"max_seq_len": max_seq_len, "data": record}, upstream=dirs[0])
    return stats


def _mixture_warnings(name: str, source: dict[str, Any]) -> list[str]:
    warnings = []
    if abs(source["share"] - source["target_share"]) > 0.01:
        warnings.append(f"mixture source {name} makes {source['share']:.1%} of the training tokens, not "
                        f"{source['target_share']:.1%}: its documents are too few or too long to hit its weight")  # fmt: skip
    if source["times_repeated"] > REPEAT_WARNING:
        warnings.append(f"mixture source {name} is repeated {source['times_repeated']:.0f} times: the model will "
                        "memorise it; lower its weight or add data")  # fmt: skip
    return warnings
