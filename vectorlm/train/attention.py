"""Attention over packed rows: each document attends only to itself, and the host never waits for the GPU.

Given ``position_ids`` that restart at 0 for each document, transformers finds the documents itself, but it does so
in every forward with a Python test on a device tensor (a device-to-host sync), and for flash-attn it derives
``cu_seq_lens`` from the positions in every layer. Here the documents are described once per micro-batch instead:

- ``flash_attention_2``: the cumulative document lengths are computed on the CPU when collating, and a varlen
  flash-attn call of our own (:func:`flash_varlen_attention`, registered with transformers) uses them; transformers
  builds no mask at all for it.
- ``flex_attention``: a block-sparse document mask (``BlockMask``) built on the device from the positions by a
  compiled ``create_block_mask``: nothing of size L x L.
- ``sdpa``: a dense boolean L x L document mask per row, built on the device (the same mask transformers would
  build, without its sync). On a GPU this is the fallback, with a warning that states its cost.
- ``eager``, and any model with sliding-window or chunked-attention layers: transformers' own path, which knows
  each layer's window.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
from typing import Any

import torch
from transformers import AttentionInterface, AutoConfig, PretrainedConfig

from vectorlm.config import ConfigError
from vectorlm.hub.meta_model import causal_lm_class

log = logging.getLogger(__name__)

# Our varlen flash-attn function's name in transformers' registry. Not "flash" in it: transformers takes any such name
# for a flash-attn kernel to load and fails to find one.
FLASH_VARLEN = "vectorlm_varlen"


def flash_varlen_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
                           cu_seq_lens: torch.Tensor | None = None, max_length: int | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """flash-attn over the documents of one flattened row (batch size 1), delimited by ``cu_seq_lens``; without
    them (a plain forward, e.g. of one document), each row is one sequence."""
    from flash_attn import flash_attn_varlen_func

    if cu_seq_lens is None:
        rows, length = query.shape[0], query.shape[2]
        cu_seq_lens = torch.arange(0, (rows + 1) * length, length, dtype=torch.int32, device=query.device)
        max_length = length

    if kwargs.get("s_aux") is not None or not getattr(module, "is_causal", True):
        raise NotImplementedError("train.attention: flash_attention_2 here handles causal attention without sinks; "
                                  "choose another attention this model supports")  # fmt: skip
    window = getattr(module, "sliding_window", None) or kwargs.get("sliding_window")
    dtype = query.dtype
    if dtype == torch.float32:  # flash-attn computes in bf16 or fp16 only (train.mixed_precision: false)
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    q, k, v = (t.transpose(1, 2).flatten(0, 1) for t in (query, key, value))  # (tokens, heads, head_dim)
    out = flash_attn_varlen_func(
        q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, dropout_p=dropout if module.training else 0.0,
        softmax_scale=scaling, causal=True, window_size=(window - 1, 0) if window else (-1, -1),
        softcap=kwargs.get("softcap") or 0.0,
    )  # fmt: skip
    return out.view(query.shape[0], -1, *out.shape[-2:]).to(dtype), None


AttentionInterface.register(FLASH_VARLEN, flash_varlen_attention)


def all_layers_attend_fully(config: PretrainedConfig) -> bool:
    """Whether every layer attends causally to the whole row: no sliding windows (Mistral, Gemma-2/3, Qwen2 with
    them on) and no chunked attention (Llama 4), whose per-layer masks transformers must build itself."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return all(getattr(config, key, None) is None for key in ("sliding_window", "attention_chunk_size"))


# What auto prefers on a GPU, best first; every one keeps packed documents apart (tests/data/test_pack.py).
PREFERENCE = ("flash_attention_2", "flex_attention", "sdpa", "eager")


def supported_attention(model_class: type) -> tuple[str, ...]:
    """The implementations of :data:`PREFERENCE` that ``model_class`` supports, as transformers declares them (Gemma-2
    refuses sdpa, GPT-2 flex attention). Our flash-attn path is a function registered with transformers, which a model
    calls only when it routes attention through that registry (``_supports_attention_backend``)."""
    flags = {
        "flash_attention_2": model_class._supports_flash_attn
        and model_class._supports_attention_backend
        and not _has_attention_sinks(model_class),
        "flex_attention": model_class._supports_flex_attn,
        "sdpa": model_class._supports_sdpa,
        "eager": True,
    }
    return tuple(name for name in PREFERENCE if flags[name])


def _has_attention_sinks(model_class: type) -> bool:
    """Whether the model's attention passes learned sinks (``s_aux``: gpt-oss), which transformers' flash-attn path
    supports and ours does not; read from the source of the model's module, as the model declares nothing of it."""
    return "s_aux=" in _module_source(model_class)


def _module_source(model_class: type) -> str:
    """The source of the module that defines ``model_class`` (its attention, masks and layers)."""
    return inspect.getsource(sys.modules[model_class.__module__])


