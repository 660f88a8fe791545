"""Blocks of a training checkpoint's tensors, read in one process (consolidation).

DCP reads into whole tensors, or into the shards of a DTensor. Consolidating a fused mixture-of-experts parameter
into the Hub's per-expert tensors needs blocks of it (one expert's gate projection), and DCP reads a whole stored
chunk (one training rank's shard) for any part of it: :class:`CheckpointBlocks` cuts blocks out of the stored chunks
and keeps the last chunk read, so that blocks read in the chunks' order read each chunk once.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Block = tuple[str, tuple[int, ...]]  # the checkpoint's tensor, and where the block starts in it


class _BlockPlanner(DefaultLoadPlanner):
    """Loads blocks of a checkpoint's tensors: the state dict's entry ``key`` receives the block ``blocks[key]``
    (its size is the entry's), several blocks of one tensor in one load."""

    def __init__(self, blocks: dict[str, Block]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.blocks = blocks

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, tensor in self.state_dict.items():
            fqn, offsets = self.blocks[key]
            chunk = ChunkStorageMetadata(torch.Size(offsets), tensor.size())
            for item in create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk]):
                destination = MetadataIndex(key, item.dest_index.offset, item.dest_index.index)
                items.append(dataclasses.replace(item, dest_index=destination))
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class CheckpointBlocks:
    """Tensors and blocks of tensors of the checkpoint ``reader`` reads (its metadata read once)."""

    def __init__(self, reader: FileSystemReader) -> None:
        self.reader = reader
        self.saved = reader.read_metadata().state_dict_metadata
        self.last: tuple[Block, torch.Tensor] | None = None

    def read_whole(self, tensors: dict[str, Block]) -> dict[str, torch.Tensor]:
        """``{key: (fqn, offsets)}`` -> each block of the tensor ``fqn`` from ``offsets`` to its end, in one load."""
        out = {key: torch.empty([n - o for n, o in zip(self.saved[fqn].size, offsets, strict=True)],
                                dtype=self.saved[fqn].properties.dtype) for key, (fqn, offsets) in tensors.items()}  # fmt: skip
        if out:
            dcp.load(out, storage_reader=self.reader, planner=_BlockPlanner(tensors))
        return out

    def _chunk(self, fqn: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        key = (fqn, tuple(chunk.offsets))
        if self.last is None or self.last[0] != key:
            self.last = None  # freed before the next is read
            tensor = torch.empty(chunk.sizes, dtype=self.saved[fqn].properties.dtype)
            dcp.load({"chunk": tensor}, storage_reader=self.reader, planner=_BlockPlanner({"chunk": key}))
            self.last = (key, tensor)
        return self.last[1]

    def block(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The block of the tensor ``fqn`` at ``offsets`` of ``sizes``, cut from the stored chunks it overlaps."""
        out = torch.empty(sizes, dtype=self.saved[fqn].properties.dtype)
        for chunk in self.saved[fqn].chunks:
            low = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            high = [min(o + n, c + m) for o, n, c, m in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if all(lo < hi for lo, hi in zip(low, high, strict=True)):
                inside = tuple(slice(lo - c, hi - c) for lo, hi, c in zip(low, high, chunk.offsets, strict=True))
                out[tuple(slice(lo - o, hi - o) for lo, hi, o in zip(low, high, offsets, strict=True))] = self._chunk(
                    fqn, chunk
                )[inside]
        return out
