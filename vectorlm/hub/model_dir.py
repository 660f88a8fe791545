"""A Hugging Face model directory as the stages read it (config, safetensors weights, tokenizer), checked with a
message naming the problem: by the Snakefile before any job starts (vectorlm/pipeline/preflight.py), and again by
tokenize and train, so the library is just as safe without Snakemake. Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

from vectorlm.config import ConfigError

# Files one of which a tokenizer needs: fast (tokenizer.json), SentencePiece (*.model), BPE (vocab.json and
# merges.txt), WordPiece (vocab.txt), tiktoken.
TOKENIZER_FILES = ("tokenizer.json", "tekken.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a Path, after checking it is a Hugging Face model directory with weights and a tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"config key model: model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key model: {path} has no config.json; is it a Hugging Face model directory?")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(
            f"config key model: {path} has no .safetensors weights (pickled .bin weights are not read); convert them "
            "with transformers: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)"
        )
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ConfigError(
            f"config key model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer there: AutoTokenizer.from_pretrained(original).save_pretrained(path)"
        )
    return path


# The names configs give the longest sequence a model takes, most common first (GPT-2 and friends use n_positions).
MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_max_positions(model_dir: str | Path) -> tuple[str, int] | None:
    """The config key and value of the longest sequence the model's config allows, or None when it does not say."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    return next(((key, config[key]) for key in MAX_POSITION_KEYS if isinstance(config.get(key), int)), None)


def check_max_seq_len(max_seq_len: int, model_dir: str | Path) -> None:
    limit = model_max_positions(model_dir)
    if limit is not None and max_seq_len > limit[1]:
        raise ConfigError(
            f"config key max_seq_len: {max_seq_len} is above the model's {limit[0]} ({limit[1]}) "
            f"in {Path(model_dir) / 'config.json'}"
        )
