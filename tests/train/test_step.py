"""The optimizer step on real gloo ranks: sharded gradients under accumulation, non-finite steps skipped, timeouts,
failed background saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from transformers import get_scheduler

import vectorlm.train.step
from tests.conftest import run_on_ranks
from vectorlm.config import LoraSettings, TrainConfig
from vectorlm.data.loader import GlobalBatchSampler, fetch, rank_slices
from vectorlm.train.model import build_model
from vectorlm.train.step import build_optimizer, train_step


def unsharded_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of unsharded gradient storage FSDP2 holds for ``model`` on this rank."""
    total = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for param in group.fsdp_params if group else []:
            unsharded = getattr(param, "_unsharded_param", None)
            for grad in (param.unsharded_accumulated_grad, unsharded.grad if unsharded is not None else None):
                total += grad.numel() * grad.element_size() if grad is not None else 0
    return total


def sharded_gradient_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def accumulate(env, model_dir: Path, packed_dir: Path, cfg: TrainConfig, out: Path) -> None:
    """Three optimizer steps of 4 micro-steps each; records gradient storage as every micro-step begins."""
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler("constant", optimizer)
    rows = datasets.load_from_disk(str(packed_dir))["train"]
    sampler = GlobalBatchSampler(len(rows), global_batch_size=cfg.global_batch_size, seed=cfg.seed)
    seen, plain_loss_sum = [], vectorlm.train.step.loss_sum

    def recording_loss_sum(model, batch):  # the state left by the previous micro-step's backward
        seen.append({"unsharded": unsharded_gradient_bytes(model), "sharded": sharded_gradient_bytes(model)})
        return plain_loss_sum(model, batch)

    vectorlm.train.step.loss_sum = recording_loss_sum
    losses = []
    for _ in range(3):
        indices = rank_slices(sampler.next_batch(), rank=env.rank, world_size=env.world_size,
                              micro_batch_size=cfg.micro_batch_size)  # fmt: skip
        batches = [fetch(rows, i, flatten=False) for i in indices]
        (loss_tokens,) = vectorlm.train.step.all_reduce_sum(
            sum(b["num_loss_tokens"] for b in batches), device=env.device
        )
        output = train_step(model, optimizer, scheduler, batches, loss_scale=env.world_size / loss_tokens, cfg=cfg)
        (loss,) = vectorlm.train.step.all_reduce_sum(output.loss_sum.item(), device=env.device)
        losses.append(loss / loss_tokens)
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    if env.rank == 0:
        torch.save(weights, out / "weights.pt")
    (out / f"rank{env.rank}.json").write_text(json.dumps({"seen": seen, "losses": losses, "params": params}))


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_accumulation_keeps_only_gradient_shards_and_computes_the_same(mixed_precision, tmp_path, tiny_model_dir,
                                                                       packed_dir):  # fmt: skip
    runs = {}
    for defer in (False, True):
        out = tmp_path / f"defer{defer}"
        out.mkdir()
        cfg = TrainConfig(micro_batch_size=2, global_batch_size=16, lr=1e-3, seed=5, mixed_precision=mixed_precision,
                          defer_gradient_sync=defer)  # fmt: skip
        run_on_ranks(accumulate, 2, tiny_model_dir, packed_dir, cfg, out)
        runs[defer] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        runs[defer][0]["weights"] = torch.load(out / "weights.pt", weights_only=True)
    params = runs[False][0]["params"]
    for rank in range(2):
        after_non_final = [s for i, s in enumerate(runs[False][rank]["seen"]) if i % 4]
        deferred = [s for i, s in enumerate(runs[True][rank]["seen"]) if i % 4]
        print(
            f"rank {rank}: after a non-final micro-step, reduce-scatter every micro-step holds "
            f"{after_non_final[0]}; deferred sync holds {deferred[0]} (fp32 model: {4 * params} bytes)"
        )
        assert all(s["unsharded"] == 0 for s in after_non_final)
        assert all(0 < s["sharded"] <= math.ceil(4 * params / 2) + 4096 for s in after_non_final)
        # The measurement sees what deferring holds: a full fp32 gradient of the model on each rank.
        assert all(s["unsharded"] >= 4 * params for s in deferred)
    np.testing.assert_allclose(runs[False][0]["losses"], runs[True][0]["losses"], rtol=1e-5)
    # Equal to rtol 1e-5 at each tensor's scale: only the order of fp32 gradient sums differs, which AdamW amplifies
    # for elements whose gradients are near zero.
    for name, weight in runs[False][0]["weights"].items():
        torch.testing.assert_close(weight, runs[True][0]["weights"][name], rtol=1e-5, atol=1e-5 * weight.abs().max())


