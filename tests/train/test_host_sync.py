"""A training step that is not logged never waits for the device: no operator whose result the host must read.

On a CPU nothing waits, but the operators that would make the host wait for a GPU are the same: every operator of
:func:`vectorlm.train.step.train_step` (sharded model, forward, loss, backward, clipping, optimizer) is watched by a
dispatch mode that records those. What a CPU cannot show: device-to-host copies (``.cpu()``, ``.tolist()``) and what
compiled code does inside (tests/train/test_attention.py checks a step on a GPU with CUDA's sync debug mode).
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import types
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, get_scheduler

from tests.train.test_attention import reference_varlen
from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.data.loader import BatchShape, collate
from vectorlm.train.attention import document_mask_kwargs
from vectorlm.train.model import build_model
from vectorlm.train.step import build_optimizer, train_step

aten = torch.ops.aten

# A Python value read from a tensor, or an output whose shape depends on the data.
HOST_READS = {
    aten._local_scalar_dense, aten.item, aten.equal, aten.is_nonzero, aten.allclose, aten.nonzero, aten.masked_select,
    aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount,
}  # fmt: skip
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}  # with a boolean mask: nonzero

# transformers' search for packed documents in the positions (a Python test on a device tensor, once per forward),
# which our masks avoid for sdpa, flex attention and flash-attn but not for eager attention (nor sliding windows).
TRANSFORMERS_SEARCH = ("transformers/masking_utils.py", "find_packed_sequence_indices")


class HostSyncs(TorchDispatchMode):
    """Records every operator that makes the host wait for the device, with the stack it was called from."""

    supports_higher_order_operators = True  # flex attention: one operator, unwatched inside

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, list[traceback.FrameSummary]]] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and self.waits(getattr(func, "_overloadpacket", None), args, kwargs):
            self.found.append((str(func), traceback.extract_stack()[:-1]))
        return func(*args, **kwargs)

    @staticmethod
    def waits(packet, args, kwargs) -> bool:
        if packet in HOST_READS:
            return True
        if packet is aten.repeat_interleave:  # the output's size, unless given
            return kwargs.get("output_size") is None and len(args) < 3 and torch.is_tensor(args[0])
        if packet in INDEXING:
            return any(torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        return False

    @contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frames outside torch, where the operator was asked for."""
    frames = [f for f in stack if "site-packages/torch/" not in f.filename]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[::-1][:4])


def in_transformers_search(stack: list[traceback.FrameSummary]) -> bool:
    return any(f.filename.endswith(TRANSFORMERS_SEARCH[0]) and f.name == TRANSFORMERS_SEARCH[1] for f in stack)


ROWS = [  # two packed rows of 16 tokens: documents of 5, 3 and 8 tokens, then 10 and 6 (the first 4 without loss)
    {"input_ids": list(range(2, 18)), "labels": list(range(2, 18)), "position_ids": [*range(5), *range(3), *range(8)]},
    {"input_ids": list(range(20, 36)), "labels": [-100] * 4 + list(range(24, 36)),
     "position_ids": [*range(10), *range(6)]},
]  # fmt: skip


def host_syncs_of_steps(model_dir, env, *, loss: str, attention: str, mixed_precision: bool, monkeypatch) -> list:
    """The host syncs of two optimizer steps of two micro-batches each (the first step included: nothing is
    allowed once either), on the model as training builds it (sharded over a one-rank group, loss installed)."""
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=4, lr=1e-3, mixed_precision=mixed_precision, loss=loss,
                      attention=attention, max_grad_norm=1.0)  # fmt: skip
    syncs = HostSyncs()
    if attention == "flash_attention_2":  # flash-attn's one kernel replaced by a per-document reference, unwatched

        def varlen(*args, **kwargs):
            with syncs.pause():
                return reference_varlen(*args, **kwargs)

        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention=attention)
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler("constant", optimizer)
    shape = BatchShape(rows=3, width=20)  # as training collates: padded to the run's one shape
    batches = [collate(ROWS, flatten=attention == "flash_attention_2", shape=shape) for _ in range(2)]
    with syncs:
        for _ in range(2):
            train_step(model, optimizer, scheduler, batches, loss_scale=1 / 50, cfg=cfg)
    return syncs.found


LIGER = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                           reason="liger needs a CUDA GPU and liger-kernel")  # fmt: skip


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("loss", ["plain", "chunked", pytest.param("liger", marks=LIGER)])
def test_a_training_step_never_waits_for_the_device(tiny_model_dir, process_group, loss, attention, monkeypatch):
    """Every loss with every attention a CPU runs (flash-attn through a CPU reference of its kernel). Eager attention
    leaves the packed documents to transformers, whose search for them waits once per forward: that one is known and
    counted, any other fails. (Flex attention's backward does not run on a CPU: its mask is checked below.)"""
    found = host_syncs_of_steps(tiny_model_dir, process_group, loss=loss, attention=attention, mixed_precision=False,
                                monkeypatch=monkeypatch)  # fmt: skip
    known = [op for op, stack in found if attention == "eager" and in_transformers_search(stack)]
    unexpected = [f"{op} at {where(stack)}" for op, stack in found if not (attention == "eager" and
                                                                          in_transformers_search(stack))]  # fmt: skip
    assert not unexpected, "\n".join(unexpected)
    assert len(known) == (4 if attention == "eager" else 0)  # 2 steps x 2 micro-batches


def test_with_mixed_precision_too(tiny_model_dir, process_group, monkeypatch):
    """bf16 compute with fp32 master weights: the fused loss's bf16 path and FSDP's casts."""
    found = host_syncs_of_steps(tiny_model_dir, process_group, loss="chunked", attention="sdpa", mixed_precision=True,
                                monkeypatch=monkeypatch)  # fmt: skip
    assert not found, "\n".join(f"{op} at {where(stack)}" for op, stack in found)


def test_the_flex_attention_mask_is_built_without_waiting():
    config = AutoConfig.for_model("llama")
    config._attn_implementation = "flex_attention"
    syncs = HostSyncs()
    with syncs:
        assert "attention_mask" in document_mask_kwargs(config, collate(ROWS, flatten=False))
    assert not syncs.found, "\n".join(f"{op} at {where(stack)}" for op, stack in syncs.found)


def test_the_watch_sees_a_host_sync():
    """What the watch catches: a Python number or a data-dependent shape from a tensor."""
    values = torch.tensor([1.0, -1.0])
    for wait in (lambda: values.sum().item(), lambda: bool(values.max() > 0), lambda: values[values > 0],
                 lambda: values.nonzero(), lambda: torch.equal(values, values)):  # fmt: skip
        syncs = HostSyncs()
        with syncs:
            wait()
        assert syncs.found
