"""The next step's micro-batches, read and collated in a background thread while the current step computes."""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import datasets
import numpy as np
import torch

from vectorlm.data.loader import BatchShape, DataPosition, GlobalBatchSampler, fetch, rank_slices


class Prefetcher:
    """Yields this rank's micro-batches of each global batch, with the data position after it, one step ahead.

    The sampler runs ahead by one step, so the position to checkpoint is the one returned with the batch that was
    trained on, never the sampler's own. With ``pin_memory`` (CUDA), batches come in page-locked memory, so that
    ``to(device, non_blocking=True)`` copies them without blocking the host.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        sampler: GlobalBatchSampler,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        flatten: bool,
        pin_memory: bool,
        shape: BatchShape | None = None,
        pairs: bool = False,
        reference: datasets.Dataset | None = None,
    ) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.flatten, self.pin_memory, self.shape = flatten, pin_memory, shape
        self.pairs, self.reference = pairs, reference  # rows of preference pairs, their reference log-probabilities
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead: tuple[Future, DataPosition] | None = None

    def _submit(self) -> tuple[Future, DataPosition]:
        batch = self.sampler.next_batch()
        position = copy.copy(self.sampler.position)
        indices = rank_slices(batch, rank=self.rank, world_size=self.world_size, micro_batch_size=self.micro_batch_size)
        return self._executor.submit(self._prepare, indices), position

    def _prepare(self, indices: list[np.ndarray]) -> list[dict[str, Any]]:
        batches = [fetch(self.dataset, i, flatten=self.flatten, shape=self.shape, pairs=self.pairs,
                         reference=self.reference) for i in indices]  # fmt: skip
        if self.pin_memory:
            batches = [{k: v.pin_memory() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        return batches

    def next(self) -> tuple[list[dict[str, Any]], DataPosition]:
        """This rank's micro-batches of the next global batch (on the CPU), and the data position after it."""
        future, position = self._ahead or self._submit()
        batches = future.result()
        self._ahead = self._submit()
        return batches, position

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
