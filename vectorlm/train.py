"""The training job: every rank runs :func:`main` (started by :mod:`vectorlm.launch`).

    python -m vectorlm.train JOB.yaml

FSDP2 over all ranks, gradient accumulation without gradient sync on micro-steps, loss averaged over every loss token
of the global batch, clipping by the global gradient norm, eval loss at intervals, a metrics line per step, and a
sharded checkpoint at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from transformers import get_scheduler

from vectorlm.checkpoint import checkpoint_dir, save_checkpoint
from vectorlm.config import TrainConfig, read_stage_config, to_plain
from vectorlm.data.loader import GlobalBatchSampler, fetch, rank_slices
from vectorlm.data.pack import IGNORE_INDEX
from vectorlm.distributed import DistributedEnv, all_reduce_sum, build_mesh, init_distributed
from vectorlm.inputs import check_model_dir
from vectorlm.log import setup_logging
from vectorlm.metrics import MetricsLog, flops_per_token, peak_flops
from vectorlm.model import (
    apply_fsdp,
    build_empty_model,
    count_parameters,
    enable_activation_checkpointing,
    materialize,
    resolve_attention,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything a training run needs; written by the workflow as YAML and read by every rank."""

    model: str
    packed: str
    output_dir: str
    train: TrainConfig = field(default_factory=TrainConfig)
    trust_remote_code: bool = False

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / "train" / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return Path(self.output_dir) / "train" / "summary.json"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(to_plain(self), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainJob:
        raw = yaml.safe_load(Path(path).read_text())
        return cls(**{**raw, "train": TrainConfig(**raw["train"])})


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


def train_step(model, optimizer, scheduler, micro_batches, *, env: DistributedEnv, max_grad_norm) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches of a global batch; returns global loss and grad norm."""
    (global_loss_tokens,) = all_reduce_sum(sum(num_loss_tokens(b) for b in micro_batches), device=env.device)
    # FSDP averages gradients over ranks; scaling by world size makes the result the mean over all loss tokens.
    scale = env.world_size / max(global_loss_tokens, 1)
    local_loss = torch.zeros((), device=env.device)
    for index, batch in enumerate(micro_batches):
        model.set_requires_gradient_sync(index == len(micro_batches) - 1)
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
        total_loss += loss_sum(model, _to(batch, env.device)).item()
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
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda" or None
    )


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def run(job: TrainJob) -> dict[str, Any]:
    """Trains on this rank as part of the process group given by the environment; returns the run summary."""
    env = init_distributed()
    try:
        return _run(job, env)
    finally:
        dist.destroy_process_group()


def _run(job: TrainJob, env: DistributedEnv) -> dict[str, Any]:
    setup_logging(rank=env.rank)
    cfg = job.train
    check_model_dir(job.model)
    accumulation = cfg.grad_accumulation_steps(env.world_size)
    packed = datasets.load_from_disk(job.packed)
    sampler = GlobalBatchSampler(len(packed["train"]), global_batch_size=cfg.global_batch_size, seed=cfg.seed)
    max_steps = cfg.max_steps or math.ceil(cfg.num_epochs * sampler.steps_per_epoch)
    torch.manual_seed(cfg.seed + env.rank)

    attention = resolve_attention(cfg.attention, env.device)
    flatten = attention == "flash_attention_2"
    model = build_empty_model(job.model, attention=attention, trust_remote_code=job.trust_remote_code)
    num_params, _ = count_parameters(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    apply_fsdp(model, build_mesh(env, cfg.sharding), mixed_precision=cfg.mixed_precision)
    materialize(model, job.model, env.device)
    model.train()
    optimizer = build_optimizer(model, cfg, env.device)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
    )
    log.info(
        "training %s (%s parameters, attention %s) on %d rank(s) of %s: %d steps of %d rows "
        "(%d per micro-batch x %d micro-steps x %d ranks), %d steps per epoch",
        job.model, f"{num_params:,}", attention, env.world_size, env.device.type, max_steps,
        cfg.global_batch_size, cfg.micro_batch_size, accumulation, env.world_size, sampler.steps_per_epoch,
    )  # fmt: skip
    metrics = MetricsLog(job.metrics_path, enabled=env.is_main, fresh=True)
    peak = peak_flops(env.device)
    seq_len = read_stage_config(job.packed).get("max_seq_len", 0)
    flops = flops_per_token(model.config, num_params=num_params, seq_len=seq_len)

    eval_losses = {0: evaluate(model, packed["eval"], env=env, cfg=cfg, flatten=flatten)}
    log.info("step 0 | eval_loss %.4f", eval_losses[0])
    metrics.write({"step": 0, "eval_loss": eval_losses[0]})
    throughput = []
    for step in range(1, max_steps + 1):
        start = time.perf_counter()
        indices = rank_slices(
            sampler.next_batch(), rank=env.rank, world_size=env.world_size, micro_batch_size=cfg.micro_batch_size
        )
        micro_batches = [_to(fetch(packed["train"], i, flatten=flatten), env.device) for i in indices]
        result = train_step(model, optimizer, scheduler, micro_batches, env=env, max_grad_norm=cfg.max_grad_norm)
        (tokens,) = all_reduce_sum(sum(b["num_tokens"] for b in micro_batches), device=env.device)
        seconds = time.perf_counter() - start
        record = {
            "step": step,
            **result,
            "lr": scheduler.get_last_lr()[0],
            "tokens": int(tokens),
            "tokens_per_second": tokens / seconds,
            "mfu": flops * tokens / seconds / (peak * env.world_size) if peak else None,
            "epoch": sampler.position.epoch,
        }
        throughput.append(record["tokens_per_second"])
        if step % cfg.log_every == 0 or step == max_steps:
            log.info(_format(record, max_steps))
            metrics.write(record)
        if step == max_steps or (cfg.eval_every and step % cfg.eval_every == 0):
            eval_losses[step] = evaluate(model, packed["eval"], env=env, cfg=cfg, flatten=flatten)
            log.info("step %d | eval_loss %.4f", step, eval_losses[step])
            metrics.write({"step": step, "eval_loss": eval_losses[step]})

    path = checkpoint_dir(job.output_dir, max_steps)
    train_state = {"step": max_steps, "data": sampler.state_dict(), "scheduler": scheduler.state_dict()}
    save_checkpoint(
        path, model=model, optimizer=optimizer, train_state=train_state, settings={"train": cfg}, upstream=job.packed
    )
    summary = {
        "checkpoint": str(path),
        "step": max_steps,
        "initial_eval_loss": eval_losses[0],
        "final_eval_loss": eval_losses[max_steps],
        # The first steps include warm-up (allocation, kernel selection); the median is the steady state.
        "tokens_per_second": float(np.median(throughput)),
        "world_size": env.world_size,
        "attention": attention,
    }
    if env.is_main:
        job.summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            "eval loss %.4f -> %.4f after %d steps; checkpoint %s",
            summary["initial_eval_loss"], summary["final_eval_loss"], max_steps, path,
        )  # fmt: skip
    return summary


def _format(record: dict[str, Any], max_steps: int) -> str:
    mfu = f" | mfu {record['mfu']:.1%}" if record["mfu"] is not None else ""
    return (
        f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.3e} | "
        f"grad_norm {record['grad_norm']:.3f} | tokens/s {record['tokens_per_second']:,.0f}{mfu}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="training job YAML written by the workflow's train rule")
    run(TrainJob.load(parser.parse_args(argv).job))


if __name__ == "__main__":
    main()
