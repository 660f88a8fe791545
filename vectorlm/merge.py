"""A LoRA adapter merged into its base model's weights, one tensor at a time.

Each base weight is read from the base model's safetensors files, the adapter's update (peft's own
``get_delta_weight``, so every layer type and option peft supports is computed as peft computes it) is added in
fp32, and the sum is cast once to the export dtype and streamed into the output shards. Peak memory is about one
base tensor plus the adapter, whatever the size of the model; the result equals peft's ``merge_and_unload`` in fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from vectorlm.lora import ADAPTER, ADAPTER_WEIGHTS, base_weight_name
from vectorlm.model import build_empty_model
from vectorlm.shards import read_tensors, tensor_shapes, weight_files, write_sharded

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
            token rows), or adapts a weight that the
            base model's files do not hold under the model's name for it.
    """
    model_dir, adapter_dir, output_dir = Path(model_dir), Path(adapter_dir), Path(output_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    unsupported = {"use_dora": config.use_dora, "lora_bias": getattr(config, "lora_bias", False),
                   "modules_to_save": config.modules_to_save,
                   "trainable_token_indices": getattr(config, "trainable_token_indices", None)}  # fmt: skip
    if used := [name for name, value in unsupported.items() if value]:
        raise ValueError(f"{adapter_dir}: adapters with {', '.join(used)} change more than W + BA; they are not merged "
                         "weight by weight here")  # fmt: skip
    peft_model = get_peft_model(build_empty_model(model_dir, attention="eager", trust_remote_code=trust_remote_code),
                                config)  # fmt: skip
    adapted = {
        base_weight_name(f"{name}.base_layer.weight"): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }
    for module in adapted.values():  # the adapters' own tensors in CPU memory (the base stays on the meta device)
        for layer_name in module.adapter_layer_names:
            getattr(module, layer_name).to_empty(device="cpu")
    adapter = {k: v.float() for k, v in load_file(adapter_dir / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(peft_model, adapter, adapter_name=ADAPTER)
    del adapter  # copied into the model's adapter layers
    missing = [key for key in result.missing_keys if ".lora_" in key]
    if result.unexpected_keys or missing:
        raise ValueError(f"{adapter_dir}: the adapter does not fit {model_dir} (unexpected: "
                         f"{result.unexpected_keys[:3]}, missing: {missing[:3]})")  # fmt: skip
    files = weight_files(model_dir)
    if absent := [name for name in adapted if name not in files]:
        raise ValueError(f"{model_dir}: the adapter changes {absent[:3]}, which its safetensors files do not hold "
                         "under these names; cannot merge")  # fmt: skip
    shapes = tensor_shapes(files)

    def load(group: list[str]) -> dict[str, torch.Tensor]:
        tensors = read_tensors(files, group)
        with torch.no_grad():
            for name in group:
                if name in adapted:
                    tensors[name] = tensors[name].float() + adapted[name].get_delta_weight(ADAPTER).float()
        return tensors

    write_sharded(output_dir, shapes, dtype=dtype, load=load, max_shard_bytes=max_shard_bytes)
    log.info("merged the adapter into %d of %d weights of %s", len(adapted), len(shapes), model_dir)
