"""Consolidation time against checkpoint size, on synthetic checkpoints written as 64 ranks write them.

    python bench/consolidate_scale.py --hidden 256 512 768 --layers 80 --ranks 64

A training checkpoint of a model with 80 layers (Llama-70B's depth: 723 tensors) written by 64 ranks has the
metadata of a real 70B checkpoint (model + AdamW moments: ~139k chunks), whatever the hidden size; the hidden size
sets how many bytes there are. For each size this writes such a checkpoint with DCP's own FileSystemWriter, one fake
rank at a time (each rank's files hold its dim-0 chunk of every tensor, as FSDP2 shards them), then consolidates it
and reports seconds per GB of exported weights. The same consolidation with a reader that re-reads ``.metadata`` on
every DCP call (what DCP's own reader does, and consolidation did before) runs on the smallest size, side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vectorlm.export.consolidate
from vectorlm.config import ExportConfig
from vectorlm.train.checkpoint_reader import SafeFileSystemReader, read_metadata_file

warnings.filterwarnings("ignore")


class ChunkSource:
    """What DCP's writer asks a save planner for: the tensor of each write item."""

    def __init__(self, tensors: dict[MetadataIndex, torch.Tensor]) -> None:
        self.tensors = tensors

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        return self.tensors[item.index]


def write_sparse_weights(model_dir: Path) -> None:
    """The base model's safetensors file as consolidation reads it (the tensors' names, shapes and dtypes in its
    header, which say the layout to export), its data a sparse hole: no bytes are written."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(model_dir / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def write_checkpoint(path: Path, model_dir: Path, *, ranks: int) -> None:
    """Model weights and AdamW moments (plus step counters), sharded on dim 0 over ``ranks``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir))
    entries = {}
    for name, param in model.state_dict().items():
        for key in (f"model.{name}", f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"):
            entries[key] = tuple(param.shape)
        entries[f"optim.{name}.step"] = ()
    metadata = {}
    results = []
    path.mkdir(parents=True)
    writer = FileSystemWriter(path, sync_files=False)
    for rank in range(ranks):
        items, tensors = [], {}
        for key, shape in entries.items():
            if not shape:  # a replicated scalar: rank 0 writes it
                offsets, sizes = (), ()
                if rank:
                    continue
            else:
                rows = math.ceil(shape[0] / ranks)
                start, end = rank * rows, min(shape[0], (rank + 1) * rows)
                if start >= end:
                    continue
                offsets, sizes = (start, *[0] * (len(shape) - 1)), (end - start, *shape[1:])
            chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
            index = MetadataIndex(key, torch.Size(offsets))
            properties = TensorProperties(dtype=torch.float32)
            items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk, properties, torch.Size(shape))))  # fmt: skip
            tensors[index] = torch.full(sizes, float(rank))
            metadata.setdefault(key, TensorStorageMetadata(properties, torch.Size(shape), [])).chunks.append(chunk)
        writer.set_up_storage_writer(rank == 0, rank=rank)
        plan = SavePlan(items, storage_data=_StoragePrefix(f"__{rank}_"))
        results.append(writer.write_data(plan, ChunkSource(tensors)).wait())
    writer.finish(Metadata(state_dict_metadata=metadata), results)


class RereadingReader(SafeFileSystemReader):
    """Reads and unpickles ``.metadata`` on every call, as DCP's FileSystemReader does."""

    reads = 0

    def read_metadata(self, *args, **kwargs):
        RereadingReader.reads += 1
        metadata = read_metadata_file(Path(self.path) / ".metadata")
        metadata.storage_meta.load_id = self.load_id
        return metadata


def consolidate_seconds(checkpoint: Path, model_dir: Path, out: Path) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    stats = vectorlm.export.consolidate.consolidate(
        checkpoint, model_dir=model_dir, output_dir=out, export=ExportConfig()
    )
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        for number, hidden in enumerate(args.hidden):
            model_dir, checkpoint = tmp / f"model{hidden}", tmp / f"ckpt{hidden}"
            LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                        num_hidden_layers=args.layers, num_attention_heads=max(1, hidden // 64),
                        num_key_value_heads=max(1, hidden // 64)).save_pretrained(model_dir)  # fmt: skip
            write_sparse_weights(model_dir)
            start = time.perf_counter()
            write_checkpoint(checkpoint, model_dir, ranks=args.ranks)
            written = time.perf_counter() - start
            meta = read_metadata_file(checkpoint / ".metadata")
            chunks = sum(len(e.chunks) for e in meta.state_dict_metadata.values())
            start = time.perf_counter()
            read_metadata_file(checkpoint / ".metadata")
            one_read = time.perf_counter() - start
            seconds, stats = consolidate_seconds(checkpoint, model_dir, tmp / "out")
            row = {"hidden": hidden, "gb": stats["bytes"] / 1e9, "chunks": chunks, "seconds": seconds,
                   "metadata_mb": (checkpoint / ".metadata").stat().st_size / 1e6, "one_read": one_read,
                   "write_seconds": written}  # fmt: skip
            if number == 0:
                vectorlm.export.consolidate.SafeFileSystemReader = RereadingReader
                row["old_seconds"], _ = consolidate_seconds(checkpoint, model_dir, tmp / "out")
                row["old_reads"] = RereadingReader.reads
                vectorlm.export.consolidate.SafeFileSystemReader = SafeFileSystemReader
            rows.append(row)
            shutil.rmtree(checkpoint)
            print(f"hidden {hidden}: written in {written:.0f} s", file=sys.stderr)
    print(
        f"{args.layers} layers, {args.ranks} ranks' shards, fp32 export; metadata: "
        f"{rows[0]['chunks']:,} chunks, {rows[0]['metadata_mb']:.1f} MB, {rows[0]['one_read']:.2f} s per read"
    )
    print(f"{'hidden':>6} {'export GB':>10} {'seconds':>8} {'s/GB':>6}   {'re-reading metadata each call':>30}")
    for row in rows:
        old = (f"{row['old_seconds']:.1f} s ({row['old_reads']} reads, {row['old_seconds'] / row['gb']:.1f} s/GB)"
               if "old_seconds" in row else "")  # fmt: skip
        print(
            f"{row['hidden']:>6} {row['gb']:>10.2f} {row['seconds']:>8.1f} {row['seconds'] / row['gb']:>6.1f}   "
            f"{old:>30}"
        )
    if len(rows) > 1:  # seconds = fixed (per chunk, the same at every size here) + slope x GB
        slope, fixed = np.polyfit([r["gb"] for r in rows], [r["seconds"] for r in rows], 1)
        residuals = ", ".join(f"{r['seconds'] - fixed - slope * r['gb']:+.1f} s" for r in rows)
        print(f"least-squares line: {fixed:.1f} s + {slope:.1f} s/GB; residuals {residuals}")


if __name__ == "__main__":
    main()
