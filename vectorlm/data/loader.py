"""Batches of packed rows for training: a resumable global order of rows and per-rank micro-batches.

The order is a function of (seed, epoch) only, and every optimizer step consumes the next ``global_batch_size`` rows
of it whatever the number of ranks: rank ``r`` takes micro-batch ``m`` at ``(m * world_size + r) * micro_batch_size``.
So the data position, (epoch, offset), means the same on 1 rank or 64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from vectorlm.packed import COLUMNS, IGNORE_INDEX


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0


class GlobalBatchSampler:
    """Global batches of row indices: a fresh permutation each epoch, the last incomplete batch dropped.

    With ``lengths`` (unpacked rows, ``data.packing: false``) each global batch is ordered longest first, so that the
    micro-batches cut from it hold rows of similar length and padding stays small.
    """

    def __init__(self, num_rows: int, *, global_batch_size: int, seed: int, lengths: np.ndarray | None = None) -> None:
        if num_rows < global_batch_size:
            raise ValueError(
                f"the training split has {num_rows} packed rows, fewer than train.global_batch_size "
                f"({global_batch_size}); lower the batch size or add data"
            )
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self.lengths = lengths
        self.position = DataPosition()
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), made once per epoch

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of rows, computed once per epoch: O(rows), 0.2 s at 10M rows, too slow for every step."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
        return self._order[1]

    def next_batch(self) -> np.ndarray:
        if self.position.offset + self.global_batch_size > self.num_rows:
            self.position = DataPosition(self.position.epoch + 1, 0)
        start = self.position.offset
        batch = self._permutation(self.position.epoch)[start : start + self.global_batch_size]
        self.position.offset += self.global_batch_size
        if self.lengths is not None:
            batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        return batch

    def state_dict(self) -> dict[str, int]:
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = DataPosition(**state)


def rank_slices(batch: np.ndarray, *, rank: int, world_size: int, micro_batch_size: int) -> list[np.ndarray]:
    """This rank's micro-batches of a global batch, in order."""
    rows_per_micro_step = world_size * micro_batch_size
    return [
        batch[start + rank * micro_batch_size : start + (rank + 1) * micro_batch_size]
        for start in range(0, len(batch), rows_per_micro_step)
    ]


def document_lengths(position_ids: np.ndarray) -> np.ndarray:
    """Lengths of the documents of one packed row, whose positions restart at 0 for each document."""
    starts = np.flatnonzero(position_ids == 0)
    return np.diff(np.append(starts, len(position_ids)))


@dataclass(frozen=True)
class BatchShape:
    """The one shape of every micro-batch of a run, so that compiled code traces one graph for training and one for
    evaluation: ``rows`` rows of ``width`` tokens (the flattened form: one row of ``rows x width`` tokens). A short
    batch (the last of an evaluation) gets rows of padding."""

    rows: int
    width: int


