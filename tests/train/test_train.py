"""Real multi-rank training runs (vectorlm.train.launch, gloo on CPU) on the tiny model."""

import json
import math
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, get_scheduler

from tests.conftest import run_training
from vectorlm.config import ConfigError
from vectorlm.data.loader import GlobalBatchSampler, fetch
from vectorlm.train.model import computes_bf16_natively

# fp32 and a fixed schedule: runs that should compute the same thing must agree to float rounding.
EXACT = {"max_steps": 4, "lr": 1e-3, "micro_batch_size": 2, "global_batch_size": 8, "mixed_precision": False, "seed": 5}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_model_dir, packed_dir):
    return run_training(tmp_path_factory.mktemp("two"), tiny_model_dir, packed_dir, **EXACT)


def test_first_step_loss_is_the_mean_token_loss_of_the_global_batch(two_rank_run, tiny_model_dir, packed_dir):
    rows = GlobalBatchSampler(
        len(datasets.load_from_disk(str(packed_dir))["train"]), global_batch_size=8, seed=EXACT["seed"]
    ).next_batch()
    batch = fetch(datasets.load_from_disk(str(packed_dir))["train"], rows, flatten=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert two_rank_run["steps"][0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_one_rank_and_two_ranks_train_identically(two_rank_run, tmp_path, tiny_model_dir, packed_dir):
    one = run_training(tmp_path, tiny_model_dir, packed_dir, num_processes=1, **EXACT)
    np.testing.assert_allclose([s["loss"] for s in one["steps"]], [s["loss"] for s in two_rank_run["steps"]], rtol=1e-5)
    np.testing.assert_allclose(
        [s["grad_norm"] for s in one["steps"]], [s["grad_norm"] for s in two_rank_run["steps"]], rtol=1e-4
    )
    assert one["summary"]["final_eval_loss"] == pytest.approx(two_rank_run["summary"]["final_eval_loss"], rel=1e-5)


def test_hybrid_sharding_over_two_simulated_nodes(tmp_path, tiny_model_dir, packed_dir):
    """4 gloo ranks as 2 nodes x 2: shard within a node, replicate across nodes, with 2 micro-steps per step (the
    cross-node all-reduce only on the last); the same arithmetic as full sharding on 2 ranks (4 micro-steps)."""
    accumulating = {**EXACT, "global_batch_size": 16}
    full = run_training(tmp_path / "full", tiny_model_dir, packed_dir, **accumulating)
    hybrid = run_training(tmp_path / "hybrid", tiny_model_dir, packed_dir, num_processes=4, nodes=2,
                          sharding="hybrid", **accumulating)  # fmt: skip
    log = (tmp_path / "hybrid" / "logs" / "train.log").read_text()
    assert "hybrid sharding over mesh {'replicate': 2, 'shard': 2}" in log and "x 2 micro-steps x 4 ranks" in log
    np.testing.assert_allclose([s["loss"] for s in hybrid["steps"]], [s["loss"] for s in full["steps"]], rtol=1e-5)
    np.testing.assert_allclose(
        [s["grad_norm"] for s in hybrid["steps"]], [s["grad_norm"] for s in full["steps"]], rtol=1e-4
    )


VARIANTS = [
    {"sharding": "none"},
    {"activation_checkpointing": True},  # the boolean of earlier versions: full
    {"activation_checkpointing": "selective"},
    {"loss": "plain"},  # the run it is compared with computes the chunked loss (auto on a CPU)
    {"compile": True},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()))
def test_replication_checkpointing_loss_and_compile_change_nothing(
    variant, two_rank_run, tmp_path, tiny_model_dir, packed_dir
):
    """Each speed or memory option trains the same: losses and gradient norms equal (fp32, 2 ranks); compiled
    kernels may reorder floating-point sums, hence rel 1e-4 for them."""
    run = run_training(tmp_path, tiny_model_dir, packed_dir, **{**EXACT, **variant})
    rtol = 1e-4 if variant.get("compile") else 1e-5
    log = (tmp_path / "logs" / "train.log").read_text()
    assert f"loss {variant.get('loss', 'chunked')}, activation checkpointing " in log
    assert ("decoder blocks and loss compiled" in log) == bool(variant.get("compile"))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([s[key] for s in run["steps"]], [s[key] for s in two_rank_run["steps"]], rtol=rtol)


def test_mixed_precision_computes_in_fp32_on_a_cpu_without_native_bf16(two_rank_run, tmp_path, tiny_model_dir,
                                                                       packed_dir):  # fmt: skip
    """On an AVX2-only CPU (CI's) bf16 runs about 60x slower than fp32: mixed precision then computes in fp32, says so,
    and trains exactly as the fp32 run; where bf16 is native it computes in bf16 (other losses)."""
    native = computes_bf16_natively(torch.device("cpu"))
    run = run_training(tmp_path, tiny_model_dir, packed_dir, **{**EXACT, "mixed_precision": True})
    log = (tmp_path / "logs" / "train.log").read_text()
    assert ("train.mixed_precision: this CPU has no native bf16 arithmetic" in log) == (not native)
    state = json.loads(max((tmp_path / "checkpoints").glob("step_*/train_state.json")).read_text())
    assert state["train"]["mixed_precision"] is True  # recorded as configured: it resumes on either kind of CPU
    losses, fp32 = [s["loss"] for s in run["steps"]], [s["loss"] for s in two_rank_run["steps"]]
    if native:
        assert not np.allclose(losses, fp32, rtol=1e-5)
    else:
        np.testing.assert_allclose(losses, fp32, rtol=1e-5)


def test_training_learns_and_reports(tmp_path, tiny_model_dir, packed_dir):
    run = run_training(
        tmp_path, tiny_model_dir, packed_dir, max_steps=30, lr=3e-3, micro_batch_size=4, global_batch_size=8,
        warmup_steps=3, eval_every=10, log_every=5,
    )  # fmt: skip
    summary, steps, evals = run["summary"], run["steps"], run["evals"]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert [s["step"] for s in steps] == [5, 10, 15, 20, 25, 30]
    log = (tmp_path / "logs" / "train.log").read_text()
    assert re.search(r"step 5/30 \| loss [\d.]+ \| .* \| eta \d+(m\d\ds|s)\n", log)  # the time the rest will take
    assert "step 30/30 |" in log and "| eta 0s" in log
    assert summary["final_eval_loss"] < 0.75 * summary["initial_eval_loss"]
    assert all(s["tokens_per_second"] > 0 and s["grad_norm"] > 0 and s["mfu"] is None for s in steps)
    # The rate each step used: the schedule's value before it advanced (step 1 uses index 0).
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=3, num_training_steps=30)
    used = []
    for _ in range(30):
        used.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [s["lr"] for s in steps] == pytest.approx([used[s["step"] - 1] for s in steps], rel=1e-12)
    checkpoint = tmp_path / "checkpoints" / "step_30"
    assert (checkpoint / ".metadata").is_file() and (checkpoint / "train_state.json").is_file()
    assert summary["checkpoint"] == str(checkpoint)
    log = (tmp_path / "logs" / "train.log").read_text()
    assert "step 30/30 | loss" in log and "tokens/s" in log


