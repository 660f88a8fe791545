"""The consolidate stage: the final sharded DCP checkpoint of training to safetensors shards with the base model's
tensor names and layout (or, for a LoRA run, the trained adapter in peft's format).

Consolidation runs in one process without the training ranks and reads the checkpoint a few tensors at a time (each
stored chunk once), so its peak memory is about one output shard, never the whole model twice.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from vectorlm.config import ExportConfig, LoraSettings, read_stage_config, write_stage_config
from vectorlm.export.checkpoint_blocks import CheckpointBlocks
from vectorlm.hub.layout import Piece, by_key, file_layout, written_pieces
from vectorlm.hub.meta_model import build_empty_model, parameter_shapes
from vectorlm.hub.shards import tensor_shapes, weight_files, weights_dtype, write_sharded
from vectorlm.train.checkpoint_reader import SafeFileSystemReader
from vectorlm.train.lora import apply_lora, save_adapter

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # the training checkpoint holds {"model": ..., "optim": ...}


def export_dtype(export: ExportConfig, model_dir: str | Path) -> torch.dtype:
    """The dtype to write: the configured one, or for ``auto`` the base checkpoint's own, read from its files (not
    from its config.json, which may declare none, and not from a model built from it, which training builds in
    fp32)."""
    if export.dtype != "auto":
        return getattr(torch, export.dtype)
    return weights_dtype(Path(model_dir))


def check_coverage(
    checkpoint: Path, saved: dict[str, Any], shapes: dict[str, tuple[int, ...]], *, floating: set[str] | None = None
) -> None:
    """Each tensor the export reads is in the checkpoint with the model's shape and a floating-point dtype (training
    keeps its weights in fp32, or bf16), and its stored chunks cover it exactly (inside it, not overlapping, nothing
    left out): otherwise the export would hold rows no chunk wrote, or values cast from integers. ``floating``: the
    tensors the model holds in a floating-point dtype (all of them when None; a model's own code may keep an integer
    buffer).

    Raises:
        ValueError: naming the checkpoint, the tensor and what is wrong.
    """
    for name, shape in shapes.items():
        entry = saved.get(name)
        if entry is None:
            raise ValueError(f"checkpoint {checkpoint} lacks {name}")
        if tuple(entry.size) != tuple(shape):
            raise ValueError(
                f"checkpoint {checkpoint}: {name} is stored as {tuple(entry.size)}, the model's is {shape}"
            )
        if not entry.properties.dtype.is_floating_point and (floating is None or name in floating):
            raise ValueError(f"checkpoint {checkpoint}: {name} is stored as {entry.properties.dtype}; a model's weights "
                             "are floating point")  # fmt: skip
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        for offsets, sizes in boxes:
            if any(o < 0 or o + n > d for o, n, d in zip(offsets, sizes, shape, strict=True)):
                raise ValueError(f"checkpoint {checkpoint}: a chunk of {name} at {offsets} lies outside {shape}")
        for i, (a_offsets, a_sizes) in enumerate(boxes):
            for b_offsets, b_sizes in boxes[i + 1 :]:
                if all(max(a, b) < min(a + m, b + n) for a, m, b, n in zip(a_offsets, a_sizes, b_offsets, b_sizes)):
                    raise ValueError(f"checkpoint {checkpoint}: chunks of {name} overlap at {a_offsets}, {b_offsets}")
        if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
            raise ValueError(f"checkpoint {checkpoint}: the chunks of {name} do not cover all of it {shape}")


def weight_shapes(model_dir: str | Path, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's state dict in order (of the model its config describes, built on the meta device),
    without the duplicates of tied weights."""
    return parameter_shapes(build_empty_model(model_dir, trust_remote_code=trust_remote_code))


def base_layout(
    model_dir: str | Path, *, trust_remote_code: bool = False
) -> tuple[dict[str, tuple[str, Piece]], torch.nn.Module]:
    """The tensors an export of the model in ``model_dir`` writes, in the layout of its own safetensors files
    (per-expert tensors where they have them; :mod:`vectorlm.hub.layout`): file key -> the block of a parameter it
    is. Returns them, in the parameters' order, and the (meta-device) model."""
    model = build_empty_model(model_dir, trust_remote_code=trust_remote_code)
    params = parameter_shapes(model)
    layout = file_layout(model, tensor_shapes(weight_files(Path(model_dir))), params)
    # A fused parameter's pieces expert by expert (gate and up of expert 0, then of expert 1, ...): the order of
    # its stored chunks (each rank's experts), so that consolidation reads each chunk once.
    written = {name: sorted(pieces, key=lambda p: p.offsets) for name, pieces in written_pieces(layout, params).items()}
    return by_key(written), model


