"""Throughput, model FLOPs utilisation (MFU) and the metrics file."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

# Dense bf16 tensor-core peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 peak, or None where it is unknown (CPUs, unlisted GPUs): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(config: PretrainedConfig, *, num_params: int, seq_len: int, frozen_base: bool = False) -> float:
    """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores (PaLM appendix B).

    With a frozen base (LoRA) no weight gradients are computed for it: 4 per weight instead of 6.
    """
    config = config.get_text_config()
    num_embedding = config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    total = 6 * (num_params - num_embedding) + attention
    return total * 4 / 6 if frozen_base else total


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: allocated GPU memory on a GPU, resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLog:
    """Appends one JSON object per line to ``path`` (rank 0 only); ``fresh`` starts the file anew."""

    def __init__(self, path: str | Path, *, enabled: bool, fresh: bool = False) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after ``step``: a resumed run redoes them, and each step is kept once."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            self.path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
