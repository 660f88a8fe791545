"""Sharded safetensors weights, read and written a few tensors at a time.

The format is simple (an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte ranges, then
the raw bytes), so both directions stream: peak memory is a few tensors, never a whole shard or model. Reading uses
plain file reads rather than the memory map of ``safetensors.safe_open``, whose touched pages count as resident
memory until the file is closed. The safetensors library and ``from_pretrained`` read what is written here (tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vectorlm.hub.model_dir import INDEX_FILE, header_of, read_header, weight_files
from vectorlm.log import format_duration

log = logging.getLogger(__name__)

CHECKSUMS = "sha256"  # in the index's metadata: tensor -> the SHA-256 of its bytes as written
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


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, load: Loader
) -> dict[str, str]:
    """Writes one safetensors file of ``shapes`` in ``dtype``, asking ``load`` for about ``LOAD_BUDGET_BYTES`` of
    tensors at a time (any dtype: they are cast on the way); returns each tensor's checksum (SHA-256 of its bytes).

    Raises:
        ValueError: a tensor ``load`` gives is not of the shape the header declares (the file would hold other data
            than its header says).
    """
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
        checksums = {}
        for group in plan_shards(sizes, LOAD_BUDGET_BYTES):
            tensors = load(group)
            for name in group:
                tensor = tensors.pop(name)
                if tuple(tensor.shape) != tuple(shapes[name]):
                    raise ValueError(f"{name} is of shape {tuple(tensor.shape)}, the model's is {tuple(shapes[name])}")
                data = tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data
                checksums[name] = hashlib.sha256(data).hexdigest()
                f.write(data)
    return checksums


def write_sharded(
    output_dir: Path, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, load: Loader, max_shard_bytes: int
) -> dict[str, Any]:
    """Writes ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` and their index; returns
    the index."""
    sizes = {n: math.prod(shape) * dtype.itemsize for n, shape in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    output_dir.mkdir(parents=True, exist_ok=True)
    weight_map, checksums, total, written, start = {}, {}, sum(sizes.values()), 0, time.monotonic()
    log.info("writing %d tensors, %.2f GB in %s, to %d file(s) in %s", len(shapes), total / 1e9, dtype, len(shards),
             output_dir)  # fmt: skip
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        checksums |= write_safetensors(output_dir / file_name, {n: shapes[n] for n in shard}, dtype=dtype, load=load)
        weight_map.update(dict.fromkeys(shard, file_name))
        written += sum(sizes[n] for n in shard)
        left = (time.monotonic() - start) / written * (total - written) if written else 0.0
        log.info("wrote %s (%d of %d files, %d tensors; %.2f of %.2f GB, %s left)", file_name, number, len(shards),
                 len(shard), written / 1e9, total / 1e9, format_duration(left))  # fmt: skip
    # The checksums let the export's check (vectorlm/export/convert.py) verify every tensor's data at any size.
    index = {"metadata": {"total_size": sum(sizes.values()), CHECKSUMS: checksums}, "weight_map": weight_map}
    (output_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def verify_files(model_dir: Path, *, require_checksums: bool = False) -> int:
    """Checks the data of a model directory's safetensors files against their headers without loading a model: each
    file is exactly as long as its header says, and each tensor's bytes have the checksum recorded when they were
    written (:func:`write_sharded`, where the index has them; with ``require_checksums``, every tensor must have
    one). Reads the files once, a block at a time; returns the bytes checked.

    Raises:
        ValueError: naming the file and the tensor.
    """
    files = weight_files(model_dir)
    index = model_dir / INDEX_FILE
    recorded = json.loads(index.read_text()).get("metadata", {}).get(CHECKSUMS, {}) if index.is_file() else {}
    checked = 0
    for path in sorted(set(files.values())):
        with open(path, "rb") as f:
            header = header_of(f)
            end = max((entry["range"][1] for entry in header.values()), default=f.tell())
            if (size := path.stat().st_size) != end:
                raise ValueError(f"{path}: {size:,} bytes, but its header describes {end:,}: the file is damaged")
            for name, entry in sorted(header.items(), key=lambda item: item[1]["range"]):
                if name not in recorded:
                    if require_checksums:
                        raise ValueError(f"{path}: no checksum of {name} is recorded in {INDEX_FILE}, which every "
                                         "export of this pipeline writes: the directory was changed after it")  # fmt: skip
                    continue
                f.seek(entry["range"][0])
                digest, left = hashlib.sha256(), entry["range"][1] - entry["range"][0]
                while left:
                    block = f.read(min(left, 2**24))
                    digest.update(block)
                    left -= len(block)
                if digest.hexdigest() != recorded[name]:
                    raise ValueError(f"{path}: the data of {name} is not what was written (checksum mismatch)")
                checked += entry["range"][1] - entry["range"][0]
    return checked


def weights_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype that holds most of the elements of a model directory's safetensors files: the dtype of the
    checkpoint itself, whatever its config.json declares (float32 when it has no floating tensor)."""
    elements: dict[torch.dtype, int] = {}
    for path in sorted(set(weight_files(model_dir).values())):
        for entry in read_header(path).values():
            dtype = DTYPES[entry["dtype"]]
            if dtype.is_floating_point:
                elements[dtype] = elements.get(dtype, 0) + math.prod(entry["shape"])
    return max(elements, key=elements.__getitem__) if elements else torch.float32


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
            header = header_of(f)
            for name in (n for n in names if files[n] == path):
                tensors[name] = read_rows(f, header, name)
    return {name: tensors[name] for name in names}
