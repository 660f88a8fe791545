"""One optimizer step and one evaluation, the arithmetic at the heart of training."""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from vectorlm.config import TrainConfig
from vectorlm.data.loader import fetch
from vectorlm.data.pack import IGNORE_INDEX
from vectorlm.distributed import DistributedEnv, all_reduce_sum


def forward_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a packed batch, documents isolated from each other.

    No attention mask and no KV cache: only then does transformers turn the restarting position_ids into a
    block-diagonal mask (sdpa, eager) or cu_seq_lens (flash-attn). With a cache, packed documents see each other.
    """
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's loss tokens (labels != -100), in fp32."""
    logits = forward_logits(model, batch)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def num_loss_tokens(batch: dict[str, Any]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(
    model, optimizer, scheduler, micro_batches, *, env: DistributedEnv, max_grad_norm, hybrid: bool = False
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global batch; returns global loss and grad norm.

    Gradients are only reduced on the last micro-step. With hybrid sharding, only the all-reduce across nodes waits
    for it: the reduce-scatter inside a node (fast links) still runs every micro-step, so gradients stay sharded
    instead of holding an unsharded copy of the model's gradients.
    """
    (global_loss_tokens,) = all_reduce_sum(sum(num_loss_tokens(b) for b in micro_batches), device=env.device)
    # FSDP averages gradients over ranks; scaling by world size makes the result the mean over all loss tokens.
    scale = env.world_size / max(global_loss_tokens, 1)
    local_loss = torch.zeros((), device=env.device)
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        if hybrid:
            model.set_requires_all_reduce(last)
        else:
            model.set_requires_gradient_sync(last)
        loss = loss_sum(model, batch)
        (loss * scale).backward()
        local_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    (total_loss,) = all_reduce_sum(local_loss.item(), device=env.device)
    return {"loss": total_loss / max(global_loss_tokens, 1), "grad_norm": float(grad_norm.full_tensor())}


@torch.no_grad()
def evaluate(model, dataset: datasets.Dataset, *, env: DistributedEnv, cfg: TrainConfig, flatten: bool) -> float:
    """Mean token loss over the eval rows (or ``cfg.eval_max_batches`` micro-batches per rank).

    Every rank runs the same number of forward passes, padding with fully masked batches, because FSDP's
    all-gathers are collective.
    """
    model.eval()
    rows_per_round = env.world_size * cfg.micro_batch_size
    num_rounds = math.ceil(len(dataset) / rows_per_round)
    if cfg.eval_max_batches is not None:
        num_rounds = min(num_rounds, cfg.eval_max_batches)
    total_loss, total_tokens = 0.0, 0
    for round_index in range(num_rounds):
        start = round_index * rows_per_round + env.rank * cfg.micro_batch_size
        indices = np.arange(start, min(start + cfg.micro_batch_size, len(dataset)))
        batch = fetch(dataset, indices if len(indices) else np.array([0]), flatten=flatten)
        if not len(indices):
            batch["labels"].fill_(IGNORE_INDEX)
        total_loss += loss_sum(model, to_device(batch, env.device)).item()
        total_tokens += num_loss_tokens(batch)
    model.train()
    loss, tokens = all_reduce_sum(total_loss, total_tokens, device=env.device)
    return loss / max(tokens, 1)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda" or None)
