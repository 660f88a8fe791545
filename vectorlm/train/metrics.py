"""Throughput and model FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from the vendor's data sheets, by a fragment of
# torch.cuda.get_device_name(); the longest fragment that matches wins ("H100 NVL" before "H100", "A100" before "A10").
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}


def peak_flops_of(device_name: str) -> float | None:
    """The bf16 peak of the GPU called ``device_name``, or None when no listed fragment matches."""
    matches = [key for key in PEAK_BF16_FLOPS if key in device_name]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None where it is unknown (CPUs, unlisted GPUs): MFU is then not reported."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training step: ``per_token`` x tokens + ``per_squared_length`` x the sum over documents of their
    squared lengths (docs/config.md, "MFU", states the formula)."""

    per_token: float
    per_squared_length: float

    def __call__(self, num_tokens: float, sum_squared_lengths: float) -> float:
        return self.per_token * num_tokens + self.per_squared_length * sum_squared_lengths


def training_flops(model: nn.Module) -> TrainingFlops:
    """The FLOPs model of training ``model`` (full-size or sharded parameters, any device, meta included).

    Every weight that multiplies activations costs 2 FLOPs per token forward, 2 for the gradient of its input and,
    when it trains, 2 for its own gradient: 6 per trainable weight, 4 per frozen one (LoRA's base). Embedding
    lookups are no matmul and are not counted, but the LM head is, also when it is tied to the input embedding.
    Attention scores (QK^T) and their weighted sum of V cost 4 x heads x head_dim per query and key forward, 3 times
    that in training, whether the weights train or not; a document of n tokens has n^2 query-key pairs (the PaLM
    convention, not halved for causality), and packed documents attend only within themselves.
    """
    config = model.config.get_text_config()
    output = model.get_output_embeddings()
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookups.discard(id(output.weight) if output is not None else None)
    per_token = 0.0
    for param in {id(p): p for p in model.parameters()}.values():
        if param.ndim >= 2 and id(param) not in lookups:
            per_token += (6 if param.requires_grad else 4) * param.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return TrainingFlops(per_token, 12 * config.num_hidden_layers * heads * head_dim)


class StepMeter:
    """Throughput, MFU and skipped steps over the steps since the last logged one.

    Steps only add up numbers known on the host and tensors left on the device; :meth:`read`, on logged steps,
    costs one all-reduce and one device-to-host copy. Time spent in evaluation or checkpointing (:meth:`paused`) is
    not counted as training time.
    """

    def __init__(self, *, world_size: int, device: torch.device, flops: TrainingFlops, peak: float | None) -> None:
        self.world_size, self.flops, self.peak = world_size, flops, peak
        self._skips = torch.zeros((), device=device)
        self._consecutive = torch.zeros((), device=device)  # skipped steps in a row, up to the last one
        self._longest = torch.zeros((), device=device)  # the longest such run since the last read
        self.longest_skip_run = 0  # as of the last read
        self.start()

    def start(self) -> None:
        self._begin, self._paused, self._tokens, self._flops = time.perf_counter(), 0.0, 0, 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - begin

    def add(self, output, *, tokens: float, sum_squared_lengths: float) -> None:
        """Counts one step: its global token count and squared document lengths, its ``skipped`` flag (device)."""
        self._tokens += tokens
        self._last_tokens = tokens
        self._flops += self.flops(tokens, sum_squared_lengths)
        self._skips += output.skipped
        self._consecutive = (self._consecutive + output.skipped) * output.skipped
        self._longest = torch.maximum(self._longest, self._consecutive)

    def read(self, output, loss_tokens: float) -> dict[str, Any]:
        """The metrics record of the step ``output`` came from (a collective: call it on every rank)."""
        loss = output.loss_sum.detach().float().clone()
        dist.all_reduce(loss)
        loss, grad_norm, skips, longest = torch.stack(
            [loss, output.grad_norm.float(), self._skips, self._longest]
        ).tolist()
        seconds = max(time.perf_counter() - self._begin - self._paused, 1e-9)
        record = {
            "loss": loss / max(loss_tokens, 1),
            "lr": output.lr,
            "grad_norm": grad_norm,
            "tokens": int(self._last_tokens),
            "tokens_per_second": self._tokens / seconds,
            "mfu": self._flops / seconds / (self.peak * self.world_size) if self.peak else None,
            "skipped_steps": int(skips),
        }
        self.longest_skip_run = int(longest)
        self._longest = self._consecutive.clone()  # a run still going on counts on in the next window
        self.start()
        return record

    def total_skips(self) -> int:
        return int(self._skips.item())


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated GPU memory on a GPU, resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
