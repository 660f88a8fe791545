"""The embedded example: a byte-level BPE tokenizer trained on a small corpus and a tiny random Llama model.

This is what lets the whole pipeline run on a laptop CPU with nothing downloaded. Tests use the same builders with
even smaller sizes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS, EOS = "<s>", "</s>"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that, like Llama's, starts each text with ``<s>``, ends documents with ``</s>``
    and has no pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS)
    # A tokenizer built the wrong way can come out nearly empty without any error (see NOTES.md), and BPE stops early
    # on a corpus with fewer distinct merges than asked for.
    if len(wrapped) != vocab_size:
        raise ValueError(f"trained tokenizer has {len(wrapped)} tokens, not {vocab_size}: the corpus is too small")
    return wrapped


def tiny_llama_config(
    *,
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    bos_token_id: int = 0,
    eos_token_id: int = 1,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def read_corpus(path: str | Path, *, text_field: str = "text") -> list[str]:
    with open(path) as f:
        return [json.loads(line)[text_field] for line in f if line.strip()]


def build_example_model(
    corpus: str | Path,
    output_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Writes a Hugging Face model directory (safetensors weights, config, tokenizer) to ``output_dir``."""
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(read_corpus(corpus), vocab_size=vocab_size)
    config = tiny_llama_config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    num_params = sum(p.numel() for p in model.parameters())
    log.info("example model: %s parameters, vocab %d, written to %s", f"{num_params:,}", vocab_size, output_dir)
    return output_dir
