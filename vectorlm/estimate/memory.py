"""One rank's memory in a training step, traced without a GPU and without allocating the model.

The model is built as training builds it (vectorlm.train.model.shard_for_training: LoRA, the loss, activation
checkpointing, FSDP2 over the configured mesh) on a fake process group of the job's world size, filled with fake
tensors (shapes and dtypes, no storage), and one micro-step's forward and backward runs under torch's FSDP memory
tracker, which sorts every tensor alive at each moment by what it is (torchtitan's memory estimation works so). This
rank's optimizer state, which exists throughout every step after the first, is counted beside the trace (it is two
moments shaped like the trainable shards); the optimizer step itself is not traced: the fused AdamW updates in place.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed.tensor import DTensor

from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.train.distributed import DistributedEnv, build_mesh
from vectorlm.train.model import shard_for_training
from vectorlm.train.step import accumulate_gradients

log = logging.getLogger(__name__)

_TOTAL = "Total"  # the tracker's key of a snapshot's sum


@dataclass(frozen=True)
class StepMemory:
    """Bytes one rank holds at the peak of a training step (the first seven add up to ``peak``); the activations the
    forward pass leaves for the backward pass (tensors saved for it, the loss's gradients computed in the forward
    pass, the inputs); and all its gradient shards (at the peak of a step without accumulation only some exist)."""

    parameters: (
        int  # this rank's shards of the parameters (fp32 master weights; LoRA's frozen base in bf16) and buffers
    )
    gradients: int  # this rank's gradient shards (fp32, of the trainable parameters)
    optimizer: int  # AdamW's two moments of this rank's trainable shards (fp32)
    gathered: int  # parameters gathered for the blocks in flight (computed in bf16) and their all-gather buffers
    reducing: int  # unsharded gradients and reduce-scatter buffers in flight
    activations: int  # tensors the forward pass left for the backward pass (and recomputed ones, when checkpointed)
    temporaries: int  # the loss's logits and gradients, gradients of activations, other short-lived tensors
    forward_activations: int  # what the forward pass leaves for the backward pass, where the backward pass starts
    gradient_shards: int  # all of this rank's gradient shards, as held at the end of the backward pass

    @property
    def peak(self) -> int:
        parts = dataclasses.astuple(self)[:7]
        return sum(parts)


class _StepTracker(FSDPMemTracker):
    """torch's FSDP memory tracker, keeping the step's peak and each category's most, not every module's peak: that
    bookkeeping walks all modules at every operation, which for 80 blocks takes longer than the trace itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.forward_end: dict | None = None  # the snapshot when the backward pass starts
        self.phase_peaks: dict[str, dict] = {}  # the peak of the forward passes' and of the backward passes' moments

    def _update_peak_stats(self, peak_state) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL]:
                self._peak_mem[device] = snapshot[_TOTAL]
                self._peak_mem_snap[device] = dict(snapshot)
            phase = "backward" if self._mod_tracker.is_bw else "forward"
            if self.phase_peaks.get(phase, {}).get(_TOTAL, -1) < snapshot[_TOTAL]:
                self.phase_peaks[phase] = dict(snapshot)
            # the backward pass's tensors are not activations: at its first operation these are the forward's
            if self.forward_end is None and self._mod_tracker.is_bw:
                self.forward_end = dict(snapshot)


@contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks that this process is rank 0 of, whose collectives move nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory estimate needs a process of its own (a process group is already set up)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# Config keys that make some blocks unlike the others (dense blocks before mixture-of-experts ones, experts in every
# k-th block, attention in some blocks of a hybrid); their values that keep all blocks alike.
_MIXED_BLOCK_KEYS = {"first_k_dense_replace": (None, 0), "mlp_only_layers": (None, []), "decoder_sparse_step": (None, 1),
                     "moe_layer_freq": (None, 1), "interleave_moe_layer_step": (None, 1), "attn_layer_period": (None,),
                     "expert_layer_period": (None,), "hybrid_override_pattern": (None,), "no_rope_layers": (None, []),
                     "num_dense_layers": (None, 0), "moe_layer_start_index": (None, 0), "moe_layer_interval": (None, 1),
                     "moe_layer_end_index": (None,)}  # fmt: skip

# Depths traced for a stack of identical blocks: the first and the last block are built differently (FSDP keeps the
# last one gathered after its forward), so both depths hold at least one block between them.
TRACED_DEPTHS = (3, 4)


