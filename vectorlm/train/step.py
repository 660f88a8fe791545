"""One optimizer step and one evaluation, the arithmetic at the heart of training."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from vectorlm.config import TrainConfig
from vectorlm.data.loader import BatchShape, count_nothing, fetch
from vectorlm.train.attention import document_mask_kwargs
from vectorlm.train.distributed import DistributedEnv, all_reduce_sum
from vectorlm.train.loss import has_loss, plain_loss_sum, plain_token_logps


def forward_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits of a packed batch, documents isolated from each other (for a model without :func:`install_loss`).

    No KV cache: with one, transformers ignores the restarting position_ids and packed documents see each other.
    """
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                 **document_mask_kwargs(model.config, batch)).logits  # fmt: skip


def loss_sum(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's loss tokens (labels != -100), in fp32: the loss
    :func:`vectorlm.train.loss.install_loss` put in the model, computed in its forward, else the plain loss from its
    logits."""
    if not has_loss(model):
        return plain_loss_sum(forward_logits(model, batch), batch["labels"])
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 use_cache=False, **document_mask_kwargs(model.config, batch)).loss  # fmt: skip


def token_logps(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Each position's log-probability of its next-token target (0 where there is none), flattened, in fp32: what
    :func:`vectorlm.train.loss.install_loss` with ``per_token`` put in the model, else from its logits."""
    if not has_loss(model):
        return plain_token_logps(forward_logits(model, batch), batch["labels"])
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 use_cache=False, **document_mask_kwargs(model.config, batch)).loss  # fmt: skip


class TokenObjective:
    """Supervised fine-tuning's loss of a micro-batch: the summed next-token cross-entropy over its loss tokens
    (``num_loss_tokens``: the count a step's loss is averaged over); it has no other metrics."""

    count = "num_loss_tokens"
    metrics: tuple[str, ...] = ()
    pairs = False  # whether its rows are preference pairs

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, None]:
        return loss_sum(model, batch), None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def set_gradient_sync(model: torch.nn.Module, *, last: bool, sharding: str, defer: bool) -> None:
    """What FSDP2 communicates after a micro-step's backward.

    By default every micro-step reduce-scatters its gradients (inside the shard group), so a rank only ever holds
    its gradient shard; with hybrid or no sharding, the all-reduce across replicas (slow links between nodes) waits
    for the last micro-step. ``defer`` (``train.defer_gradient_sync``) skips all communication until the last
    micro-step, which keeps an unsharded fp32 gradient of every parameter on every rank until then.
    """
    if defer:
        model.set_requires_gradient_sync(last)
    elif sharding != "full":
        model.set_requires_all_reduce(last)


@dataclass
class StepOutput:
    """One optimizer step's results, left on the device (reading them synchronises with it)."""

    loss_sum: torch.Tensor  # this rank's summed loss (over tokens, or pairs)
    grad_norm: torch.Tensor  # the global gradient norm, the same on every rank
    skipped: torch.Tensor  # 1.0 when the norm was not finite and the update was skipped, else 0.0
    lr: float  # the learning rate the step used
    metric_sums: torch.Tensor | None = None  # this rank's sums of the objective's metrics


def accumulate_gradients(model, micro_batches, *, loss_scale: float, cfg: TrainConfig, objective=None,
                         after_micro_step: Callable[[], None] | None = None):  # fmt: skip
    """Forward and backward of each micro-batch, adding ``loss_scale`` x its summed loss's gradients to the
    parameters' (sharded) gradients; returns this rank's summed loss and sums of the ``objective``'s metrics (None
    without any), on the device. ``after_micro_step`` is called after each backward pass (the memory estimate's
    tracker starts a new micro-step there)."""
    objective = objective or TokenObjective()
    local_loss, local_metrics = torch.zeros((), device=next(model.parameters()).device), None
    for index, batch in enumerate(micro_batches):
        set_gradient_sync(model, last=index == len(micro_batches) - 1, sharding=cfg.sharding,
                          defer=cfg.defer_gradient_sync)  # fmt: skip
        loss, metrics = objective(model, batch)
        (loss * loss_scale).backward()
        local_loss += loss.detach()
        if metrics is not None:
            local_metrics = metrics if local_metrics is None else local_metrics + metrics
        if after_micro_step is not None:
            after_micro_step()
    return local_loss, local_metrics


