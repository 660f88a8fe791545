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

from vectorlm.data.pack import IGNORE_INDEX


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0


class GlobalBatchSampler:
    """Global batches of row indices: a fresh permutation each epoch, the last incomplete batch dropped.

    With ``lengths`` (unpacked rows, ``data.packing: false``) each global batch is ordered longest first, so that the
    micro-batches cut from it hold rows of similar length and padding stays small.
    """

    def __init__(
        self, num_rows: int, *, global_batch_size: int, seed: int, lengths: np.ndarray | None = None
    ) -> None:
        if num_rows < global_batch_size:
            raise ValueError(
                f"the training split has {num_rows} packed rows, fewer than train.global_batch_size "
                f"({global_batch_size}); lower the batch size or add data"
            )
        self.num_rows, self.global_batch_size, self.seed = num_rows, global_batch_size, seed
        self.lengths = lengths
        self.position = DataPosition()

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

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


def collate(rows: list[dict[str, list[int]]], *, flatten: bool) -> dict[str, Any]:
    """Stacks packed rows into a batch the model can take with ``attention_mask=None``.

    Padded form (sdpa, eager): rows padded to the longest with label -100 and positions restarting at 0, so padding is
    one more isolated "document". Flattened form (flash-attn varlen): all rows in one row of batch size 1, the only
    layout in which transformers derives ``cu_seq_lens`` from position_ids. ``num_tokens`` counts real tokens.
    """
    columns = ("input_ids", "labels", "position_ids")
    num_tokens = sum(len(r["input_ids"]) for r in rows)
    if flatten:
        batch = {c: torch.tensor(np.concatenate([r[c] for r in rows]), dtype=torch.long)[None] for c in columns}
        return {**batch, "num_tokens": num_tokens}
    width = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, Any] = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(len(rows), 1),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for c in columns:
            batch[c][i, :n] = torch.as_tensor(row[c])
        batch["position_ids"][i, n:] -= n
    return {**batch, "num_tokens": num_tokens}


def fetch(dataset: datasets.Dataset, indices: np.ndarray, *, flatten: bool) -> dict[str, Any]:
    """The collated batch of rows ``indices`` of a packed dataset."""
    columns = dataset.with_format("numpy")[indices.tolist()]
    rows = [{c: columns[c][i] for c in columns} for i in range(len(indices))]
    return collate(rows, flatten=flatten)


