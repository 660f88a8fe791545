"""The convert_hf stage: the consolidated weights as a Hugging Face model directory that ``from_pretrained`` loads, with
the base model's config, generation config and tokenizer; for a LoRA run the adapter alone too, and the base model
with it merged in. Then the smoke test: the written model checked against its config, and loaded to generate when it
is small enough.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vectorlm.config import ExportConfig, LoraSettings, parse_size, read_stage_config, write_stage_config
from vectorlm.export.consolidate import export_dtype
from vectorlm.export.merge import merge_adapter
from vectorlm.hub.layout import file_layout
from vectorlm.hub.meta_model import build_empty_model, parameter_shapes
from vectorlm.hub.shards import DTYPES, INDEX_FILE, read_header, verify_files, weight_files
from vectorlm.train.lora import ADAPTER_FILES

log = logging.getLogger(__name__)


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
    config.dtype = export_dtype(ExportConfig(dtype=stage["export"]["dtype"]), model_dir)  # what consolidate wrote
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
    """Checks an exported model without loading it into a model; returns the size of its weights in bytes.

    Every weight of the model its config describes (built on the meta device) is in the files with its shape and,
    for floating-point weights, the dtype config.json declares; the index maps each tensor to the file that holds it,
    and lists every tensor of its files; each file is as long as its header says, and each tensor's data has the
    checksum recorded when it was written (:func:`vectorlm.hub.shards.verify_files`: the files are read once, a
    block at a time, at any size); the tokenizer loads.

    Raises:
        ValueError: naming the first problem found.
    """
    model_dir = Path(model_dir)
    model = build_empty_model(model_dir, trust_remote_code=trust_remote_code)
    declared = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code).dtype
    dtype = getattr(torch, declared) if isinstance(declared, str) else declared or torch.float32
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
    verify_files(model_dir, require_checksums=True)  # written by consolidate or the merge: checksums everywhere
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