def skip_a_nan_step(env, model_dir: Path, packed_dir: Path, out: Path) -> None:
    """Step 2 gets a NaN loss (so NaN gradients everywhere); steps 1 and 3 are normal."""
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=8, lr=1e-3, mixed_precision=False)
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    optimizer = build_optimizer(model, cfg)
    scheduler = get_scheduler("constant", optimizer)
    rows = datasets.load_from_disk(str(packed_dir))["train"]
    plain_loss_sum, results = vectorlm.train.step.loss_sum, []
    for step in (1, 2, 3):
        if step == 2:
            vectorlm.train.step.loss_sum = lambda model, batch: plain_loss_sum(model, batch) * math.nan
        batches = [fetch(rows, np.arange(4 * step + 2 * env.rank, 4 * step + 2 * env.rank + 2), flatten=False)]
        output = train_step(model, optimizer, scheduler, batches, loss_scale=1 / 256, cfg=cfg)
        vectorlm.train.step.loss_sum = plain_loss_sum
        weights = torch.cat([p.detach().full_tensor().flatten() for p in model.parameters()])
        adam_steps = {float(s["step"]) for s in optimizer.state.values()}
        results.append({"weights": weights, "skipped": output.skipped.item(), "norm": output.grad_norm.item(),
                        "adam_steps": sorted(adam_steps), "lr": output.lr})  # fmt: skip
    if env.rank == 0:
        torch.save(results, out / "results.pt")


def test_a_step_with_non_finite_gradients_changes_nothing_and_training_continues(tmp_path, tiny_model_dir, packed_dir):
    run_on_ranks(skip_a_nan_step, 2, tiny_model_dir, packed_dir, tmp_path)
    first, nan, third = torch.load(tmp_path / "results.pt", weights_only=False)
    assert (first["skipped"], nan["skipped"], third["skipped"]) == (0.0, 1.0, 0.0)
    assert math.isnan(nan["norm"]) and math.isfinite(third["norm"])
    assert torch.equal(nan["weights"], first["weights"])  # no update, and the weights are not NaN
    assert nan["adam_steps"] == first["adam_steps"] == [1.0] and third["adam_steps"] == [2.0]
    assert not torch.equal(third["weights"], first["weights"]) and torch.isfinite(third["weights"]).all()


def record_timeouts(env, out: Path) -> None:
    groups = {"default": torch.distributed.group.WORLD, "cpu": env.cpu_group, "checkpoint": env.checkpoint_group}
    timeouts = {
        name: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for name, g in groups.items()
    }
    (out / f"rank{env.rank}.json").write_text(json.dumps(timeouts))


def test_collectives_and_file_work_wait_under_their_own_timeouts(tmp_path):
    run_on_ranks(record_timeouts, 2, tmp_path, init={"collective_timeout_minutes": 7, "checkpoint_timeout_minutes": 11})
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "default": 420.0, "cpu": 660.0, "checkpoint": 660.0,
        }  # fmt: skip


def fail_a_background_save(env, model_dir: Path, out: Path) -> None:
    from vectorlm.data.loader import DataPosition
    from vectorlm.train.checkpoint import Checkpointer
    from vectorlm.train.train_state import TrainState

    cfg = TrainConfig(mixed_precision=False)
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    optimizer = build_optimizer(model, cfg)
    checkpointer = Checkpointer(group=env.checkpoint_group, asynchronous=True, device=env.device)
    if env.rank == 0:
        (out / "step_1").write_text("a file where the checkpoint directory should go")
    torch.distributed.barrier()
    save = {
        "model": model,
        "optimizer": optimizer,
        "train_state": TrainState(step=1, world_size=2, data=DataPosition(), eval_losses={}),
        "settings": {},
        "upstream": out,
        "keep": 2,
    }
    checkpointer.save(out / "step_1", **save)  # rank 0's rename into place fails, in the background
    try:
        checkpointer.save(out / "step_2", **save)
        outcome = "saved"
    except RuntimeError as error:
        outcome = str(error)
    checkpointer.close(agree=False)
    (out / f"rank{env.rank}.txt").write_text(outcome)


