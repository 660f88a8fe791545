"""Throughput and model FLOPs utilisation (MFU) of training steps."""

from __future__ import annotations

import re
import resource
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Dense (no sparsity: the data sheets' "with sparsity" figures halved) bf16 tensor-core peak FLOP/s per GPU, with FP32
# accumulation, by the model name in torch.cuda.get_device_name(). Names match on whole words (gpu_model_of), the
# most words winning: "NVIDIA L40" is not an L4, "NVIDIA A10G" not an A10, "NVIDIA GH200 480GB" not an H200.
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "GB200": 2500e12,
    "H200": 989e12,  # SXM
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,  # SXM: "NVIDIA H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100 80GB HBM2e": 756e12,  # the PCIe card as some drivers name it
    "H800": 989e12,
    "H800 PCIe": 756e12,
    "H20": 148e12,
    "A100": 312e12,  # SXM4 and PCIe, 40 and 80 GB
    "A800": 312e12,
    "A40": 149.7e12,
    "A30": 165e12,
    "A10": 125e12,
    "A10G": 70e12,  # AWS's variant: 80 SMs at 1.71 GHz, half-rate FP32 accumulation (NVIDIA publishes no data sheet)
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 6000 Ada": 364.2e12,
    "RTX A6000": 154.8e12,
}


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[\s\-_/]+", name.upper()) if word]


def gpu_model_of(device_name: str) -> str | None:
    """The name in :data:`PEAK_BF16_FLOPS` of the GPU called ``device_name``: the one whose words occur, in order and
    next to each other, among the device name's words, the one of most words winning; None for no match or a MIG
    slice (a part of the GPU's streaming multiprocessors, so not its peak)."""
    words = _words(device_name)
    if "MIG" in words:
        return None
    found = [key for key in PEAK_BF16_FLOPS if _contains(words, _words(key))]
    return max(found, key=lambda key: len(_words(key))) if found else None


def peak_flops_of(device_name: str) -> float | None:
    """The bf16 peak of the GPU called ``device_name`` (:func:`gpu_model_of`), None where it is not listed."""
    model = gpu_model_of(device_name)
    return PEAK_BF16_FLOPS[model] if model else None


