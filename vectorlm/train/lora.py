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
from transformers.pytorch_utils import Conv1D

from vectorlm.config import ConfigError, LoraSettings

try:  # peft >= 0.19; older versions do not know the fused experts of transformers 5
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
except ImportError:  # pragma: no cover
    convert_peft_config_for_transformers = None

ADAPTER = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")


def peft_config(settings: LoraSettings, model: nn.Module | None = None) -> LoraConfig:
    """peft's config for ``settings``. With ``model``, names in ``lora.target_modules`` that are parameters rather
    than modules (the fused experts of transformers 5: ``gate_up_proj``, ``down_proj``) go to peft's
    ``target_parameters``, which is how peft adapts them."""
    modules, parameters = settings.target_modules, None
    if model is not None and modules != "all-linear":
        names = [name for name, _ in model.named_modules()]
        params = [name for name, _ in model.named_parameters()]
        fused = [name for name, p in model.named_parameters() if p.dim() == 3]  # experts x out x in
        parameters = [t for t in modules if _matches(t, fused) or (not _matches(t, names) and _matches(t, params))]
        modules = [t for t in modules if _matches(t, names) or t not in parameters] or None
        parameters = parameters or None
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=modules,
        target_parameters=parameters,
    )


def wanted_layers(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """The linear layers and fused expert parameters that ``lora.target_modules`` names (for ``all-linear``: every
    linear layer but the output head), by their full names."""
    output = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D) and m is not output]
    if settings.target_modules == "all-linear":
        return linear
    fused = [name for name, p in model.named_parameters() if p.dim() == 3]
    return [name for name in linear + fused if any(_matches(t, [name]) for t in settings.target_modules)]


def adapted_weights(peft_model: PeftModel) -> set[str]:
    """The full names (in the plain model) of the layers and parameters that got adapters."""
    adapted = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            base = re.sub(r"\.base_layer(?=\.|$)", "", name.removeprefix("base_model.model."))
            adapted.add(f"{base}.{module.parameter_name}" if hasattr(module, "parameter_name") else base)
    return adapted


def _matches(target: str, names: list[str]) -> bool:
    return any(n == target or n.endswith("." + target) for n in names)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``lora.target_modules`` can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: PreTrainedModel, settings: LoraSettings) -> None:
    """A ConfigError naming every target that matches no module or parameter (after peft's own translation of the
    names of older checkpoints, e.g. Mixtral's ``w1``), with what there is; or naming ``lora.dropout`` when peft
    would adapt parameters (fused experts, routers), for which it has no dropout."""
    config = peft_config(settings, model)
    if convert_peft_config_for_transformers is not None:  # in place, as get_peft_model does to its copy
        try:
            convert_peft_config_for_transformers(config, model, None)
        except ValueError as error:  # e.g. Mixtral's w1 without w3, which peft fuses into one parameter
            raise ConfigError(f"lora.target_modules: {error}") from error
    parameters = sorted(config.target_parameters or [])
    if settings.target_modules != "all-linear":
        names = [name for name, _ in model.named_modules()] + [name for name, _ in model.named_parameters()]
        wanted = [*(config.target_modules or []), *parameters]
        unmatched = {t for t in wanted if not _matches(t, names)}
        if missing := [t for t in settings.target_modules if t in unmatched]:
            experts = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() == 3})
            raise ConfigError(
                f"lora.target_modules: {', '.join(map(repr, missing))} match no module of the model; its linear "
                f"layers are: {', '.join(linear_layer_names(model))}"
                + (f"; its expert parameters: {', '.join(experts)}" if experts else "")
                + " (or use all-linear)"
            )
    if parameters and settings.dropout:
        raise ConfigError(
            f"lora.dropout: {settings.dropout} with lora.target_modules {settings.target_modules!r}, which in "
            f"{type(model).__name__} adapts the parameters {', '.join(parameters)} (fused experts or routers); peft "
            "has no dropout for LoRA on parameters: set lora.dropout: 0.0, or name only linear layers"
        )


def apply_lora(model: PreTrainedModel, settings: LoraSettings, *, seed: int) -> tuple[PeftModel, dict]:
    """Wraps the (meta-device) ``model`` with LoRA adapters; returns it and the adapters' initial values (CPU)."""
    check_targets(model, settings)
    wanted = wanted_layers(model, settings)
    peft_model = get_peft_model(model, peft_config(settings, model))
    adapted = adapted_weights(peft_model)  # once: a walk over every module (25 s at 70B were it done per layer)
    if missed := [name for name in wanted if name not in adapted]:
        raise ConfigError(
            f"lora.target_modules: peft adapts none of {', '.join(missed[:3])} ({len(missed)} in all), which "
            f"{settings.target_modules!r} names in {type(model).__name__}: for this architecture peft translates these "
            "names (those of the per-expert layers of older checkpoints) to the fused experts; layers of the same name "
            "outside the experts (dense layers, shared experts) cannot get adapters here"
        )
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