def resolve_attention(requested: str, device: torch.device, *, supported: tuple[str, ...] = PREFERENCE,
                      model_name: str = "the model") -> str:  # fmt: skip
    """The attention to use for ``train.attention``: ``auto`` is the first of :data:`PREFERENCE` that ``supported``
    holds and the machine can run (flash-attn on a GPU where it is installed, flex attention on a GPU, sdpa, eager). An
    explicit choice that ``model_name`` does not support is an error naming the ones it does."""
    has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    runnable = {"flash_attention_2": has_flash, "flex_attention": device.type == "cuda", "sdpa": True, "eager": True}
    if requested == "auto":
        return next(name for name in supported if runnable[name])
    if requested not in supported:
        raise ConfigError(unsupported_attention(requested, model_name, supported))
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError("train.attention: flash_attention_2 needs a CUDA GPU and the flash-attn package")
    if requested == "sdpa" and device.type == "cuda":
        log.warning("train.attention: sdpa on a GPU isolates packed documents with a dense boolean mask of "
                    "micro_batch_size x max_seq_len^2 bytes per forward (64 MB at 4 x 4096), which also keeps sdpa "
                    "off its flash kernel; flex_attention (or flash_attention_2) does not")  # fmt: skip
    return requested


def unsupported_attention(requested: str, model_name: str, supported: tuple[str, ...] | list[str]) -> str:
    return (f"train.attention: {model_name} does not support {requested}; it supports {', '.join(supported)} "
            "(or auto, which picks among them)")  # fmt: skip


def model_attention(attention: str) -> str:
    """The name the model is built with: our varlen function in place of transformers' flash-attn path."""
    return FLASH_VARLEN if attention == "flash_attention_2" else attention


def keeps_documents_apart(model_class: type, config: PretrainedConfig) -> bool:
    """Whether packed documents stay apart in a forward of ``model_class`` built with ``config``: by our own document
    boundaries or masks (:func:`document_mask_kwargs`), else by transformers' masks, which follow the restarting
    ``position_ids`` only where the model's forward passes them to its mask functions (gpt-oss's does not, as of
    transformers 5.25: its packed documents would attend to each other). Read from the model's source, and False
    when in doubt: layers with a recurrent state (Mamba, linear attention: Jamba, Bamba, Qwen3-Next) carry it from one
    document into the next whatever the masks, and a model whose mask calls are not recognised is not trusted."""
    source = _module_source(model_class)
    recurrent = r"mamba|selective_scan|causal_conv1d|linear_attention|gated_delta|rwkv|recurrent"
    if re.search(recurrent, source, re.IGNORECASE):
        return False
    attention = config._attn_implementation
    if attention == FLASH_VARLEN or (attention in ("sdpa", "flex_attention") and all_layers_attend_fully(config)):
        return True
    mask_calls = re.findall(r"mask_kwargs = \{(.*?)\n\s*\}", source, re.DOTALL) + re.findall(
        r"(?:create_causal_mask|create_sliding_window_causal_mask|create_chunked_causal_mask|mask_function)\((.*?)\)",
        source, re.DOTALL,
    )  # fmt: skip
    mask_calls = [call for call in mask_calls if "config" in call]
    return bool(mask_calls) and all("position_ids" in call for call in mask_calls)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which document each token belongs to, per row: positions restart at 0 with each document."""
    return (position_ids == 0).cumsum(-1)


def model_and_attention(model_dir, requested: str, device: torch.device, *, trust_remote_code: bool = False):
    """The model class of ``model_dir``, the attention it will run (:func:`resolve_attention` of ``requested``) and its
    config set to it, read without any weight: what is checked before a stage builds the model."""
    model_class = causal_lm_class(model_dir, trust_remote_code=trust_remote_code)
    attention = resolve_attention(requested, device, supported=supported_attention(model_class),
                                  model_name=model_class.__name__)  # fmt: skip
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config._attn_implementation = model_attention(attention)
    return model_class, attention, config


def check_pairs_apart(model_class: type, config: PretrainedConfig, attention: str) -> None:
    """Preference pairs share a row (their loss needs both): a model whose packed documents would see each other
    (:func:`keeps_documents_apart`) cannot train on them, even with ``data.packing: false``. Raises a ConfigError."""
    if not keeps_documents_apart(model_class, config):
        raise ConfigError(f"train.objective dpo: {model_class.__name__} with attention {attention} would let the two "
                          "sequences of a preference pair, which share a row, see each other (its attention masks "
                          "ignore the positions that mark them, or its layers carry a recurrent state from one into the "
                          "next); preference tuning does not support this model")  # fmt: skip


def document_mask_kwargs(config: PretrainedConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """What the forward of a model built with ``config`` needs, besides ``position_ids``, to keep the batch's
    documents apart."""
    attention = config._attn_implementation
    if attention == FLASH_VARLEN:
        # The number of documents changes from batch to batch: one graph with it symbolic, instead of one per count.
        torch._dynamo.maybe_mark_dynamic(batch["cu_seq_lens"], 0)
        return {"cu_seq_lens": batch["cu_seq_lens"], "max_length": batch["max_length"]}
    if attention not in ("sdpa", "flex_attention") or not all_layers_attend_fully(config):
        return {}
    docs = document_ids(batch["position_ids"])
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (docs[b, q] == docs[b, kv]) & (kv <= q)

        rows, length = docs.shape
        # Compiled on a GPU: the eager version evaluates the mask at every (query, key) pair, L x L at once.
        return {"attention_mask": create_block_mask(same_document_causal, rows, None, length, length,
                                                    device=docs.device, _compile=docs.is_cuda)}  # fmt: skip
    causal = torch.ones(docs.shape[1], docs.shape[1], dtype=torch.bool, device=docs.device).tril()
    return {"attention_mask": ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]}
