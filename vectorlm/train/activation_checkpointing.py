"""Activation checkpointing of the decoder layers: ``full`` recomputes a whole layer in backward, ``selective``
keeps the outputs of the operations that are costly to recompute and recomputes the rest (torchtitan's policy):

- attention's outputs (sdpa's kernels, flash-attn's, flex attention): recomputing attention costs more than its
  output (one hidden state and a logsumexp per token and head) occupies;
- every other matmul of the layer, counted in the order the layer runs them (the 1st, 3rd, ...; Llama: q, v, gate,
  down kept, k, o, up recomputed). At Llama-3.1-8B's layer this keeps 62 KiB per token instead of the 100 KiB of
  keeping every matmul (this policy's predecessor) and the 204 KiB of keeping everything, for about 10% more step
  compute (bench/results/2026-12-04-activation-memory-cpu.md);
- what a mixture-of-experts layer's routing needs: the router's logits, from which the recomputation derives the
  same experts (softmax and top-k run again on identical inputs; top-k's output itself cannot be kept, as
  transformers normalises the routing weights in place, which a kept tensor must not undergo), and copies to the
  host (token counts);
- the outputs of collectives and of ``max`` (float8's scaling factors), cheaper to keep than to redo.

LoRA's adapter matmuls are left out of the count and recomputed: they are cheap, and keeping the base projection's
output and the adapter's beside it would keep two tensors where one is needed.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CHECKPOINTING_MODES = ("none", "full", "selective")

# Kept whatever their position, by operator name (names, not operator objects: flash-attn's need not be installed).
_KEPT_OPS = frozenset({
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable", "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward", "flex_attention",
    "aten::max",  # the whole-tensor reduction: float8's amax
    "_c10d_functional::reduce_scatter_tensor", "_c10d_functional::all_to_all_single",
})  # fmt: skip
# Matmuls, of which every other one is kept. ``bmm`` is not one of them and is always recomputed: in our models it is
# eager attention's (its first output is the L x L scores) or a batched experts implementation's.
_MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::linear", "aten::_scaled_mm", "aten::_grouped_mm",
                         "transformers::grouped_mm_fallback"})  # fmt: skip


def apply_activation_checkpointing(layers: list[nn.Module], mode: str) -> None:
    """Recomputes each of the decoder ``layers`` in backward (``full``), or all of it but attention's outputs, every
    other matmul's and what routing needs (``selective``). Non-reentrant ``torch.utils.checkpoint``, which FSDP2 and
    torch.compile support; each layer's forward is wrapped in place, so parameter names do not change."""
    assert mode in CHECKPOINTING_MODES, mode  # the config's schema lists the modes
    if mode == "none":
        return
    for layer in layers:
        context_fn = selective_context_fn(layer) if mode == "selective" else None
        layer.forward = partial(_checkpointed, layer.forward, context_fn=context_fn)


def _checkpointed(forward, *args, context_fn, **kwargs):
    # A function of our own rather than a partial of checkpoint itself: torch.compile skips torch.utils.checkpoint
    # when it is the frame it starts from, and would compile nothing; called from here, it traces the checkpoint
    # (and the selective policy, which it calls while tracing, not in the compiled code) into the block's graph.
    context = {} if context_fn is None else {"context_fn": context_fn}
    return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)


def selective_context_fn(layer: nn.Module):
    """The ``context_fn`` of ``torch.utils.checkpoint`` that applies the selective policy to ``layer``: called once
    per forward of the layer, it starts a fresh count of the matmuls."""
    routers = _right_operand_shapes(layer, lambda name, module: "router" in type(module).__name__.lower())
    adapters = _right_operand_shapes(layer, lambda name, module: {"lora_A", "lora_B"} & set(name.split(".")))

    def context_fn():
        policy = SelectivePolicy(router_shapes=routers, adapter_shapes=adapters)
        return create_selective_checkpoint_contexts(policy)

    return context_fn


def _right_operand_shapes(layer: nn.Module, selects) -> frozenset[tuple[int, int]]:
    """The shapes (in, out) that the matmuls of the selected modules' 2-D weights (out, in) see on their right."""
    return frozenset(
        (param.shape[1], param.shape[0])
        for name, module in layer.named_modules()
        if selects(name, module)
        for param in module.parameters(recurse=False)
        if param.dim() == 2
    )


class SelectivePolicy:
    """Decides, operator by operator, what one forward of a layer keeps. Counts the matmuls apart in forward and in
    recomputation, so that both see the same sequence and agree (torch 2.13 asks only in forward and replays its
    decisions). Matmuls are recognised by the shape of their right operand: a router's (hidden, experts) is kept, an
    adapter's is recomputed, and neither is counted. A matmul of another weight with the same shape is treated alike:
    that costs memory or compute, never correctness."""

    def __init__(self, *, router_shapes: frozenset, adapter_shapes: frozenset):
        self.router_shapes, self.adapter_shapes = router_shapes, adapter_shapes
        self.num_matmuls = {False: 0, True: 0}  # by is_recompute

    def __call__(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        name = op.name()
        if name in _KEPT_OPS or _copies_to_host(name, args, kwargs):
            return CheckpointPolicy.MUST_SAVE
        if name not in _MATMUL_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        shape = _right_shape(name, args)
        if shape in self.router_shapes:
            return CheckpointPolicy.MUST_SAVE
        if shape in self.adapter_shapes:
            return CheckpointPolicy.PREFER_RECOMPUTE
        self.num_matmuls[ctx.is_recompute] += 1
        odd = self.num_matmuls[ctx.is_recompute] % 2 == 1
        return CheckpointPolicy.MUST_SAVE if odd else CheckpointPolicy.PREFER_RECOMPUTE


def _right_shape(name: str, args) -> tuple | None:
    """The (in, out) shape of a 2-D right operand, with static sizes only (a symbolic size is never a weight's)."""
    operand = args[2] if name == "aten::addmm" else args[1]
    if not isinstance(operand, torch.Tensor) or operand.dim() != 2:
        return None
    shape = tuple(operand.shape)
    if not all(type(size) is int for size in shape):
        return None
    return (shape[1], shape[0]) if name == "aten::linear" else shape


def _copies_to_host(name: str, args, kwargs) -> bool:
    """A copy from an accelerator to the host (MoE token counts): recomputing it would wait for the device again."""
    if name != "aten::_to_copy" or kwargs.get("device") is None:
        return False
    return torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu"
