"""LoRA with peft under FSDP2: the adapter wraps the meta-device model before it is sharded.

Only the adapter trains; the frozen base weights are read from the base model's files on every start, and
checkpoints hold the adapter and its optimizer state only. The adapter's initial values are drawn on CPU with the
run's seed (the same on every rank, whatever the number of ranks) and then scattered to the shards.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from vectorlm.config import ConfigError, LoraSettings

ADAPTER = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")


def peft_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
    )


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``lora.target_modules`` can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, settings: LoraSettings) -> None:
    """A ConfigError naming every target that matches no module, with the linear layers there are."""
    if settings.target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {', '.join(map(repr, missing))} match no module of the model; its linear layers "
            f"are: {', '.join(linear_layer_names(model))} (or use all-linear)"
        )


def apply_lora(model: PreTrainedModel, settings: LoraSettings, *, seed: int) -> tuple[PeftModel, dict]:
    """Wraps the (meta-device) ``model`` with LoRA adapters; returns it and the adapters' initial values (CPU)."""
    check_targets(model, settings)
    peft_model = get_peft_model(model, peft_config(settings))
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    initial = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            module.lora_A[ADAPTER].to_empty(device="cpu")
            module.lora_B[ADAPTER].to_empty(device="cpu")
            module.reset_lora_parameters(ADAPTER, init_lora_weights=True)
            for part in ("lora_A", "lora_B"):
                weight = getattr(module, part)[ADAPTER].weight
                initial[f"{module_name}.{part}.{ADAPTER}.weight"] = weight.detach().clone()
                getattr(module, part)[ADAPTER].to("meta")  # sharded like the rest, filled after materialising
    torch.set_rng_state(generator_state)
    return peft_model, initial


def base_weight_name(name: str) -> str | None:
    """The name a parameter of the (possibly peft-wrapped) model has in the base model's files; None for adapters."""
    if ".lora_" in name:
        return None
    return re.sub(r"\.base_layer(?=\.)", "", name.removeprefix("base_model.model."))


def save_adapter(peft_model: PeftModel, tensors: dict[str, torch.Tensor], output_dir: Path, *, base: str) -> None:
    """Writes trained adapter ``tensors`` (named as in ``peft_model``) as peft's save_pretrained would:
    ``adapter_model.safetensors`` and ``adapter_config.json``, loadable with ``PeftModel.from_pretrained``."""
    state = get_peft_model_state_dict(peft_model, state_dict=tensors, adapter_name=ADAPTER)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output_dir / ADAPTER_WEIGHTS), {"format": "pt"})
    config = peft_model.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    config.save_pretrained(str(output_dir))
