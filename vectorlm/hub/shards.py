"""Sharded safetensors weights, read and written a few tensors at a time.

The format is simple (an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte ranges, then
the raw bytes), so both directions stream: peak memory is a few tensors, never a whole shard or model. Reading uses
plain file reads rather than the memory map of ``safetensors.safe_open``, whose touched pages count as resident
memory until the file is closed. The safetensors library and ``from_pretrained`` read what is written here (tests).
"""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vectorlm.log import format_duration

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Tensors read per call of ``load`` when writing a file. Measured on a 134M model (bench/consolidate_memory.py): peak
# RSS above baseline 445 MB at 256 MiB, 192 MB at 64 MiB (then the largest tensor, read twice by DCP, dominates).
LOAD_BUDGET_BYTES = 64 * 2**20

Loader = Callable[[list[str]], dict[str, torch.Tensor]]


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose tensors add up to at most ``max_bytes`` (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, load: Loader) -> None:
    """Writes one safetensors file of ``shapes`` in ``dtype``, asking ``load`` for about ``LOAD_BUDGET_BYTES`` of
    tensors at a time (any dtype: they are cast on the way)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        sizes = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in shapes}
        for group in plan_shards(sizes, LOAD_BUDGET_BYTES):
            tensors = load(group)
            for name in group:
                f.write(tensors.pop(name).to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_sharded(
    output_dir: Path, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, load: Loader, max_shard_bytes: int
) -> dict[str, Any]:
    """Writes ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` and their index; returns
    the index."""
    sizes = {n: math.prod(shape) * dtype.itemsize for n, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    output_dir.mkdir(parents=True, exist_ok=True)
    weight_map, total, written, start = {}, sum(sizes.values()), 0, time.monotonic()
    log.info("writing %d tensors, %.2f GB in %s, to %d file(s) in %s", len(shapes), total / 1e9, dtype, len(shards),
             output_dir)  # fmt: skip
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(output_dir / file_name, {n: shapes[n] for n in shard}, dtype=dtype, load=load)
        weight_map.update(dict.fromkeys(shard, file_name))
        written += sum(sizes[n] for n in shard)
        left = (time.monotonic() - start) / written * (total - written) if written else 0.0
        log.info("wrote %s (%d of %d files, %d tensors; %.2f of %.2f GB, %s left)", file_name, number, len(shards),
                 len(shard), written / 1e9, total / 1e9, format_duration(left))  # fmt: skip
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (output_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file: name -> dtype, shape and absolute byte range in the file."""
    with open(path, "rb") as f:
        return _header(f)


def _header(f) -> dict[str, dict[str, Any]]:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    for entry in header.values():
        start, end = entry["data_offsets"]
        entry["range"] = (8 + length + start, 8 + length + end)
    return header


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Which file of ``model_dir`` holds each tensor (from the index, or the single ``model.safetensors``)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    return dict.fromkeys(read_header(model_dir / SINGLE_FILE), model_dir / SINGLE_FILE)


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor of ``files`` (as :func:`weight_files` gives them), from the files' headers."""
    shapes = {}
    for path in dict.fromkeys(files.values()):
        shapes.update({name: tuple(entry["shape"]) for name, entry in read_header(path).items()})
    return {name: shapes[name] for name in files}


def read_rows(f, header: dict[str, dict[str, Any]], name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (along the first dimension; all of them by default) of the tensor ``name`` of the open file
    ``f`` whose ``header`` is given: contiguous bytes, read into memory of their own (a 0-d tensor is one row)."""
    entry = header[name]
    shape, dtype = entry["shape"], DTYPES[entry["dtype"]]
    stop = (shape[0] if shape else 1) if stop is None else stop
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    tensor = torch.empty([stop - start, *shape[1:]] if shape else [], dtype=dtype)
    f.seek(entry["range"][0] + start * row_bytes)
    if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != tensor.numel() * dtype.itemsize:
        raise ValueError(f"{f.name}: tensor {name} is truncated")
    return tensor


def read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names``, each read from its file (``files``) into memory of its own; each file opened once."""
    tensors = {}
    for path in dict.fromkeys(files[name] for name in names):
        with open(path, "rb") as f:
            header = _header(f)
            for name in (n for n in names if files[n] == path):
                tensors[name] = read_rows(f, header, name)
    return {name: tensors[name] for name in names}