def train_step(model, optimizer, scheduler, micro_batches, *, loss_scale: float, cfg: TrainConfig,
               objective=None) -> StepOutput:  # fmt: skip
    """One optimizer step over this rank's micro-batches of a global batch.

    ``loss_scale`` is world size / loss tokens (or pairs: the ``objective``'s count) of the global batch: FSDP
    averages gradients over ranks, so the result is the gradient of the mean loss over every loss token (or pair) of
    the global batch. A step whose global gradient
    norm is NaN or Inf changes no weight and no optimizer state (the fused AdamW skips it on the device, without a
    host synchronisation); the schedule advances as for any step.
    """
    local_loss, metric_sums = accumulate_gradients(model, micro_batches, loss_scale=loss_scale, cfg=cfg,
                                                   objective=objective)  # fmt: skip
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    skipped = (~torch.isfinite(grad_norm)).float()
    lr = scheduler.get_last_lr()[0]
    # The protocol torch.amp.GradScaler uses with fused optimizers: found_inf > 0 makes the step a no-op.
    optimizer.grad_scale, optimizer.found_inf = None, skipped
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(local_loss, grad_norm.detach(), skipped, lr, metric_sums)


@torch.no_grad()
def evaluate(model, dataset: datasets.Dataset, *, env: DistributedEnv, cfg: TrainConfig, flatten: bool,
             shape: BatchShape | None = None, objective=None, reference: datasets.Dataset | None = None
             ) -> dict[str, float]:  # fmt: skip
    """The mean loss over the eval rows (or ``cfg.eval_max_batches`` micro-batches per rank), per loss token (or per
    pair, and the means of the ``objective``'s metrics, prefixed ``eval_``), as ``{"eval_loss": ..., ...}``.

    Every rank runs the same number of forward passes, padding with batches that count for nothing, because FSDP's
    all-gathers are collective; with ``shape``, every batch has that shape (the last, short one padded).
    ``reference``: the reference model's log-probabilities of the rows (preference pairs).
    """
    objective = objective or TokenObjective()
    model.eval()
    rows_per_round = env.world_size * cfg.micro_batch_size
    num_rounds = math.ceil(len(dataset) / rows_per_round)
    if cfg.eval_max_batches is not None:
        num_rounds = min(num_rounds, cfg.eval_max_batches)
    totals = torch.zeros(1 + len(objective.metrics), dtype=torch.float64, device=env.device)
    count = 0
    for round_index in range(num_rounds):
        start = round_index * rows_per_round + env.rank * cfg.micro_batch_size
        indices = np.arange(start, min(start + cfg.micro_batch_size, len(dataset)))
        batch = fetch(dataset, indices if len(indices) else np.array([0]), flatten=flatten, shape=shape,
                      pairs=objective.pairs, reference=reference)  # fmt: skip
        if not len(indices):
            count_nothing(batch)
        loss, metrics = objective(model, to_device(batch, env.device))
        totals[0] += loss
        if metrics is not None:
            totals[1:] += metrics
        count += batch[objective.count]
    model.train()
    sums = all_reduce_sum(*totals.tolist(), count, device=env.device)
    means = [value / max(sums[-1], 1) for value in sums[:-1]]
    return dict(zip(["eval_loss", *(f"eval_{name}" for name in objective.metrics)], means))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases or other 1-D parameters).

    Fused (one kernel for all parameters, on GPU and CPU): it can skip a step with non-finite gradients on the
    device (:func:`train_step`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