def _contains(words: list[str], run: list[str]) -> bool:
    return any(words[i : i + len(run)] == run for i in range(len(words) - len(run) + 1))


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None where it is unknown (CPUs, unlisted GPUs): MFU is then not reported."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def measured_matmul_peak(
    device: torch.device, *, size: int = 8192, repeats: int = 20, rounds: int = 3, dtype: torch.dtype | None = None
) -> float:
    """FLOP/s of ``size`` x ``size`` matmuls measured on ``device`` now: the fastest of ``rounds`` runs of ``repeats``
    back-to-back matmuls after a warm-up, timed with CUDA events on a GPU (bf16 by default, what MFU's peak means)
    and with the host clock elsewhere (fp32 by default; give a CPU a small ``size``). What this GPU, at its clocks, power limit and temperature
    now, reaches on the best case for its tensor cores: MFU against it leaves out what the data sheet promises but
    the chip does not deliver here."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    best = float("inf")
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for _ in range(max(2, repeats // 4)):  # warm-up: kernel selection, clocks
            torch.mm(a, b, out=out)
        for _ in range(rounds):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(repeats):
                    torch.mm(a, b, out=out)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                begin = time.perf_counter()
                for _ in range(repeats):
                    torch.mm(a, b, out=out)
                seconds = time.perf_counter() - begin
            best = min(best, seconds)
    return 2 * size**3 * repeats / best


def causal_pairs(document_lengths: Sequence[int] | np.ndarray, *, window: int | None = None) -> int:
    """The (query, key) pairs causal attention computes in documents of these lengths: n(n + 1) / 2 in a document of
    n tokens, or within a sliding ``window`` (each query sees itself and the ``window`` - 1 keys before it) the sum
    over its tokens i = 0 .. n - 1 of min(i + 1, window)."""
    n = np.asarray(document_lengths, dtype=np.int64)
    if window is None:
        return int((n * (n + 1) // 2).sum())
    seen = np.minimum(n, window)
    return int((seen * (seen + 1) // 2 + (n - seen) * window).sum())


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of one training step (docs/config.md, "MFU: the FLOPs counted"): ``per_token`` x tokens, plus
    ``per_pair`` x the causal (query, key) pairs of the layers that attend to whole documents, plus for each sliding
    window ``w`` of ``per_window_pair`` its FLOPs x the pairs within that window."""

    per_token: float
    per_pair: float
    per_window_pair: tuple[tuple[int, float], ...] = ()  # (window, FLOPs per pair of all the layers with it)

    @property
    def windows(self) -> tuple[int, ...]:
        return tuple(window for window, _ in self.per_window_pair)

    def window_pairs(self, document_lengths: Sequence[int] | np.ndarray) -> tuple[int, ...]:
        """The pairs within each of :attr:`windows` of documents of these lengths (sums over documents, so that the
        pairs of several micro-batches and ranks add up); () for a model without sliding windows."""
        return tuple(causal_pairs(document_lengths, window=window) for window in self.windows)

    def __call__(
        self, num_tokens: float, sum_squared_lengths: float, *, window_pairs: Sequence[float] | None = None
    ) -> float:
        """FLOPs of ``num_tokens`` tokens in documents whose squared lengths sum to ``sum_squared_lengths`` and
        whose :meth:`window_pairs` are ``window_pairs``. Without them a window's pairs are taken as
        ``min(all causal pairs, window x tokens)``, an upper bound, exact when no document is longer than the window
        (and high by window (window - 1) / 2 per document when all are)."""
        pairs = (sum_squared_lengths + num_tokens) / 2  # sum of n(n + 1) / 2: the tokens are the documents' lengths
        if window_pairs is None:
            window_pairs = [min(pairs, window * num_tokens) for window in self.windows]
        windowed = sum(flops * p for (_, flops), p in zip(self.per_window_pair, window_pairs, strict=True))
        return self.per_token * num_tokens + self.per_pair * pairs + windowed


def training_flops(model: nn.Module) -> TrainingFlops:
    """The FLOPs model of training ``model`` (plain or peft-wrapped; full-size or sharded parameters, any device,
    meta included).

    Weights: a weight that multiplies activations costs 2 FLOPs per token forward, 2 for the gradient of its input
    and, when it trains, 2 for its own gradient: 6 per trainable weight, 4 per frozen one (LoRA's base; its adapters
    are weights of their own, 6 each). Embedding lookups are no matmul; the LM head is one, also when tied to the
    input embedding (counted once). A mixture-of-experts layer's stacked expert weights (3-D, experts first) count
    for the share of tokens routed to each expert, experts per token / experts, and so do LoRA adapters on them; the
    router and shared experts are plain weights that every token uses.

    Attention: scores (QK^T) and their weighted sum of V cost 2 x heads x (key + value head dims) per (query, key)
    pair forward, 3 times that in training (also under LoRA: gradients flow through attention), in every layer;
    pairs are causal and within documents, and a sliding-window layer's within its window (:func:`causal_pairs`).
    """
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    key_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    per_layer = 6 * heads * (key_dim + (getattr(config, "v_head_dim", None) or key_dim))
    windows = _layer_windows(config)
    per_window = {window: per_layer * windows.count(window) for window in sorted(set(windows) - {None})}
    return TrainingFlops(_weight_flops(model, config), per_layer * windows.count(None), tuple(per_window.items()))


