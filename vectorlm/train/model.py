"""Building the model for training: on the meta device, with LoRA, the loss, activation checkpointing and compiled
blocks as configured, sharded with FSDP2, and only then filled: every rank reads just its own shards of the
safetensors weights (vectorlm/train/base_weights.py), so no rank ever holds a full copy of a 70B model in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel

from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.train.activation_checkpointing import apply_activation_checkpointing
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
    """Shards ``model`` with FSDP2: each decoder layer is one communication unit; so are the input embeddings and the
    LM head when they are not tied (torchtitan's units), so that the head's gradient (vocabulary x hidden: 1 GB in
    fp32 at 1B with 128k tokens) is reduce-scattered while the blocks' backward runs, not after it; the rest (the
    final norm, a tied embedding) goes with the root.

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
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        # The embeddings are needed again only at the end of the backward pass (prefetched then); the head at once.
        fully_shard(embeddings, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(head, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 at least as fast as in fp32. Every GPU that trains in bf16 does; a CPU only
    with AVX-512 (oneDNN's bf16 kernels): on an AVX2-only CPU a bf16 matmul runs about 60 times slower than an fp32
    one (1.2 against 77 GFLOP/s per core, measured on the AMD EPYC that runs CI)."""
    if device.type != "cpu":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def disable_dropout(model: nn.Module) -> None:
    """Turns every dropout of ``model`` off: its ``nn.Dropout`` modules (LoRA's too) and the rates attention layers
    read from attributes (``attention_dropout``). Preference tuning compares the policy's log-probabilities with the
    reference's, computed without dropout: with it, they would be noisy and biased against the reference (TRL's
    ``disable_dropout``, on by default)."""
    turned_off = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p, turned_off = 0.0, turned_off + 1
        for name, value in list(vars(module).items()):
            if re.search(r"dropout|pdrop", name) and isinstance(value, float) and value:
                setattr(module, name, 0.0)
                turned_off += 1
    if turned_off:
        log.info("train.objective dpo: %d dropout rates set to 0, as the reference's log-probabilities have none",
                 turned_off)  # fmt: skip


def computed_settings(cfg: TrainConfig, env: DistributedEnv) -> TrainConfig:
    """The settings the model is built with: mixed precision computes in fp32 when some rank's CPU has no native bf16
    (on which bf16 runs about 60x slower); the recorded settings stay the configured ones, so a checkpoint resumes on
    either kind of machine."""
    if not cfg.mixed_precision or env.device.type != "cpu":
        return cfg
    native = torch.tensor([int(computes_bf16_natively(env.device))])
    if dist.is_initialized():  # every rank computes in one dtype
        dist.all_reduce(native, op=dist.ReduceOp.MIN, group=env.cpu_group)
    if native.item():
        return cfg
    if env.is_main:
        log.warning("train.mixed_precision: this CPU has no native bf16 arithmetic (AVX-512), on which bf16 runs "
                    "about 60x slower than fp32; computing in fp32")  # fmt: skip
    return dataclasses.replace(cfg, mixed_precision=False)


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


def compile_layers(model: PreTrainedModel, *, backend: str = "inductor") -> None:
    """torch.compile of each decoder block in place (names unchanged), before sharding: one graph per block, which
    FSDP2's per-block communication wraps (torchtitan's approach). ``fullgraph``: a graph break is an error, not a
    block silently split into pieces that run between compiled fragments."""
    # A forward that sets a global and resets it (transformers' output capturing, for one) has no net effect, but
    # under activation checkpointing dynamo refuses to trace it (it would not be replayed in the recomputation) and
    # compiles nothing; skipping the replay is exact. torchtitan sets the same flag whenever it compiles.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in decoder_layers(model):
        for module in layer.modules():
            _skip_kernels_routing(module)
        layer.compile(backend=backend, fullgraph=True)


def _skip_kernels_routing(module: nn.Module) -> None:
    """Calls the module's own forward, not the wrapper of Hugging Face's kernels package (a dependency of transformers
    >= 5.25) around attention modules: it routes functions such as the rotary embedding to hub kernels that
    ``kernels.kernelize`` may install (we never do; unrouted, they run as written) through a global it sets and
    resets in every call, on which dynamo guards: with flex attention the global was left set after the first
    compiled call, and every block was compiled twice."""
    forward = type(module).forward
    wrapped = getattr(forward, "__wrapped__", None)
    if "forward" in vars(module):  # already replaced (activation checkpointing): left as it is
        return
    if wrapped is not None and Path(forward.__code__.co_filename).parts[-4:-1] == ("kernels", "_internals", "layer"):
        module.forward = wrapped.__get__(module)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts of the full, unsharded model."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def shard_for_training(
    model: PreTrainedModel, mesh: DeviceMesh, *, train: TrainConfig, lora: LoraSettings, device: torch.device
) -> tuple[nn.Module, dict | None]:
    """The empty (meta-device) ``model`` made what every training step runs: LoRA adapters (if enabled), the loss,
    activation checkpointing and compiled blocks as configured, sharded with FSDP2 over ``mesh``. Returns it and the
    adapters' initial values (None without LoRA). Training fills it with weights; the estimate
    (vectorlm/estimate/memory.py) traces a step of it on fake tensors."""
    adapters = None
    if lora.enabled:
        model, adapters = apply_lora(model, lora, seed=train.seed)
        if train.mixed_precision:
            store_frozen_in_bf16(model)
    if train.objective == "dpo":
        disable_dropout(model)
    loss = install_loss(model, resolve_loss(train.loss, device), compile=train.compile,
                        per_token=train.objective == "dpo")  # fmt: skip
    apply_activation_checkpointing(decoder_layers(model), train.activation_checkpointing)
    if train.compile:
        compile_layers(model)
    log.info("loss %s, activation checkpointing %s, %s", loss, train.activation_checkpointing,
             "decoder blocks and loss compiled" if train.compile else "not compiled")  # fmt: skip
    apply_fsdp(model, mesh, mixed_precision=train.mixed_precision)
    return model, adapters


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
    mesh = build_mesh(env, train.sharding)
    model, adapters = shard_for_training(model, mesh, train=train, lora=lora, device=env.device)
    start = time.monotonic()
    log.info("reading this rank's shards of the weights of %s", model_dir)
    materialize(model, model_dir, env.device, layout=layout, group=env.checkpoint_group, converting_model=plain)
    log.info("weights read in %.1f s", time.monotonic() - start)
    if adapters is not None:  # scatter the adapters' initial values (drawn once, on CPU) to the shards
        set_model_state_dict(model, adapters, options=StateDictOptions(full_state_dict=True, strict=False))
    return model, mesh
