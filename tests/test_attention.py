"""Attention over packed rows: documents kept apart without transformers' per-forward search of the positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers.masking_utils
from transformers import AutoModelForCausalLM, MistralConfig

from tests.conftest import requires_gpu
from vectorlm.attention import document_mask_kwargs, resolve_attention
from vectorlm.config import ConfigError
from vectorlm.data.loader import collate
from vectorlm.step import forward_logits

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

    from vectorlm.attention import FLASH_VARLEN

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
