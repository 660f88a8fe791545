"""Attention over packed rows: documents kept apart without transformers' per-forward search of the positions."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.masking_utils
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralConfig,
)

from tests.conftest import requires_gpu
from vectorlm.config import ConfigError
from vectorlm.data.loader import collate
from vectorlm.train.attention import PREFERENCE, document_mask_kwargs, resolve_attention, supported_attention
from vectorlm.train.step import forward_logits

ROWS = [  # two packed rows: documents of 5, 3 and 8 tokens, then 10 and 6
    {"input_ids": list(range(2, 18)), "labels": list(range(2, 18)), "position_ids": [*range(5), *range(3), *range(8)]},
    {"input_ids": list(range(20, 36)), "labels": list(range(20, 36)), "position_ids": [*range(10), *range(6)]},
]


def test_flash_attn_boundaries_are_computed_when_collating():
    batch = collate(ROWS, flatten=True)
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8, 16, 26, 32] and batch["cu_seq_lens"].dtype == torch.int32
    assert batch["max_length"] == 10 and batch["input_ids"].shape == (1, 32)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_no_search_of_the_positions_in_the_forward(tiny_model_dir, attention, monkeypatch):
    """transformers' search of the positions for packed documents waits for the GPU (a Python test on a device
    tensor): with the masks built here it never runs, and the logits are those of transformers' own path."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).eval()
    batch = collate(ROWS, flatten=False)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

        def refuse(position_ids):
            raise AssertionError("transformers searched the positions for packed documents")

        monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", refuse)
        torch.testing.assert_close(forward_logits(model, batch), expected, atol=1e-5, rtol=0)


def test_sliding_window_models_keep_transformers_masks():
    """A single mask passed in would apply to every layer and lose the sliding windows: such models keep
    transformers' own per-layer masks."""
    config = MistralConfig(sliding_window=4)
    config._attn_implementation = "sdpa"
    assert document_mask_kwargs(config, collate(ROWS, flatten=False)) == {}
    config.sliding_window = None
    assert set(document_mask_kwargs(config, collate(ROWS, flatten=False))) == {"attention_mask"}


def test_auto_and_explicit_choices():
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ConfigError, match="train.attention: flash_attention_2 needs a CUDA GPU"):
        resolve_attention("flash_attention_2", torch.device("cpu"))


def test_auto_picks_what_the_model_supports_and_an_explicit_choice_it_does_not_fails():
    """transformers refuses sdpa for Gemma-2 and flex attention for GPT-2: auto picks the next one that keeps packed
    documents apart; asking for an unsupported one names the supported ones."""
    gemma2, gpt2 = supported_attention(Gemma2ForCausalLM), supported_attention(GPT2LMHeadModel)
    assert gemma2 == ("flash_attention_2", "flex_attention", "eager")
    assert gpt2 == ("flash_attention_2", "sdpa", "eager")
    assert supported_attention(LlamaForCausalLM) == PREFERENCE
    assert resolve_attention("auto", torch.device("cpu"), supported=gemma2) == "eager"
    assert resolve_attention("auto", torch.device("cuda"), supported=gemma2) in ("flash_attention_2", "flex_attention")
    assert resolve_attention("auto", torch.device("cuda"), supported=gpt2) in ("flash_attention_2", "sdpa")
    message = ("train.attention: Gemma2ForCausalLM does not support sdpa; it supports flash_attention_2, "
               "flex_attention, eager")  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_attention("sdpa", torch.device("cpu"), supported=gemma2, model_name="Gemma2ForCausalLM")


def test_auto_never_picks_our_flash_attn_path_for_a_model_with_attention_sinks(monkeypatch):
    """gpt-oss declares flash-attn support, but its attention sinks are refused by our varlen path: with flash-attn
    installed on a GPU, auto picks flex attention for it, and asking for flash-attn names only what it supports."""
    from transformers import GptOssForCausalLM

    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    gpt_oss = supported_attention(GptOssForCausalLM)
    assert gpt_oss == ("flex_attention", "eager")
    assert resolve_attention("auto", torch.device("cuda"), supported=gpt_oss) == "flex_attention"
    assert resolve_attention("auto", torch.device("cuda"), supported=PREFERENCE) == "flash_attention_2"
    message = "GptOssForCausalLM does not support flash_attention_2; it supports flex_attention, eager (or auto"
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_attention("flash_attention_2", torch.device("cuda"), supported=gpt_oss, model_name="GptOssForCausalLM")