def collate(rows: list[dict[str, list[int]]], *, flatten: bool, shape: BatchShape | None = None,
            pairs: bool = False) -> dict[str, Any]:  # fmt: skip
    """Stacks packed rows into a batch the model can take with ``attention_mask=None``.

    Padded form (sdpa, eager, flex): rows padded to ``shape`` (else to the longest row) with label -100 and positions
    restarting at 0, so padding is one more isolated "document". Flattened form (flash-attn varlen): all rows in one
    row of batch size 1, with the documents' cumulative lengths (``cu_seq_lens``, int32) and a bound on their length
    (``max_length``, for flash-attn: the row width of ``shape``, so that it is the same in every batch, else the
    longest document); with ``shape``, padding to its ``rows x width`` tokens is more documents at the end, none
    longer than ``width``.

    Counted here, on the CPU, so that training needs no device-to-host copy for them: ``num_tokens`` (real tokens),
    ``num_loss_tokens`` (next-token targets that count in the loss), ``sum_squared_lengths`` (over documents, what
    attention costs) and ``document_lengths``; padding counts in none of them. With ``pairs`` (rows of preference
    pairs), also :func:`pair_columns`'.
    """
    columns = COLUMNS
    lengths = [document_lengths(np.asarray(r["position_ids"])) for r in rows]
    counts = {
        "num_tokens": sum(len(r["input_ids"]) for r in rows),
        "num_loss_tokens": int(sum(np.count_nonzero(np.asarray(r["labels"][1:]) != IGNORE_INDEX) for r in rows)),
        "sum_squared_lengths": int(sum((doc_lengths**2).sum() for doc_lengths in lengths)),
        "document_lengths": np.concatenate(lengths),  # for sliding-window layers' attention cost
    }
    longest = max(len(r["input_ids"]) for r in rows)
    if shape is not None and (longest > shape.width or len(rows) > shape.rows):
        raise ValueError(f"a batch of {len(rows)} rows of up to {longest} tokens does not fit the run's batch shape "
                         f"({shape.rows} rows of {shape.width} tokens)")  # fmt: skip
    if flatten:
        batch = {c: torch.tensor(np.concatenate([r[c] for r in rows]), dtype=torch.long)[None] for c in columns}
        lengths = np.concatenate(lengths)
        padding = 0 if shape is None else shape.rows * shape.width - counts["num_tokens"]
        if padding:  # documents of at most a row's width: flash-attn trusts max_length and computes nothing past it
            batch = {"input_ids": F.pad(batch["input_ids"], (0, padding)),
                     "labels": F.pad(batch["labels"], (0, padding), value=IGNORE_INDEX),
                     "position_ids": torch.cat([batch["position_ids"], (torch.arange(padding) % shape.width)[None]],
                                               dim=1)}  # fmt: skip
            whole, rest = divmod(padding, shape.width)
            lengths = np.concatenate([lengths, [shape.width] * whole, [rest] if rest else []]).astype(np.int64)
        boundaries = {"cu_seq_lens": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32),
                      "max_length": int(lengths.max()) if shape is None else shape.width}  # fmt: skip
        if pairs:
            counts.update(pair_columns(rows, counts["document_lengths"], batch["labels"].shape))
        return {**batch, **counts, **boundaries}
    num_rows, width = (len(rows), longest) if shape is None else (shape.rows, shape.width)
    batch: dict[str, Any] = {
        "input_ids": torch.zeros(num_rows, width, dtype=torch.long),
        "labels": torch.full((num_rows, width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(num_rows, 1),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for c in columns:
            batch[c][i, :n] = torch.as_tensor(row[c])
        batch["position_ids"][i, n:] -= n
    if pairs:
        counts.update(pair_columns(rows, counts["document_lengths"], (num_rows, width)))
    return {**batch, **counts}


def pair_columns(rows: list[dict[str, Any]], lengths: np.ndarray, shape: tuple[int, int]) -> dict[str, Any]:
    """For rows of preference pairs (each row's documents: chosen, rejected, chosen, ...), laid out in ``shape``
    (padded rows, or one flattened row): ``sequence_ids``, the document of each position's next-token target (the
    number of documents where there is none), ``sequence_lengths``, the loss tokens of each document, ``pair_mask``
    (1 per pair), ``num_pairs`` and ``row_sequences``, the documents of each row."""
    num_sequences = len(lengths)
    assert num_sequences % 2 == 0, "rows of preference pairs hold an even number of documents"
    ids = np.full(shape, num_sequences, dtype=np.int64)
    sequence, flat_start, per_row = 0, 0, []
    for index, row in enumerate(rows):
        row_lengths = document_lengths(np.asarray(row["position_ids"]))
        per_row.append(len(row_lengths))
        owner = np.repeat(np.arange(sequence, sequence + len(row_lengths)), row_lengths)
        if shape[0] == 1:  # flattened: the rows one after the other
            ids[0, flat_start : flat_start + len(owner)] = owner
            flat_start += len(owner)
        else:
            ids[index, : len(owner)] = owner
        sequence += len(row_lengths)
    labels = np.concatenate([np.asarray(row["labels"]) for row in rows])
    owners = np.repeat(np.arange(num_sequences), lengths)
    targets = np.pad(ids[:, 1:], ((0, 0), (0, 1)), constant_values=num_sequences).reshape(-1)
    return {
        "sequence_ids": torch.from_numpy(targets),
        "sequence_lengths": torch.from_numpy(np.bincount(owners[labels != IGNORE_INDEX], minlength=num_sequences)),
        "pair_mask": torch.ones(num_sequences // 2),
        "num_pairs": num_sequences // 2,
        "row_sequences": per_row,  # the documents of each row
    }


def count_nothing(batch: dict[str, Any]) -> None:
    """Makes ``batch`` one that counts for nothing (a rank's padding in an evaluation): no loss token, no pair."""
    batch["labels"].fill_(IGNORE_INDEX)
    batch["num_loss_tokens"] = 0
    if "pair_mask" in batch:
        batch["pair_mask"].zero_()
        batch["num_pairs"] = 0


def fetch(dataset: datasets.Dataset, indices: np.ndarray, *, flatten: bool, shape: BatchShape | None = None,
          pairs: bool = False, reference: datasets.Dataset | None = None) -> dict[str, Any]:  # fmt: skip
    """The collated batch of rows ``indices`` of a packed dataset (:func:`collate`); with ``reference`` (the
    reference model's log-probabilities of the same rows, vectorlm/train/reference_logprobs.py), rows of preference
    pairs with ``reference_logps``, one per document."""
    columns = dataset.with_format("numpy")[indices.tolist()]
    rows = [{c: columns[c][i] for c in columns} for i in range(len(indices))]
    batch = collate(rows, flatten=flatten, shape=shape, pairs=pairs or reference is not None)
    if reference is not None:
        logps = reference.with_format("numpy")[indices.tolist()]["logps"]
        batch["reference_logps"] = torch.from_numpy(np.concatenate(list(logps)).astype(np.float64))
        assert len(batch["reference_logps"]) == len(batch["sequence_lengths"]), "reference rows do not match"
    return batch
