"""The export stages: a sharded DCP checkpoint to safetensors (consolidate), then to a Hugging Face model directory
(convert_hf).

Consolidation runs in one process without the training ranks and reads the checkpoint shard file by shard file, so
its peak memory is about one output shard, never the whole model twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vectorlm.checkpoint import SafeFileSystemReader
from vectorlm.config import ExportConfig, LoraSettings, read_stage_config, write_stage_config
from vectorlm.lora import ADAPTER_FILES, apply_lora, merge_adapter, save_adapter
from vectorlm.model import build_empty_model, tied_parameter_names

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
MODEL_PREFIX = "model."  # the training checkpoint holds {"model": ..., "optim": ...}


def export_dtype(export: ExportConfig, model_config) -> torch.dtype:
    """The dtype to write: the configured one, or for ``auto`` the base model's own (float32 when it says none)."""
    if export.dtype != "auto":
        return getattr(torch, export.dtype)
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def weight_names(model_dir: str | Path, *, trust_remote_code: bool = False) -> list[str]:
    """The model's state-dict names in order, without the duplicates of tied weights."""
    model = build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code)
    tied = tied_parameter_names(model)
    return [name for name in model.state_dict() if name not in tied]


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
    reader = SafeFileSystemReader(str(checkpoint))
    saved = reader.read_metadata().state_dict_metadata
    lora = LoraSettings(**read_stage_config(checkpoint).get("lora", {}))
    settings = {"export": {"dtype": export.dtype, "max_shard_size": export.max_shard_size}}
    if lora.enabled:
        output_dir.mkdir(parents=True, exist_ok=True)
        adapter = {k.removeprefix(MODEL_PREFIX): v for k, v in saved.items() if k.startswith(MODEL_PREFIX)}
        tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in adapter.items()}
        dcp.load({"model": tensors}, storage_reader=reader)
        dtype = export_dtype(export, AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code))
        peft_model, _ = apply_lora(build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code),
                                   lora, seed=0)  # fmt: skip
        save_adapter(peft_model, {k: t.to(dtype) for k, t in tensors.items()}, output_dir, base=str(model_dir))
        write_stage_config(output_dir, settings, upstream=checkpoint)
        log.info("consolidated the LoRA adapter: %d tensors, %s parameters", len(tensors),
                 f"{sum(t.numel() for t in tensors.values()):,}")  # fmt: skip
        return {"tensors": len(tensors), "adapter": True, "dtype": str(dtype)}
    names = weight_names(model_dir, trust_remote_code=trust_remote_code)
    missing = [n for n in names if MODEL_PREFIX + n not in saved]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights of {model_dir}: {', '.join(missing[:5])}")
    dtype = export_dtype(export, AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code))
    shapes = {n: tuple(saved[MODEL_PREFIX + n].size) for n in names}
    sizes = {n: math.prod(shape) * dtype.itemsize for n, shape in shapes.items()}

    def load(group: list[str]) -> dict[str, torch.Tensor]:
        tensors = {n: torch.empty(shapes[n], dtype=saved[MODEL_PREFIX + n].properties.dtype) for n in group}
        dcp.load({"model": tensors}, storage_reader=reader)
        return tensors

    shards = plan_shards(sizes, export.max_shard_bytes)
    output_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(output_dir / file_name, {n: shapes[n] for n in shard}, dtype=dtype, load=load)
        weight_map.update(dict.fromkeys(shard, file_name))
        log.info("wrote %s (%d tensors)", file_name, len(shard))
    total = sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    write_stage_config(output_dir, settings, upstream=checkpoint)
    log.info("consolidated %s tensors, %.1f MB, %s, into %d file(s)", len(names), total / 1e6, dtype, len(shards))
    return {"tensors": len(names), "bytes": total, "files": len(shards), "dtype": str(dtype)}


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# Tensors read per DCP call when writing a shard. Measured on a 134M model (bench/consolidate_memory.py): peak RSS
# above baseline 445 MB at 256 MiB, 192 MB at 64 MiB (then the largest tensor, read twice by DCP, dominates).
LOAD_BUDGET_BYTES = 64 * 2**20


def write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    *,
    dtype: torch.dtype,
    load: Callable[[list[str]], dict[str, torch.Tensor]],
) -> None:
    """Writes one safetensors file, reading its tensors a few at a time (about ``LOAD_BUDGET_BYTES``).

    ``safetensors.torch.save_file`` needs every tensor of the file in memory at once; the layout is simple enough
    to stream (an 8-byte header length, a JSON header of dtypes, shapes and byte ranges, then the raw bytes), so
    peak memory is a few tensors rather than a whole shard. The safetensors library reads the result (tests).
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for group in plan_shards({n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in shapes},
                                 LOAD_BUDGET_BYTES):  # fmt: skip
            tensors = load(group)
            for name in group:
                f.write(tensors.pop(name).to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data)


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
    trust_remote_code: bool = False,
) -> Path:
    """Assembles a Hugging Face model directory: the consolidated weights with the base model's config, generation
    config, tokenizer (and custom code, if any), plus the resolved pipeline config.

    For a LoRA run, ``adapter_dir`` receives the adapter (with the tokenizer), and the model directory the base
    model with the adapter merged in. With a ``smoke_test_prompt``, the written model is loaded back and generates.
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
                      max_shard_size=stage["export"]["max_shard_size"], trust_remote_code=trust_remote_code)  # fmt: skip
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
    settings = {"smoke_test": smoke_test_prompt is not None, "smoke_test_prompt": smoke_test_prompt}
    write_stage_config(output_dir, {"export": settings}, upstream=consolidated)
    if smoke_test_prompt is not None:
        smoke_test(output_dir, prompt=smoke_test_prompt, trust_remote_code=trust_remote_code)
    log.info("Hugging Face model written to %s", output_dir)
    return output_dir


def smoke_test(model_dir: str | Path, *, prompt: str, trust_remote_code: bool = False, num_tokens: int = 24) -> str:
    """Loads the exported model as a user would and greedily continues ``prompt`` (as a user turn through the chat
    template when the tokenizer has one); returns the text."""
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