def tiny_gemma2(path: Path, tokenizer_from: Path) -> Path:
    """A random 2-layer Gemma-2 with the tokenizer of ``tokenizer_from``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                          max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_an_unsupported_choice_fails_before_any_job_and_the_answer_is_kept(tiny_model_dir, tmp_path, monkeypatch):
    from vectorlm.config import Config
    from vectorlm.hub import meta_model as model_module
    from vectorlm.pipeline.preflight import check_attention

    path = tiny_gemma2(tmp_path / "gemma2", tiny_model_dir)
    raw = {"model": str(path), "output_dir": str(tmp_path / "out"), "max_seq_len": 64, "data": {"train": "x.jsonl"}}
    cache = tmp_path / "attention.json"
    with pytest.raises(ConfigError, match="train.attention: Gemma2ForCausalLM does not support sdpa; it supports"):
        check_attention(Config.from_dict({**raw, "train": {"attention": "sdpa"}}), cache=cache, model_digest="d1")
    monkeypatch.setattr(model_module, "causal_lm_class", None)  # asking transformers again would fail
    check_attention(Config.from_dict({**raw, "train": {"attention": "eager"}}), cache=cache, model_digest="d1")
    check_attention(Config.from_dict(raw), cache=tmp_path / "unused.json", model_digest="d2")  # auto: no question
    assert not (tmp_path / "unused.json").exists()


@requires_gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_a_training_step_on_gpu_never_waits_for_the_device(tiny_model_dir, attention):
    """forward and backward of a packed batch with CUDA's synchronisation debugging set to fail on any sync."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention).to("cuda")
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in collate(ROWS, flatten=False).items()}
    forward_logits(model, batch).float().sum().backward()  # warm-up: kernels chosen, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_logits(model, batch).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(next(model.parameters()).grad.float().norm().item())


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                     window_size=(-1, -1), softcap=0.0, **_):  # fmt: skip
    """flash-attn's varlen call, computed document by document with sdpa: what a CPU can check of the varlen path."""
    calls.append({"cu_seq_lens": cu_q.tolist(), "max_length": max_q, "causal": causal, "window": window_size})
    assert torch.equal(cu_q, cu_k) and max_q == max_k and cu_q.dtype == torch.int32 and isinstance(max_q, int)
    assert (cu_q[1:] - cu_q[:-1]).max() <= max_q  # flash-attn computes nothing of a document past max_length
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        heads = q.shape[1] // k.shape[1]
        doc_q, doc_k, doc_v = (t[start:end].transpose(0, 1).float() for t in (q, k, v))
        doc_k, doc_v = doc_k.repeat_interleave(heads, 0), doc_v.repeat_interleave(heads, 0)
        attended = torch.nn.functional.scaled_dot_product_attention(doc_q, doc_k, doc_v, is_causal=causal,
                                                                    scale=softmax_scale)  # fmt: skip
        out[start:end] = attended.transpose(0, 1).to(q.dtype)
    return out


calls: list[dict] = []


def test_the_flash_attn_path_gets_the_documents_from_collate(tiny_model_dir, monkeypatch):
    """The varlen path end to end on a CPU, with flash-attn's function replaced by a per-document reference: the
    boundaries computed when collating reach it unchanged, and each packed document's logits equal the document's
    alone (within bf16, flash-attn's precision)."""
    import sys
    import types

    from vectorlm.train.attention import FLASH_VARLEN

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=reference_varlen))
    calls.clear()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=FLASH_VARLEN).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    batch = collate(ROWS, flatten=True)
    with torch.no_grad():
        logits = forward_logits(model, batch)[0]
        assert calls[0] == {"cu_seq_lens": [0, 5, 8, 16, 26, 32], "max_length": 10, "causal": True, "window": (-1, -1)}
        for start, end in zip(calls[0]["cu_seq_lens"][:-1], calls[0]["cu_seq_lens"][1:]):
            alone = plain(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(logits[start:end], alone, atol=5e-2, rtol=0)


@pytest.mark.parametrize("family", ["gpt_oss", "jamba", "mistral", "llama"])
def test_a_model_whose_masks_ignore_the_positions_is_known_to_mix_packed_documents(family):
    """With transformers' own masks (eager), a packed document's logits equal the document's alone only where the
    model builds its masks from the positions; keeps_documents_apart tells which, read from the model's source
    (gpt-oss as of transformers 5.25 does not, and training it packed is refused); a recurrent layer's state runs
    from one document into the next whatever the masks (Jamba's Mamba layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vectorlm.train.attention import keeps_documents_apart

    shape = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512}  # fmt: skip
    extra = {"gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16},
             "jamba": {"num_experts": 1, "attn_layer_offset": 1, "attn_layer_period": 2, "mamba_d_state": 4},
             "mistral": {"sliding_window": 16}, "llama": {}}[family]  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(family, **shape, **extra), attn_implementation="eager"
    )
    ids, positions = torch.randint(2, 300, (1, 40)), torch.cat([torch.arange(12), torch.arange(28)])[None]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 12:]
        alone = model(input_ids=ids[:, 12:], position_ids=positions[:, 12:], use_cache=False).logits[0]
    apart = bool(torch.allclose(packed, alone, atol=1e-5))
    assert apart == (family not in ("gpt_oss", "jamba"))  # jamba: its Mamba layers' state runs on
    assert keeps_documents_apart(type(model), model.config) == apart