def consolidate(
    checkpoint: str | Path,
    *,
    model_dir: str | Path,
    output_dir: str | Path,
    export: ExportConfig,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Writes the model weights of a DCP checkpoint as safetensors shards with a Hugging Face index, or, for a LoRA
    run, the trained adapter in peft's format."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    # One process reads what all ranks wrote; DCP warns about the missing process group, which is intended here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    reader = SafeFileSystemReader(str(checkpoint))  # reads (and checks) the checkpoint's metadata once, for all loads
    saved = reader.read_metadata().state_dict_metadata
    lora = LoraSettings(**read_stage_config(checkpoint).get("lora", {}))
    settings = {"export": {"dtype": export.dtype, "max_shard_size": export.max_shard_size}}
    if lora.enabled:
        output_dir.mkdir(parents=True, exist_ok=True)
        adapter = {k.removeprefix(MODEL_PREFIX): v for k, v in saved.items() if k.startswith(MODEL_PREFIX)}
        peft_model, _ = apply_lora(build_empty_model(model_dir, trust_remote_code=trust_remote_code),
                                   lora, seed=0)  # fmt: skip
        expected = {k: tuple(v.shape) for k, v in peft_model.state_dict().items() if ".lora_" in k}
        if set(adapter) != set(expected):
            raise ValueError(f"checkpoint {checkpoint} holds other adapter tensors than lora.* makes for {model_dir}: "
                             f"{sorted(set(adapter) ^ set(expected))[:3]}")  # fmt: skip
        check_coverage(checkpoint, saved, {MODEL_PREFIX + k: shape for k, shape in expected.items()})
        tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in adapter.items()}
        dcp.load({"model": tensors}, storage_reader=reader)
        # In training's fp32: peft computes adapters in fp32 whatever the base's dtype, and the merge adds them in fp32.
        save_adapter(peft_model, tensors, output_dir, base=str(model_dir))
        write_stage_config(output_dir, settings, upstream=checkpoint)
        log.info("consolidated the LoRA adapter: %d tensors, %s parameters", len(tensors),
                 f"{sum(t.numel() for t in tensors.values()):,}")  # fmt: skip
        return {"tensors": len(tensors), "adapter": True, "dtype": str(torch.float32)}
    blocks, model = base_layout(model_dir, trust_remote_code=trust_remote_code)
    params = parameter_shapes(model)
    names = list(params)
    missing = [n for n in names if MODEL_PREFIX + n not in saved]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights of {model_dir}: {', '.join(missing[:5])}")
    floating = {MODEL_PREFIX + name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    check_coverage(checkpoint, saved, {MODEL_PREFIX + name: shape for name, shape in params.items()}, floating=floating)
    dtype = export_dtype(export, model_dir)
    shapes = {key: piece.file_shape for key, (_, piece) in blocks.items()}
    fused = {name for name, count in Counter(name for name, _ in blocks.values()).items() if count > 1}
    chunks = CheckpointBlocks(reader)  # the metadata already read

    def load(group: list[str]) -> dict[str, torch.Tensor]:
        whole = {
            key: (MODEL_PREFIX + blocks[key][0], blocks[key][1].offsets) for key in group if blocks[key][0] not in fused
        }
        tensors = chunks.read_whole(whole)  # in one call, as DCP reads them
        for key in group:
            if key not in whole:  # one expert's tensor: a block of a fused parameter
                name, piece = blocks[key]
                tensors[key] = chunks.block(MODEL_PREFIX + name, piece.offsets, piece.sizes).reshape(piece.file_shape)
        return tensors

    index = write_sharded(output_dir, shapes, dtype=dtype, load=load, max_shard_bytes=export.max_shard_bytes)
    write_stage_config(output_dir, settings, upstream=checkpoint)
    total, files = index["metadata"]["total_size"], len(set(index["weight_map"].values()))
    log.info("consolidated %s weights as %d tensors, %.1f MB, %s, into %d file(s)", len(names), len(shapes),
             total / 1e6, dtype, files)  # fmt: skip
    return {"tensors": len(shapes), "bytes": total, "files": files, "dtype": str(dtype)}