def test_indivisible_global_batch_fails_before_any_rank_starts(tmp_path, tiny_model_dir, packed_dir):
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(8\) must be divisible .* x world size \(3\)"):
        run_training(tmp_path, tiny_model_dir, packed_dir, num_processes=3, max_steps=1, micro_batch_size=2)
    assert not (tmp_path / "train" / "job.yaml").exists()


def test_hybrid_sharding_on_one_node_fails_clearly(tmp_path, tiny_model_dir, packed_dir):
    with pytest.raises(RuntimeError, match=r"training failed: .*ConfigError: train.sharding: hybrid needs ranks on at "
                                           r"least 2 nodes"):  # the ranks' own error is the job's  # fmt: skip
        run_training(tmp_path, tiny_model_dir, packed_dir, max_steps=1, sharding="hybrid")


def test_fewer_packed_rows_than_one_global_batch_fail_before_any_rank_starts(tmp_path, tiny_model_dir, packed_dir):
    """Before, the sentence was only inside two ranks' tracebacks."""
    rows = json.loads((packed_dir / "stats.json").read_text())["train"]["rows"]
    with pytest.raises(ConfigError, match=rf"train\.global_batch_size \({rows * 2}\) is more than the {rows} packed"):
        run_training(tmp_path, tiny_model_dir, packed_dir, max_steps=1, global_batch_size=rows * 2)
    assert not (tmp_path / "train" / "job.yaml").exists()


def test_training_stops_after_too_many_non_finite_steps_in_a_row(tmp_path, tiny_model_dir, packed_dir):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"][0] = math.nan  # every loss, hence every gradient norm, is NaN
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="training failed: vectorlm.train.trainer.NonFiniteGradients: 3 steps in a"):
        run_training(tmp_path / "out", broken, packed_dir, max_steps=10, max_nonfinite_steps=3, micro_batch_size=4)
    log = (tmp_path / "out" / "logs" / "train.log").read_text()
    assert "3 steps in a row (by step 3) had a NaN or Inf gradient norm and were skipped" in log
    records = [json.loads(line) for line in (tmp_path / "out" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records if "loss" in r] == [(1, 1), (2, 2), (3, 3)]