def test_a_failed_background_save_stops_every_rank_at_the_next_save(tmp_path, tiny_model_dir):
    run_on_ranks(fail_a_background_save, 2, tiny_model_dir, tmp_path)
    assert (tmp_path / "rank0.txt").read_text().startswith("the previous checkpoint failed (NotADirectoryError")
    assert (tmp_path / "rank1.txt").read_text() == "the previous checkpoint failed (on another rank); see the log"
    assert not (tmp_path / "step_2").exists() and (tmp_path / ".step_1.partial").is_dir()


def save_and_record_syncs(env, model_dir: Path, out: Path) -> None:
    """A checkpoint saved while every fsync is recorded (the path of the descriptor and the time), and every rename."""
    import os

    from vectorlm.data.loader import DataPosition
    from vectorlm.train.checkpoint import Checkpointer
    from vectorlm.train.train_state import TrainState

    synced, renamed, real_fsync, real_rename = [], [], os.fsync, Path.rename

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def rename(self, target):
        renamed.append((str(self), str(target), len(synced)))
        return real_rename(self, target)

    os.fsync, Path.rename = fsync, rename
    try:
        cfg = TrainConfig(mixed_precision=False)
        model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
        checkpointer = Checkpointer(group=env.checkpoint_group, asynchronous=True, device=env.device)
        checkpointer.save(out / "step_1", model=model, optimizer=build_optimizer(model, cfg),
                          train_state=TrainState(step=1, world_size=1, data=DataPosition(), eval_losses={}),
                          settings={"train": cfg}, upstream=out, keep=2)  # fmt: skip
        checkpointer.close()
    finally:
        os.fsync, Path.rename = real_fsync, real_rename
    (out / "syncs.json").write_text(json.dumps({"synced": synced, "renamed": renamed}))


def test_every_file_of_a_checkpoint_is_on_the_disk_before_it_is_renamed_into_place(tmp_path, tiny_model_dir):
    run_on_ranks(save_and_record_syncs, 1, tiny_model_dir, tmp_path)
    record = json.loads((tmp_path / "syncs.json").read_text())
    partial = str(tmp_path / ".step_1.partial")
    [(_, target, synced_before)] = [r for r in record["renamed"] if r[0] == partial]
    assert target == str(tmp_path / "step_1")
    synced = {path.removesuffix(".tmp") for path in record["synced"][:synced_before]}  # DCP's .metadata.tmp, renamed
    files = {str(p).replace(target, partial) for p in Path(target).rglob("*") if p.is_file()}
    assert files <= synced, files - synced  # tensors, .metadata, train_state.json, RNG states, the configuration
    assert {partial, f"{partial}/rng"} <= synced  # the directories' entries too
    assert str(tmp_path) in record["synced"][synced_before:]  # and, after the rename, the directory that holds it


def record_units(env, model_dir: Path, out: Path) -> None:
    model, _ = build_model(model_dir, env, train=TrainConfig(), lora=LoraSettings(), attention="sdpa")
    units = {name or "root" for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    out.write_text(json.dumps(sorted(units)))


def test_embeddings_and_lm_head_are_fsdp_units_of_their_own_unless_tied(tiny_model_dir, tmp_path):
    """The LM head's gradient is reduce-scattered as soon as the loss's backward has it, not with the root's at the
    end; a tied head is one parameter with the embeddings and stays with the root."""
    import shutil

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    for model_dir, expected in ((tiny_model_dir, {"model.embed_tokens", "lm_head"}), (tied, set())):
        run_on_ranks(record_units, 1, model_dir, tmp_path / "units.json")
        units = set(json.loads((tmp_path / "units.json").read_text()))
        assert units == {"root", "model.layers.0", "model.layers.1"} | expected
