"""The tokenize stage: documents from disk to token ids, with a train/eval split, as a ``datasets`` directory."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from vectorlm.config import DataConfig, write_stage_config
from vectorlm.inputs import DataError, check_data_file, check_model_dir

log = logging.getLogger(__name__)

# Bumped whenever the tokenized artifact changes shape, so Snakemake re-tokenizes (the rule passes it as a param).
ARTIFACT_VERSION = 1
TOKEN_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, preferring the fast (Rust) implementation."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        log.warning("%s has no fast tokenizer; tokenizing with the slow Python one", model_dir)
    return tokenizer


def document_boundaries(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids put before and after every document.

    A document ends with EOS so the model learns to stop. It starts with BOS when the tokenizer has one distinct from
    EOS; where BOS == EOS (GPT-2 style) the previous document's EOS already plays that role. Tokenizers without pad
    tokens need nothing here: packed rows are not padded, and batches pad with -100 labels.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None and bos != eos else []
    suffix = [eos] if eos is not None else []
    return prefix, suffix


def load_documents(
    path: str | Path, *, text_field: str, cache_dir: str | Path, key: str = "data.train"
) -> datasets.Dataset:
    """Rows of a ``.jsonl`` file as a Dataset, checked to hold ``text_field``; ``key`` names the file in errors."""
    path = check_data_file(path, key=key)
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
    except datasets.exceptions.DatasetGenerationError as error:
        raise DataError(f"{path}: cannot read as JSON lines: {error.__cause__ or error}") from error
    if len(dataset) == 0:
        raise DataError(f"{path}: the file has no rows")
    if text_field not in dataset.column_names:
        raise DataError(
            f"{path}: rows have no field {text_field!r} (data.text_field); fields found: {', '.join(dataset.column_names)}"
        )
    return dataset


def tokenize_documents(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_field: str,
    batch_size: int,
    source: str,
) -> datasets.Dataset:
    """Token ids of every document, with the document boundaries of :func:`document_boundaries`."""
    prefix, suffix = document_boundaries(tokenizer)

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        texts = batch[text_field]
        for index, text in zip(indices, texts):
            if not isinstance(text, str):
                raise DataError(f"{source}: row {index + 1}: field {text_field!r} is {text!r}, not a string")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [prefix + doc + suffix for doc in ids]}

    return documents.map(
        encode,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=documents.column_names,
        features=TOKEN_FEATURES,
        desc=f"tokenize {Path(source).name}",
    )


def run_tokenize(
    *, model_dir: str | Path, data: DataConfig, output_dir: str | Path, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Tokenizes ``data.train`` (and ``data.eval``, or a held-out split) into a DatasetDict at ``output_dir``.

    Returns the statistics also written to ``output_dir/stats.json``.
    """
    check_model_dir(model_dir)
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokenize-", dir=output_dir.parent) as cache_dir:
        splits = {}
        for split, path in (("train", data.train), ("eval", data.eval)):
            if path is None:
                continue
            documents = load_documents(path, text_field=data.text_field, cache_dir=cache_dir, key=f"data.{split}")
            splits[split] = tokenize_documents(
                documents, tokenizer, text_field=data.text_field, batch_size=data.tokenize_batch_size, source=str(path)
            )
        if "eval" not in splits:
            splits = split_off_eval(splits["train"], fraction=data.eval_fraction, seed=data.split_seed)
        tokenized = datasets.DatasetDict(splits)
        seconds = time.perf_counter() - start
        tokenized.save_to_disk(str(output_dir))
    stats: dict[str, Any] = {split: _split_stats(ds) for split, ds in tokenized.items()}
    num_documents = sum(s["documents"] for s in stats.values())
    num_tokens = sum(s["tokens"] for s in stats.values())
    stats.update(seconds=round(seconds, 3), tokens_per_second=round(num_tokens / max(seconds, 1e-9)))
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_stage_config(output_dir, {"model": str(model_dir), "trust_remote_code": trust_remote_code, "data": data})
    log.info(
        "tokenized %s documents, %s tokens in %.1f s (%s tokens/s)",
        f"{num_documents:,}",
        f"{num_tokens:,}",
        seconds,
        f"{stats['tokens_per_second']:,}",
    )
    return stats


def split_off_eval(train: datasets.Dataset, *, fraction: float, seed: int) -> dict[str, datasets.Dataset]:
    """Holds out ``fraction`` of the documents (at least one) for evaluation."""
    if len(train) < 2:
        raise DataError(
            f"data.train has {len(train)} document; holding out an eval split (data.eval_fraction) needs at least 2"
        )
    parts = train.train_test_split(test_size=max(1, round(fraction * len(train))), seed=seed, shuffle=True)
    return {"train": parts["train"], "eval": parts["test"]}


def _split_stats(dataset: datasets.Dataset) -> dict[str, int]:
    lengths = dataset.with_format("arrow")["input_ids"].combine_chunks().value_lengths()
    return {"documents": len(dataset), "tokens": int(lengths.to_numpy().sum())}
