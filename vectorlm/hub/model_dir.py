"""A Hugging Face model directory as the stages read it (config, safetensors weights, tokenizer), checked with a
message naming the problem: by the Snakefile before any job starts (vectorlm/pipeline/preflight.py), and again by
tokenize and train, so the library is just as safe without Snakemake. Standard library only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from vectorlm.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Files one of which a tokenizer needs: fast (tokenizer.json), SentencePiece (*.model), BPE (vocab.json and
# merges.txt), WordPiece (vocab.txt), tiktoken.
TOKENIZER_FILES = ("tokenizer.json", "tekken.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a Path, after checking it is a Hugging Face model directory: a config.json that is a JSON object,
    safetensors weights whose files are all there and as long as their headers say (a truncated copy is found here,
    not in the ranks), and a tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"config key model: model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key model: {path} has no config.json; is it a Hugging Face model directory?")
    read_model_config(path)
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"config key model: {path} has no .safetensors weights (pickled .bin weights are not read); convert them "
            "with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)"
        )
    check_weight_files(path)
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ConfigError(
            f"config key model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer there: AutoTokenizer.from_pretrained(original).save_pretrained(path)"
        )
    return path


# The names configs give the longest sequence a model takes, most common first (GPT-2 and friends use n_positions).
MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The model's config.json, or a ConfigError naming the file when it is not a JSON object."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except ValueError as error:
        raise ConfigError(f"config key model: {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"config key model: {path} holds no JSON object")
    return config


def check_weight_files(model_dir: Path) -> None:
    """Every safetensors file the model's weights are in exists, has a header that parses and is as long as the
    header says (its index too, where it has one): a ConfigError naming the file otherwise. Reads headers only."""
    try:
        files = sorted(set(weight_files(model_dir).values()))
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise ConfigError(f"config key model: cannot read the weights' index of {model_dir}: {error}") from error
    for file in files:
        if not file.is_file():
            raise ConfigError(f"config key model: {file} is missing ({INDEX_FILE} names it)")
        try:
            header = read_header(file)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise ConfigError(f"config key model: {file} is not a safetensors file: {error}") from error
        needed = max((entry["range"][1] for entry in header.values()), default=0)
        if (size := file.stat().st_size) < needed:
            raise ConfigError(f"config key model: {file} is truncated: {size:,} of {needed:,} bytes")


def model_max_positions(model_dir: str | Path) -> tuple[str, int] | None:
    """The config key and value of the longest sequence the model's config allows, or None when it does not say."""
    config = read_model_config(model_dir)
    config = config.get("text_config", config)
    return next(((key, config[key]) for key in MAX_POSITION_KEYS if isinstance(config.get(key), int)), None)


def check_max_seq_len(max_seq_len: int, model_dir: str | Path) -> None:
    limit = model_max_positions(model_dir)
    if limit is not None and max_seq_len > limit[1]:
        raise ConfigError(
            f"config key max_seq_len: {max_seq_len} is above the model's {limit[0]} ({limit[1]}) "
            f"in {Path(model_dir) / 'config.json'}"
        )


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file: name -> dtype, shape and absolute byte range in the file."""
    with open(path, "rb") as f:
        return header_of(f)


def header_of(f) -> dict[str, dict[str, Any]]:
    """:func:`read_header` of a safetensors file open for reading at its start."""
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
