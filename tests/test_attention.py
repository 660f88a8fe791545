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
