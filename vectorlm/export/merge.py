"""A LoRA adapter merged into its base model's weights, one tensor at a time.

Each base weight is read from the base model's safetensors files, the adapter's update (peft's own
``get_delta_weight``, so every layer type and option peft supports is computed as peft computes it) is added in
fp32, and the sum is cast once to the export dtype and streamed into the output shards, in the base files' own layout
(a fused mixture-of-experts parameter's update is cut into the files' per-expert tensors, :mod:`vectorlm.hub.layout`).
Peak memory is about one base parameter's update plus the adapter: one weight matrix for dense models, but all of a
layer's experts for fused mixture-of-experts parameters (30 GB in fp32 for a DeepSeek-V3 layer's ``gate_up_proj``).
The result equals peft's ``merge_and_unload`` in fp32.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from vectorlm.hub.layout import by_key, file_layout, piece_of
from vectorlm.hub.meta_model import build_empty_model, parameter_shapes
from vectorlm.hub.shards import read_tensors, tensor_shapes, weight_files, write_sharded
from vectorlm.train.lora import ADAPTER, ADAPTER_WEIGHTS, base_weight_name

log = logging.getLogger(__name__)


def merge_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int,
    trust_remote_code: bool = False,
) -> None:
    """Writes the base model's weights with the adapter merged in, as safetensors shards in ``dtype``.

    Raises:
        ValueError: when the adapter uses what cannot be merged weight by weight (DoRA, biases, modules to save, trained
            token rows), or adapts a weight that transformers converts from the files by more than stacking or
            concatenating.
    """
    model_dir, adapter_dir, output_dir = Path(model_dir), Path(adapter_dir), Path(output_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    unsupported = {"use_dora": config.use_dora, "lora_bias": getattr(config, "lora_bias", False),
                   "modules_to_save": config.modules_to_save,
                   "trainable_token_indices": getattr(config, "trainable_token_indices", None)}  # fmt: skip
    if used := [name for name, value in unsupported.items() if value]:
        raise ValueError(f"{adapter_dir}: adapters with {', '.join(used)} change more than W + BA; they are not merged "
                         "weight by weight here")  # fmt: skip
    model = build_empty_model(model_dir, trust_remote_code=trust_remote_code)
    files = weight_files(model_dir)
    shapes = tensor_shapes(files)
    layout = file_layout(model, shapes, parameter_shapes(model))
    peft_model = get_peft_model(model, config)
    adapted = {  # base weight name -> its LoRA layer (a Linear's weight, or a parameter peft wraps: fused experts)
        base_weight_name(f"{name}.{getattr(module, 'parameter_name', 'weight')}"): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    if converted := [t for group in layout.converted for t in group.targets if t in adapted]:
        raise ValueError(f"{model_dir}: the adapter changes {converted[:3]}, which transformers converts from its "
                         "files by more than stacking or concatenating; cannot merge tensor by tensor")  # fmt: skip
    if absent := [name for name in adapted if name not in layout.pieces]:  # e.g. an LM head tied to the embeddings
        raise ValueError(f"{model_dir}: the adapter changes {absent[:3]}, which its safetensors files do not hold "
                         "(a weight tied to another); cannot merge")  # fmt: skip
    for module in adapted.values():  # the adapters' own tensors in CPU memory (the base stays on the meta device)
        for layer_name in module.adapter_layer_names:
            getattr(module, layer_name).to_empty(device="cpu")
        if hasattr(module, "parameter_name"):  # peft's ParamWrapper moves the update to its parameter's device:
            base = module.get_base_layer()  # an empty one on the CPU (never written, so it takes no memory)
            param = getattr(base, module.parameter_name)
            setattr(
                base, module.parameter_name, nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False)
            )
    adapter = {k: v.float() for k, v in load_file(adapter_dir / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(peft_model, adapter, adapter_name=ADAPTER)
    del adapter  # copied into the model's adapter layers
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{adapter_dir}: the adapter does not fit {model_dir} (unexpected: "
                         f"{result.unexpected_keys[:3]}, missing: {missing[:3]})")  # fmt: skip
    pieces = by_key(layout.pieces)
    # The files' tensors in the parameters' order, so that the pieces of one (fused) parameter come one after another
    # and its update is computed once; then what the model does not read, as it is.
    read = set(layout.file_keys)
    order = layout.file_keys + [key for key in shapes if key not in read]

    @functools.lru_cache(maxsize=1)
    def delta(name: str) -> torch.Tensor:
        return adapted[name].get_delta_weight(ADAPTER).float()

    def load(group: list[str]) -> dict[str, torch.Tensor]:
        tensors = read_tensors(files, group)
        with torch.no_grad():
            for key in group:
                if key in pieces and pieces[key][0] in adapted:
                    name, piece = pieces[key]
                    tensors[key] = tensors[key].float() + piece_of(delta(name), piece)
        return tensors

    write_sharded(
        output_dir, {key: shapes[key] for key in order}, dtype=dtype, load=load, max_shard_bytes=max_shard_bytes
    )
    log.info("merged the adapter into %d of %d weights of %s", len(adapted), len(shapes), model_dir)
