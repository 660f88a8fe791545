"""Building the model for training: on the meta device, with LoRA, the loss, activation checkpointing and compiled
blocks as configured, sharded with FSDP2, and only then filled: every rank reads just its own shards of the
safetensors weights (vectorlm/train/base_weights.py), so no rank ever holds a full copy of a 70B model in memory.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import PreTrainedModel

from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.train.attention import model_attention
from vectorlm.train.base_weights import materialize, weight_layout
from vectorlm.train.distributed import DistributedEnv, build_mesh
from vectorlm.train.lora import apply_lora
from vectorlm.train.loss import install_loss, resolve_loss

log = logging.getLogger(__name__)


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The repeated transformer blocks, found by the class names the model declares as unsplittable."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in block_classes]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)")
    return layers


def apply_fsdp(model: PreTrainedModel, mesh: DeviceMesh, *, mixed_precision: bool) -> None:
    """Shards ``model`` with FSDP2: each decoder layer is one communication unit, the rest (embeddings, final norm,
    LM head) goes with the root.

    Mixed precision keeps fp32 master weights and optimizer state, computes in bf16, and reduces gradients in fp32 so
    that summing over many ranks loses no precision.
    """
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        # The last layer's parameters are needed again at once by the backward pass: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 at least as fast as in fp32. Every GPU that trains in bf16 does; a CPU only
    with AVX-512 (oneDNN's bf16 kernels): on an AVX2-only CPU a bf16 matmul runs about 60 times slower than an fp32
    one (1.2 against 77 GFLOP/s per core, measured on the AMD EPYC that runs CI)."""
    if device.type != "cpu":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def store_frozen_in_bf16(model: nn.Module) -> None:
    """Stores the parameters that do not train (LoRA's base) in bf16, which mixed precision computes in anyway: half
    the memory of fp32 (at 70B on 8 GPUs, 17.5 GB of base per GPU instead of 35). Ties between them are kept."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad or param.dtype == torch.bfloat16:
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.to(torch.bfloat16), requires_grad=False)
            setattr(module, name, converted[id(param)])


# What selective activation checkpointing keeps, by operator name: the outputs of the matmuls and of attention
# (sdpa's kernels, flash-attn's, flex attention), which are expensive to recompute; everything else (norms, activation
# functions, rotary embeddings, casts) is recomputed in backward.
_KEPT_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward", "flex_attention",
}  # fmt: skip


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.name() in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: PreTrainedModel, mode: str) -> None:
    """Recomputes each decoder layer in backward (``full``), or all of it but its matmul and attention outputs
    (``selective``: op-level selective checkpointing). Non-reentrant ``torch.utils.checkpoint``, which FSDP2 and
    torch.compile support; the layer's forward is wrapped in place, so parameter names do not change."""
    if mode == "none":
        return
    for layer in decoder_layers(model):
        layer.forward = partial(_checkpointed, layer.forward, selective=mode == "selective")


def _checkpointed(forward, *args, selective: bool, **kwargs):
    # A function of our own rather than a partial of checkpoint itself: torch.compile skips torch.utils.checkpoint
    # when it is the frame it starts from, and would compile nothing; called from here, it traces the checkpoint
    # (and the selective policy) into the block's graph.
    context = {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)} if selective else {}
    return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)


def compile_layers(model: PreTrainedModel, *, backend: str = "inductor") -> None:
    """torch.compile of each decoder block in place (names unchanged), before sharding: one graph per block, which
    FSDP2's per-block communication wraps (torchtitan's approach). ``fullgraph``: a graph break is an error, not a
    block silently split into pieces that run between compiled fragments."""
    # Hugging Face's kernels package (a dependency of transformers >= 5.25) wraps attention modules' forward in a
    # set-and-reset of a global; under activation checkpointing dynamo refuses to trace that side effect (it would not
    # be replayed in the recomputation) and compiles nothing. Its net effect is none, so skipping its replay is
    # exact; torchtitan sets the same flag whenever it compiles.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in decoder_layers(model):
        layer.compile(backend=backend, fullgraph=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts of the full, unsharded model."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def build_model(
    model_dir: str | Path,
    env: DistributedEnv,
    *,
    train: TrainConfig,
    lora: LoraSettings,
    attention: str,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, DeviceMesh]:
    """The model sharded over this rank's mesh, base weights read from ``model_dir``, LoRA adapters (if enabled)
    initialised; returns it and the mesh."""
    model = build_empty_model(
        model_dir, attn_implementation=model_attention(attention), trust_remote_code=trust_remote_code
    )
    plain, layout = model, weight_layout(model, model_dir)
    adapters = None
    if lora.enabled:
        model, adapters = apply_lora(model, lora, seed=train.seed)
        if train.mixed_precision:
            store_frozen_in_bf16(model)
    loss = install_loss(model, resolve_loss(train.loss, env.device), compile=train.compile)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    if train.compile:
        compile_layers(model)
    log.info("loss %s, activation checkpointing %s, %s", loss, train.activation_checkpointing,
             "decoder blocks and loss compiled" if train.compile else "not compiled")  # fmt: skip
    mesh = build_mesh(env, train.sharding)
    apply_fsdp(model, mesh, mixed_precision=train.mixed_precision)
    start = time.monotonic()
    log.info("reading this rank's shards of the weights of %s", model_dir)
    materialize(model, model_dir, env.device, layout=layout, group=env.checkpoint_group, converting_model=plain)
    log.info("weights read in %.1f s", time.monotonic() - start)
    if adapters is not None:  # scatter the adapters' initial values (drawn once, on CPU) to the shards
        set_model_state_dict(model, adapters, options=StateDictOptions(full_state_dict=True, strict=False))
    return model, mesh
