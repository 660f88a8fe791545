"""The model a Hugging Face directory's config describes, built on the meta device (nothing of its weights is read),
and what training and export need to know of it: its class, its parameters' names and shapes, its tied weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

log = logging.getLogger(__name__)


def causal_lm_class(model_dir: str | Path, *, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    """The class AutoModelForCausalLM builds for the model in ``model_dir`` (remote code included when trusted)."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(model_dir))
    return AutoModelForCausalLM._model_mapping[type(config)]


def build_empty_model(
    model_dir: str | Path, *, attn_implementation: str = "eager", trust_remote_code: bool = False, **overrides
) -> PreTrainedModel:
    """The model ``model_dir``'s config describes, as training builds it, with its parameters on the meta device (no
    weights read) and its buffers (e.g. rotary frequencies) computed on CPU; ``overrides`` replace config values."""
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code, **overrides)
    # A KV cache makes transformers ignore per-document position_ids, so packed documents would attend to each other.
    config.use_cache = False
    if getattr(config, "output_router_logits", False):
        # transformers adds the router's load-balancing loss, scaled for a mean loss, to the summed loss of
        # vectorlm.train.loss: it would count 1 / (loss tokens) as much as configured and inflate the logged loss.
        log.warning("model %s: the router's load-balancing loss (output_router_logits) is not applied", model_dir)
        config.output_router_logits = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            dtype=torch.float32,
        )
    # init_empty_weights re-registers every parameter on the meta device, which unties tied embeddings.
    model.tie_weights()
    return model


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names under which an already-listed parameter appears again (e.g. ``lm_head.weight`` tied to embeddings)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of the model's state dict in order, without the duplicates of tied weights."""
    tied = tied_parameter_names(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
