"""The export stages: a sharded DCP checkpoint to safetensors (consolidate), then to a Hugging Face model directory
(convert_hf).

Consolidation runs in one process without the training ranks and reads the checkpoint shard file by shard file, so
its peak memory is about one output shard, never the whole model twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vectorlm.checkpoint import SafeFileSystemReader
from vectorlm.checkpoint_blocks import CheckpointBlocks
from vectorlm.config import ExportConfig, LoraSettings, parse_size, read_stage_config, write_stage_config
from vectorlm.hub_layout import Piece, by_key, file_layout, written_pieces
from vectorlm.lora import ADAPTER_FILES, apply_lora, save_adapter
from vectorlm.merge import merge_adapter
from vectorlm.model import build_empty_model, parameter_shapes
from vectorlm.shards import DTYPES, INDEX_FILE, read_header, tensor_shapes, weight_files, write_sharded

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # the training checkpoint holds {"model": ..., "optim": ...}


def export_dtype(export: ExportConfig, model_config) -> torch.dtype:
    """The dtype to write: the configured one, or for ``auto`` the base model's own (float32 when it says none)."""
    if export.dtype != "auto":
        return getattr(torch, export.dtype)
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def weight_shapes(model_dir: str | Path, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's state dict in order (of the model its config describes, built on the meta device),
    without the duplicates of tied weights."""
    return parameter_shapes(build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code))


def base_layout(
    model_dir: str | Path, *, trust_remote_code: bool = False
) -> tuple[dict[str, tuple[str, Piece]], torch.nn.Module]:
    """The tensors an export of the model in ``model_dir`` writes, in the layout of its own safetensors files
    (per-expert tensors where they have them; :mod:`vectorlm.hub_layout`): file key -> the block of a parameter it
    is. Returns them, in the parameters' order, and the (meta-device) model."""
    model = build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code)
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
        tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in adapter.items()}
        dcp.load({"model": tensors}, storage_reader=reader)
        peft_model, _ = apply_lora(build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code),
                                   lora, seed=0)  # fmt: skip
        # In training's fp32: peft computes adapters in fp32 whatever the base's dtype, and the merge adds them in fp32.
        save_adapter(peft_model, tensors, output_dir, base=str(model_dir))
        write_stage_config(output_dir, settings, upstream=checkpoint)
        log.info("consolidated the LoRA adapter: %d tensors, %s parameters", len(tensors),
                 f"{sum(t.numel() for t in tensors.values()):,}")  # fmt: skip
        return {"tensors": len(tensors), "adapter": True, "dtype": str(torch.float32)}
    blocks, model = base_layout(model_dir, trust_remote_code=trust_remote_code)
    names = list(parameter_shapes(model))
    missing = [n for n in names if MODEL_PREFIX + n not in saved]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights of {model_dir}: {', '.join(missing[:5])}")
    dtype = export_dtype(export, model.config)
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


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def convert_hf(
    consolidated: str | Path,
    *,
    model_dir: str | Path,
    output_dir: str | Path,
    adapter_dir: str | Path | None = None,
    smoke_test_prompt: str | None = None,
    smoke_test_max_bytes: int | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Assembles a Hugging Face model directory: the consolidated weights with the base model's config, generation
    config, tokenizer (and custom code, if any), plus the resolved pipeline config.

    For a LoRA run, ``adapter_dir`` receives the adapter (with the tokenizer), and the model directory the base
    model with the adapter merged in, shard by shard. With a ``smoke_test_prompt``, the written model is checked
    (:func:`check_export`) and, when its weights are at most ``smoke_test_max_bytes``, loaded back to generate.
    """
    consolidated, model_dir, output_dir = Path(consolidated), Path(model_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = read_stage_config(consolidated)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    config.dtype = export_dtype(ExportConfig(dtype=stage["export"]["dtype"]), config)
    config.use_cache = True  # training turned it off; generation wants it
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if stage.get("data", {}).get("chat_template") is not None:  # the template training used, so that inference
        tokenizer.chat_template = stage["data"]["chat_template"]  # formats prompts the same way
    if LoraSettings(**stage.get("lora", {})).enabled:
        if adapter_dir is None:
            raise ValueError(f"{consolidated} holds a LoRA adapter: convert_hf needs adapter_dir")
        adapter_dir = Path(adapter_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            _link_or_copy(consolidated / name, adapter_dir / name)
        tokenizer.save_pretrained(adapter_dir)
        write_stage_config(adapter_dir, {}, upstream=consolidated)
        merge_adapter(model_dir, adapter_dir, output_dir, dtype=config.dtype,
                      max_shard_bytes=parse_size(stage["export"]["max_shard_size"], key="export.max_shard_size"),
                      trust_remote_code=trust_remote_code)  # fmt: skip
    else:
        index = json.loads((consolidated / INDEX_FILE).read_text())
        for name in sorted(set(index["weight_map"].values())) + [INDEX_FILE]:
            _link_or_copy(consolidated / name, output_dir / name)
    config.save_pretrained(output_dir)
    try:
        generation = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if trust_remote_code:
        for code in model_dir.glob("*.py"):
            shutil.copy2(code, output_dir / code.name)
    settings = {"smoke_test": smoke_test_prompt is not None, "smoke_test_prompt": smoke_test_prompt,
                "smoke_test_max_bytes": smoke_test_max_bytes}  # fmt: skip
    write_stage_config(output_dir, {"export": settings}, upstream=consolidated)
    if smoke_test_prompt is not None:
        smoke_test(output_dir, prompt=smoke_test_prompt, max_bytes=smoke_test_max_bytes,
                   trust_remote_code=trust_remote_code)  # fmt: skip
    log.info("Hugging Face model written to %s", output_dir)
    return output_dir


def check_export(model_dir: str | Path, *, trust_remote_code: bool = False) -> int:
    """Checks an exported model without loading its weights; returns their size in bytes.

    Every weight of the model its config describes (built on the meta device) is in the files with its shape and,
    for floating-point weights, the config's dtype; the index maps each tensor to the file that holds it, and lists
    every tensor of its files; the tokenizer loads. Works at any size: only the files' headers are read.

    Raises:
        ValueError: naming the first problem found.
    """
    model_dir = Path(model_dir)
    model = build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code)
    dtype = export_dtype(ExportConfig(), model.config)
    listed = weight_files(model_dir)
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(set(listed.values())):
        if not path.is_file():
            raise ValueError(f"{model_dir}: {INDEX_FILE} names {path.name}, which does not exist")
        for name, entry in read_header(path).items():
            if listed.get(name) != path:
                raise ValueError(f"{model_dir}: {path.name} holds {name}, which {INDEX_FILE} does not map to it")
            found[name] = entry
    if unwritten := [name for name in listed if name not in found]:
        raise ValueError(f"{model_dir}: {INDEX_FILE} lists {unwritten[:3]}, which its files do not hold")
    try:  # every weight, as from_pretrained converts the files' tensors (e.g. per-expert ones) into it
        used = file_layout(model, {n: tuple(e["shape"]) for n, e in found.items()}, parameter_shapes(model)).file_keys
    except ValueError as error:
        raise ValueError(f"{model_dir}: {error}") from error
    for name in used:
        written = DTYPES[found[name]["dtype"]]
        if written.is_floating_point and written != dtype:
            raise ValueError(f"{model_dir}: {name} is {written}, but config.json says {dtype}")
    if extra := sorted(set(found) - set(used)):
        log.warning("%s holds %d tensor(s) the model does not use (from_pretrained ignores them): %s", model_dir,
                    len(extra), ", ".join(extra[:5]))  # fmt: skip
    AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    size = sum(entry["range"][1] - entry["range"][0] for entry in found.values())
    log.info("checked %s: %d tensors, %.2f GB in %s, index complete, tokenizer loads", model_dir, len(found),
             size / 1e9, dtype)  # fmt: skip
    return size


def smoke_test(
    model_dir: str | Path, *, prompt: str, max_bytes: int | None = None, trust_remote_code: bool = False,
    num_tokens: int = 24,
) -> str | None:  # fmt: skip
    """Checks the exported model (:func:`check_export`); then, when its weights are at most ``max_bytes`` (None: any
    size), loads it as a user would and greedily continues ``prompt`` (as a user turn through the chat template when
    the tokenizer has one). Returns the text, or None when the model was too big to load here."""
    size = check_export(model_dir, trust_remote_code=trust_remote_code)
    if max_bytes is not None and size > max_bytes:
        log.info("smoke test: not loading the model to generate (%.1f GB of weights, above "
                 "export.smoke_test_max_size: %.1f GB)", size / 1e9, max_bytes / 1e9)  # fmt: skip
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)  # fmt: skip
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=num_tokens, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    log.info("smoke test: %r -> %r", prompt, text)  # the continuation only
    return text