def _layer_windows(config) -> list[int | None]:
    """Each layer's sliding window, None for full attention, as transformers decides: by ``layer_types`` where the
    config has them (Gemma 2/3, Qwen 2/3, gpt-oss), else ``sliding_window`` applies to every layer (Mistral, Phi-3,
    Mixtral). Other layer types (chunked or linear attention, state-space layers) count as full attention."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types:
        return [window if kind == "sliding_attention" and window else None for kind in types]
    return [window or None] * config.num_hidden_layers


def _weight_flops(model: nn.Module, config) -> float:
    output = model.get_output_embeddings()
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    lookups.discard(id(output.weight) if output is not None else None)
    shares = _routed_shares(model, config)
    total = 0.0
    for param in model.parameters():  # each parameter once, tied ones included
        if param.ndim >= 2 and id(param) not in lookups:
            total += (6 if param.requires_grad else 4) * param.numel() * shares.get(id(param), 1.0)
    return total


def _routed_shares(model: nn.Module, config) -> dict[int, float]:
    """The share of the tokens that multiply each expert parameter: experts per token / experts for the stacked expert
    weights (experts x out x in, transformers 5's fused experts) and for peft's LoRA adapters on them; 0 for the
    experts' stacked biases (experts x out), which are no matmul."""
    stacked, adapters = {}, {}  # module -> its number of experts
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.ndim == 3]
        if own and not isinstance(module, nn.modules.conv._ConvNd):
            stacked[module] = own[0].shape[0]
        num_experts = getattr(module, "num_experts", 1)  # peft's ParamWrapper on a stacked expert parameter
        if isinstance(num_experts, int) and num_experts > 1 and hasattr(module, "lora_A"):
            adapters[module] = num_experts
    if not stacked:
        return {}
    top_k = _experts_per_token(model, config)
    shares = {}
    for module, num_experts in stacked.items():
        for param in module.parameters(recurse=False):
            if param.ndim == 3:
                shares[id(param)] = _share(top_k, num_experts)
            elif param.ndim == 2 and param.shape[0] == num_experts:
                shares[id(param)] = 0.0
    for module, num_experts in adapters.items():
        for param in [*module.lora_A.parameters(), *module.lora_B.parameters()]:
            shares[id(param)] = _share(top_k, num_experts)
    return shares


def _share(top_k: int | None, num_experts: int) -> float:
    return 1.0 if top_k is None else min(top_k / num_experts, 1.0)


def _experts_per_token(model: nn.Module, config) -> int | None:
    """The experts each token is routed to: the config's ``num_experts_per_tok`` (what most mixture-of-experts
    families call it) or another family's name for it, else a ``top_k`` of the model's routers."""
    for name in ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "moe_k"):
        if isinstance(value := getattr(config, name, None), int):
            return value
    if isinstance(value := getattr(getattr(config, "ffn_config", None), "moe_top_k", None), int):  # DBRX
        return value
    for module in model.modules():
        if isinstance(value := getattr(module, "top_k", None), int):
            return value
    warnings.warn(
        "training FLOPs: the model has stacked expert weights but no known count of experts per token: "
        "every expert is counted for every token",
        stacklevel=3,
    )
    return None


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

    def add(
        self, output, *, tokens: float, sum_squared_lengths: float, window_pairs: Sequence[float] | None = None
    ) -> None:
        """Counts one step: its global token count, squared document lengths and pairs within sliding windows
        (:meth:`TrainingFlops.window_pairs`), its ``skipped`` flag (device)."""
        self._tokens += tokens
        self._last_tokens = tokens
        self._flops += self.flops(tokens, sum_squared_lengths, window_pairs=window_pairs)
        self._skips += output.skipped
        self._consecutive = (self._consecutive + output.skipped) * output.skipped
        self._longest = torch.maximum(self._longest, self._consecutive)

    def read(self, output, count: float, *, metrics: Sequence[str] = ()) -> dict[str, Any]:
        """The metrics record of the step ``output`` came from (a collective: call it on every rank): the loss per
        loss token (``count``: of the global batch; or per pair) and the means of the objective's ``metrics``."""
        sums = output.loss_sum.detach().float().reshape(1)
        if metrics:
            sums = torch.cat([sums, output.metric_sums.float()])
        dist.all_reduce(sums)
        loss, grad_norm, skips, longest, *metric_sums = torch.cat(
            [sums[:1], torch.stack([output.grad_norm.float(), self._skips, self._longest]), sums[1:]]
        ).tolist()
        seconds = max(time.perf_counter() - self._begin - self._paused, 1e-9)
        record = {
            "loss": loss / max(count, 1),
            **{name: value / max(count, 1) for name, value in zip(metrics, metric_sums)},
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
