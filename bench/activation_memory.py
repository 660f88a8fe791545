"""Activation memory per token of one decoder layer under each activation checkpointing mode, and the compute the
recomputation adds: measured on fake tensors, so an 8B layer at 8,192 tokens needs no memory and a few seconds.

    .venv/bin/python bench/activation_memory.py            # Llama-3.1-8B's layer, 1 x 8,192 tokens, bf16, sdpa
    .venv/bin/python bench/activation_memory.py --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --tokens 64

Method. One ``LlamaDecoderLayer`` of transformers is built under ``FakeTensorMode`` (shapes, dtypes and storages
without data) and run forward on an input that requires a gradient, as the previous layer's output does, with the
rotary cos/sin made beforehand (the model makes them once for all layers). A dispatch mode notes every storage that
the layer's operators create; after the forward, with the output still referenced as the next layer would reference
it, the storages still alive are what the layer keeps until its backward: tensors saved by autograd, the
checkpoint's inputs and the outputs that selective checkpointing stores. Each storage counts once, however many
tensors view it. Per token is that sum over the tokens of the forward, so it includes the layer's output (the next
layer's input, which every mode keeps). ``FlopCounterMode`` counts the forward and backward FLOPs (matmuls and
attention, of which causal attention does half the L x L); "recomputed" is the backward's FLOPs above the
backward of ``none``, as a fraction of ``none``'s forward plus backward.

Modes: ``none``, ``full`` and ``selective`` are vectorlm.train.activation_checkpointing's; ``selective (every
matmul)`` is the policy it replaced (every matmul's and attention's output kept), measured in the same run; the
last rows are derived, not measured: one mode on every Nth layer and another on the rest (``full`` every 2nd layer
and ``none`` on the others is torchtitan's former per-layer option), whose per-layer averages are weighted sums of
the measured rows.
"""

from __future__ import annotations

import argparse
import gc
import sys
import weakref
from functools import partial
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vectorlm.train.activation_checkpointing import apply_activation_checkpointing

# The policy that selective checkpointing had before torchtitan's: every matmul's output and attention's kept.
_EVERY_MATMUL = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "flash_attn::_flash_attn_forward",
    "flash_attn::_flash_attn_varlen_forward", "flex_attention",
}  # fmt: skip


def _keep_every_matmul(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op.name() in _EVERY_MATMUL else CheckpointPolicy.PREFER_RECOMPUTE


def _every_matmul_context():
    return create_selective_checkpoint_contexts(_keep_every_matmul)


class LiveStorages(TorchDispatchMode):
    """Notes the storage of every tensor the operators under it create (views of the ``existing`` tensors, such as a
    transposed weight, create none); ``live_bytes`` sums those still alive."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {tensor.untyped_storage() for tensor in existing}
        self.storages: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self.existing:
                    self.storages[storage] = storage.nbytes()
        return out

    def live_bytes(self) -> int:
        gc.collect()
        return sum(self.storages.values())


def _attention_flops(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v) // (2 if is_causal else 1)


def _attention_backward_flops(grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad, q, k, v) // (2 if is_causal else 1)


# transformers' sdpa on a CPU runs this kernel, which FlopCounterMode does not know; counted as a flash kernel does
# its work, the causal half only (FlopCounterMode counts the full L x L of the GPU kernels).
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def measure(args, mode: str) -> dict:
    """Bytes kept per token by one layer's forward, and its forward and backward FLOPs, under ``mode``."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, rope_theta=500000.0,
                         attn_implementation="sdpa")  # fmt: skip
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters made in bf16 (a fake module cannot be converted)
    with FakeTensorMode():
        layer = LlamaDecoderLayer(config, layer_idx=0)
        torch.set_default_dtype(default_dtype)
        hidden = torch.randn(1, args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(args.tokens).unsqueeze(0)
        rotary = LlamaRotaryEmbedding(config)(hidden, positions)
        if mode == "selective (every matmul)":
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False, context_fn=_every_matmul_context)
        else:
            apply_activation_checkpointing([layer], mode)
        existing = [hidden, *rotary, *layer.parameters(), *layer.buffers()]
        flops = partial(FlopCounterMode, display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
        with LiveStorages(existing) as storages, flops() as fwd:
            out = layer(hidden, position_embeddings=rotary, position_ids=positions)
        kept = storages.live_bytes()
        with flops() as bwd:
            out.float().sum().backward()
    return {"bytes_per_token": kept / args.tokens, "forward": fwd.get_total_flops(), "backward": bwd.get_total_flops()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32, help="for the per-model column")
    args = parser.parse_args()
    print(f"one Llama decoder layer: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
          f"{args.kv_heads} KV heads, head_dim {args.hidden // args.heads}; 1 x {args.tokens:,} tokens, bf16, sdpa "
          f"(torch {torch.__version__})")  # fmt: skip
    modes = ("none", "full", "selective (every matmul)", "selective")
    results = {mode: measure(args, mode) for mode in modes}
    none = results["none"]
    for every, other, interval in (("full", "none", 2), ("full", "none", 4), ("selective", "none", 2),
                                   ("full", "selective", 2)):  # fmt: skip
        results[f"{every} 1/{interval}, {other} rest"] = {
            key: (results[every][key] + (interval - 1) * results[other][key]) / interval
            for key in ("bytes_per_token", "forward", "backward")
        }
    total = none["forward"] + none["backward"]
    model_column = f"GiB/{args.tokens:,} tok x {args.layers} layers"
    print(f"{'mode':<26} {'KiB/token/layer':>16} {'vs none':>8} {model_column:>30} {'recomputed':>11}")
    for mode, result in results.items():
        per_token = result["bytes_per_token"]
        recomputed = (result["backward"] - none["backward"]) / total
        print(f"{mode:<26} {per_token / 1024:>16.1f} {per_token / none['bytes_per_token']:>8.2f} "
              f"{per_token * args.tokens * args.layers / 2**30:>30.1f} {recomputed:>11.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