def identical_blocks(config) -> bool:
    """Whether every decoder block of a model with this config is built alike: no per-block setting (``layer_types``
    and any other list with a value per block) varies, no list of block indices (Bamba's ``attn_layer_indices``)
    singles some out, and no key of :data:`_MIXED_BLOCK_KEYS` mixes kinds of blocks."""
    config = config.get_text_config()
    depth = config.num_hidden_layers
    for name, value in vars(config).items():
        if not isinstance(value, list | tuple) or not value:
            continue
        if len(value) == depth and len({repr(item) for item in value}) > 1:
            return False
        if len(value) != depth and "layer" in name and all(isinstance(item, int) for item in value):
            return False
    return all(getattr(config, key, None) in alike for key, alike in _MIXED_BLOCK_KEYS.items())


def step_memory(
    model_dir: str | Path,
    *,
    train: TrainConfig,
    lora: LoraSettings,
    max_seq_len: int,
    world_size: int,
    ranks_per_node: int,
    trust_remote_code: bool = False,
) -> tuple[StepMemory, str]:
    """Rank 0's memory in a training step of the model whose config is in ``model_dir`` (nothing else is read), with
    ``train.micro_batch_size`` rows of ``max_seq_len`` tokens per micro-step, on ``world_size`` ranks of which
    ``ranks_per_node`` share a node (the mesh of hybrid sharding); and how it was found.

    A stack of identical blocks (:func:`identical_blocks`) is traced at two small depths (:data:`TRACED_DEPTHS`) and
    every byte count of the forward passes' peak and of the backward passes' peak extended linearly to the full
    depth (each block adds the same parameters, gradients, optimizer state and saved activations; what is in flight
    at each is the same), the higher of the two being the step's peak: exact for such stacks, and seconds instead of
    a minute at 70B. Any other model is traced whole.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    depth = config.get_text_config().num_hidden_layers
    trace_phases = partial(_trace_phases, model_dir, train=train, lora=lora, max_seq_len=max_seq_len,
                           world_size=world_size, ranks_per_node=ranks_per_node,
                           trust_remote_code=trust_remote_code)  # fmt: skip
    shallow, deep = TRACED_DEPTHS
    if depth <= deep or not identical_blocks(config) or config.get_text_config() is not config:
        return _highest(trace_phases()), f"all {depth} blocks traced"
    first, second = trace_phases(num_layers=shallow), trace_phases(num_layers=deep)
    extended = []
    for low, high in zip(first, second, strict=True):  # each moment (forward, backward) extended by itself
        low, high = dataclasses.astuple(low), dataclasses.astuple(high)
        extended.append(StepMemory(*(b + (depth - deep) * (b - a) for a, b in zip(low, high, strict=True))))
    return _highest(extended), f"{shallow} and {deep} of {depth} identical blocks traced, extended linearly"


def _highest(phases: tuple[StepMemory, ...]) -> StepMemory:
    return max(phases, key=lambda memory: memory.peak)


def trace_step_memory(model_dir: str | Path, **kwargs) -> StepMemory:
    """The memory of :func:`step_memory`, traced on the whole model (or its first ``num_layers`` blocks)."""
    return _highest(_trace_phases(model_dir, **kwargs))


def _trace_phases(
    model_dir: str | Path,
    *,
    train: TrainConfig,
    lora: LoraSettings,
    max_seq_len: int,
    world_size: int,
    ranks_per_node: int,
    trust_remote_code: bool = False,
    num_layers: int | None = None,
) -> tuple[StepMemory, StepMemory]:
    """The memory at the peak of the forward passes and at the peak of the backward passes of a traced step.

    Attention is traced as the GPU computes it: flash attention, flex attention and sdpa as sdpa's flash kernel (the
    output and its log-sum-exp saved per row, no mask), eager (``train.attention: eager``, or a model without sdpa)
    as eager, with its scores. Liger's loss is traced as the chunked loss (both keep one chunk of logits). Blocks are
    traced eager (compiled ones fuse some element-wise steps and may save less).
    """
    from vectorlm.hub.meta_model import causal_lm_class
    from vectorlm.train.attention import supported_attention

    device = torch.device("cpu")
    settings = dataclasses.replace(train, compile=False, loss="chunked" if train.loss == "liger" else train.loss)
    supported = supported_attention(causal_lm_class(model_dir, trust_remote_code=trust_remote_code))
    attention = "eager" if train.attention == "eager" or "sdpa" not in supported else "sdpa"
    env = DistributedEnv(0, world_size, 0, ranks_per_node, device)
    overrides = {} if num_layers is None else _depth_overrides(model_dir, num_layers, trust_remote_code)
    with fake_world(world_size):
        empty = build_empty_model(model_dir, attn_implementation=attention, trust_remote_code=trust_remote_code,
                                  **overrides)  # fmt: skip
        model, _ = shard_for_training(empty, build_mesh(env, train.sharding), train=settings, lora=lora, device=device)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device=device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            accumulating = train.grad_accumulation_steps(world_size) > 1
            # With train.defer_gradient_sync, micro-steps before the last keep unsharded fp32 gradients of every
            # parameter: two micro-steps are traced. Else micro-steps after the first add to the gradient shards of
            # the ones before, which are there from the start.
            deferred = accumulating and train.defer_gradient_sync
            if accumulating and not deferred:
                for param in trainable:
                    param.grad = torch.zeros_like(param)
            rows, columns = train.micro_batch_size, max_seq_len
            tokens = torch.zeros(rows, columns, dtype=torch.long)
            batch = {"input_ids": tokens, "labels": tokens.clone(),
                     "position_ids": torch.arange(columns).expand(rows, columns).contiguous()}  # fmt: skip
            tracker = _StepTracker(model)
            tracker.track_inputs((batch["input_ids"], batch["position_ids"], batch["labels"]))
            with tracker:
                accumulate_gradients(model, [batch] * (2 if deferred else 1), loss_scale=1.0, cfg=settings,
                                     after_micro_step=tracker.reset_mod_stats)  # fmt: skip
    common = {
        "optimizer": adamw_state_bytes(trainable),
        "gradient_shards": _local_bytes(p.grad for p in trainable),
        # gradient shards there before the trace (accumulation) are held at every moment
        "held_gradients": _local_bytes(p.grad for p in trainable) if accumulating and not deferred else 0,
    }
    forward_end = tracker.forward_end or {}
    return tuple(_parts(tracker.phase_peaks.get(phase, {}), forward_end, **common) for phase in ("forward", "backward"))


def _parts(snapshot: dict, forward_end: dict, *, optimizer: int, gradient_shards: int, held_gradients: int):
    """The :class:`StepMemory` of a tracker's ``snapshot`` (a moment of the step); ``forward_end`` is the snapshot
    where the backward pass started."""
    kinds = _FSDPRefType
    left_for_backward = forward_end.get(kinds.ACT, 0) + forward_end.get(kinds.INP, 0)
    forward_made = snapshot.get(kinds.ACT, 0) + snapshot.get(kinds.INP, 0)
    # tensors of the forward pass alive beyond those it leaves for the backward pass are short-lived ones (the
    # loss's logits, in the forward pass when the loss computes its gradients there)
    activations = min(forward_made, left_for_backward)
    return StepMemory(
        parameters=snapshot.get(kinds.SHARDED_PARAM, 0) + snapshot.get(kinds.BUFFER, 0),
        gradients=max(snapshot.get(kinds.SHARDED_GRAD, 0), held_gradients),
        optimizer=optimizer,
        gathered=snapshot.get(kinds.UNSHARDED_PARAM, 0) + snapshot.get(kinds.ALL_GATHER, 0),
        reducing=snapshot.get(kinds.UNSHARDED_GRAD, 0) + snapshot.get(kinds.REDUCE_SCATTER, 0),
        activations=activations,
        temporaries=snapshot.get(kinds.TEMP, 0) + forward_made - activations,
        forward_activations=left_for_backward,
        gradient_shards=gradient_shards,
    )


def adamw_state_bytes(trainable: list[torch.Tensor]) -> int:
    """Bytes of this rank's AdamW state (vectorlm.train.step.build_optimizer, fused): for each trainable parameter
    its two moments, shaped and typed like its shard, and the step count, a 4-byte tensor on the device."""
    return 2 * _local_bytes(trainable) + 4 * len(trainable)


def _local_bytes(tensors) -> int:
    """Bytes this rank stores of ``tensors`` (a DTensor's local shard; each storage once)."""
    unique = {id(tensor): tensor for tensor in tensors if torch.is_tensor(tensor)}.values()
    locals_ = (tensor.to_local() if isinstance(tensor, DTensor) else tensor for tensor in unique)
    return sum(local.numel() * local.element_size() for local in locals_)


def _depth_overrides(model_dir: str | Path, num_layers: int, trust_remote_code: bool) -> dict:
    """Config values of the model cut to its first ``num_layers`` blocks (its per-block lists cut with it)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    depth = config.num_hidden_layers
    lists = {key: value[:num_layers] for key, value in vars(config).items()
             if isinstance(value, list | tuple) and len(value) == depth}  # fmt: skip
    return lists | {"num_hidden_layers": num_layers}
