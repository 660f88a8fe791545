"""The memory estimate against what a real 2-rank training step allocates, and the shallow traces against the whole
model's."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.conftest import run_on_ranks
from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.estimate.memory import step_memory

SEQ = 128
CASES = {
    "none": ({"activation_checkpointing": "none"}, {}),
    "selective": ({"activation_checkpointing": "selective"}, {}),
    "full": ({"activation_checkpointing": "full"}, {}),
    "lora": ({"activation_checkpointing": "none"}, {"enabled": True, "r": 4}),
}


class _LiveStorages(TorchDispatchMode):
    """Every storage the operations create while it is active, weakly: what is still alive afterwards is what the
    forward pass left for the backward pass (and FSDP's gathered parameters, told apart by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and not isinstance(tensor, DTensor):
                self.created.append(weakref.ref(tensor.untyped_storage()))
        return out

    def alive_bytes(self, excluded: set[int]) -> int:
        alive = {storage.data_ptr(): storage for ref in self.created if (storage := ref()) is not None}
        return sum(storage.nbytes() for ptr, storage in alive.items() if ptr not in excluded and storage.nbytes())


class _PeakLive(_LiveStorages):
    """The most bytes the storages created while it is active hold at once, looked at after every operation (FSDP
    frees gathered parameters by resizing their storage to nothing, which a count of allocations would miss)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak = max(self.peak, self.alive_bytes(set()))
        return out


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _bytes(tensors) -> int:
    unique = {id(t): _local(t) for t in tensors if torch.is_tensor(t)}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _measure(env, model_dir: str, train: dict, lora: dict, out: str) -> None:
    """One real step on this rank: its parameter shards, the activations alive at the end of the forward pass, its
    gradient shards after the backward pass, its AdamW state after the optimizer step."""
    from vectorlm.train.model import build_model
    from vectorlm.train.step import accumulate_gradients, build_optimizer, loss_sum, train_step

    cfg, settings = TrainConfig(**train), LoraSettings(**lora)
    model, _ = build_model(model_dir, env, train=cfg, lora=settings, attention="sdpa")
    model.train()
    parameters = _bytes([*model.parameters(), *model.buffers()])
    tokens = torch.randint(0, 300, (cfg.micro_batch_size, SEQ))
    batch = {"input_ids": tokens, "labels": tokens.clone(),
             "position_ids": torch.arange(SEQ).expand(cfg.micro_batch_size, SEQ).contiguous()}  # fmt: skip
    live = _LiveStorages()
    with live:
        loss = loss_sum(model, batch)
    # FSDP's gathered parameters (of the blocks kept gathered after their forward) are no activations
    gathered = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    activations = live.alive_bytes(gathered)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    gradients = _bytes(p.grad for p in trainable)
    optimizer = build_optimizer(model, cfg)
    train_step(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), [batch],
               loss_scale=1.0, cfg=cfg)  # fmt: skip
    states = [t for state in optimizer.state.values() for t in state.values()]
    # a step after the first: the parameter shards and AdamW's state are there, gradients are not (zero_grad)
    peak = _PeakLive()
    with peak:
        accumulate_gradients(model, [batch], loss_scale=1.0, cfg=cfg)
    resident = parameters + _bytes(states)
    if env.rank == 0:
        Path(out).write_text(json.dumps({"parameters": parameters, "activations": activations,
                                         "gradients": gradients, "optimizer": _bytes(states),
                                         "peak": resident + peak.peak}))  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_the_estimate_matches_what_a_real_two_rank_step_allocates(case, tiny_model_dir, tmp_path):
    """Parameter, gradient, optimizer and activation bytes of rank 0 within 2% of a real 2-rank step's (bf16 mixed
    precision, full sharding, rows of 128 tokens), for each checkpointing mode and with LoRA."""
    changes, lora = CASES[case]
    train = {"micro_batch_size": 2, "global_batch_size": 4, "mixed_precision": True, **changes}
    run_on_ranks(_measure, 2, str(tiny_model_dir), train, lora, str(tmp_path / "real.json"))
    real = json.loads((tmp_path / "real.json").read_text())
    estimate, _ = step_memory(tiny_model_dir, train=TrainConfig(**train), lora=LoraSettings(**lora),
                              max_seq_len=SEQ, world_size=2, ranks_per_node=2)  # fmt: skip
    estimated = {"parameters": estimate.parameters, "activations": estimate.forward_activations,
                 "gradients": estimate.gradient_shards, "optimizer": estimate.optimizer,
                 "peak": estimate.peak}  # fmt: skip
    print(f"{case}: " + ", ".join(f"{kind} {estimated[kind]:,} / {value:,}" for kind, value in real.items()))
    for kind, value in real.items():
        assert value > 0, kind
        assert estimated[kind] == pytest.approx(value, rel=0.02), (kind, estimated[kind], value)
