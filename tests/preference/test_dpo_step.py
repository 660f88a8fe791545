"""One DPO step on real gloo ranks equals the paper's formulas written out on each sequence alone (rtol 1e-5, fp32):
the loss and every gradient, on 1 and 2 ranks, with and without packing, for each of dpo.loss's losses."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import vectorlm.train.loss
from tests.conftest import run_on_ranks
from tests.preference.test_pack_pairs import packed_pairs, preference_rows, row_documents
from vectorlm.config import DpoSettings, LoraSettings, TrainConfig
from vectorlm.data.loader import fetch, rank_slices
from vectorlm.packed import IGNORE_INDEX
from vectorlm.train.distributed import all_reduce_sum
from vectorlm.train.model import build_model
from vectorlm.train.preference import METRICS, PreferenceObjective
from vectorlm.train.step import accumulate_gradients

ROWS = 8  # the global batch: every training row of the first 8


def reference_rows(packed: datasets.Dataset, seed: int) -> datasets.Dataset:
    """Made-up reference log-probabilities, one per document of each row (what rule reference_logprobs writes)."""
    rng = np.random.default_rng(seed)
    logps = [(-rng.uniform(5, 60, len(row_documents(row)))).tolist() for row in packed]
    return datasets.Dataset.from_dict({"logps": logps})


def dpo_step(env, model_dir: Path, packed_dir: Path, reference_dir: Path, dpo: DpoSettings, loss: str,
             out: Path) -> None:  # fmt: skip
    vectorlm.train.loss.LOSS_CHUNK_TOKENS = 48  # several chunks per micro-batch, the last one padded
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=ROWS, mixed_precision=False, objective="dpo", loss=loss)
    model, _ = build_model(model_dir, env, train=cfg, lora=LoraSettings(), attention="sdpa")
    rows = datasets.load_from_disk(str(packed_dir))["train"]
    reference = datasets.load_from_disk(str(reference_dir))
    indices = rank_slices(np.arange(ROWS), rank=env.rank, world_size=env.world_size, micro_batch_size=2)
    batches = [fetch(rows, i, flatten=False, reference=reference) for i in indices]
    (pairs,) = all_reduce_sum(sum(b["num_pairs"] for b in batches), device=env.device)
    objective = PreferenceObjective(dpo)
    loss_sum, metric_sums = accumulate_gradients(model, batches, loss_scale=env.world_size / pairs, cfg=cfg,
                                                 objective=objective)  # fmt: skip
    totals = all_reduce_sum(loss_sum.item(), *metric_sums.tolist(), device=env.device)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if env.rank == 0:
        torch.save(grads, out / "grads.pt")
        (out / "result.json").write_text(json.dumps({"loss": totals[0] / pairs, "pairs": pairs,
                                                     "metrics": [t / pairs for t in totals[1:]]}))  # fmt: skip


def formula(model_dir: Path, packed: datasets.Dataset, reference: datasets.Dataset, dpo: DpoSettings):
    """The loss, metrics and gradients of the pairs of the first ROWS rows, each sequence run alone with full
    logits, DPO (Rafailov et al. 2023, eq. 7), IPO (Azar et al. 2023, eq. 17) and SimPO (Meng et al. 2024, eq. 6)
    written out."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    losses, metrics = [], []
    for row, ref in zip(packed.select(range(ROWS)), reference.select(range(ROWS))["logps"]):
        logps, counts = [], []
        for ids, labels in row_documents(row):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
            targets = torch.tensor(labels[1:])
            kept = targets != IGNORE_INDEX
            token_logps = logits[:-1].log_softmax(-1)[kept].gather(1, targets[kept][:, None])[:, 0]
            logps.append(token_logps.double().sum())
            counts.append(int(kept.sum()))
        for k in range(0, len(logps), 2):
            pc, pr, rc, rr = logps[k], logps[k + 1], ref[k], ref[k + 1]
            if dpo.loss == "sigmoid":
                rewards = dpo.beta * (pc - rc), dpo.beta * (pr - rr)
                loss = -F.logsigmoid(rewards[0] - rewards[1])
            elif dpo.loss == "ipo":  # log-probabilities averaged over the tokens, as TRL does
                pc, pr, rc, rr = pc / counts[k], pr / counts[k + 1], rc / counts[k], rr / counts[k + 1]
                rewards = dpo.beta * (pc - rc), dpo.beta * (pr - rr)
                loss = ((pc - rc) - (pr - rr) - 1 / (2 * dpo.beta)) ** 2
            else:
                pc, pr = pc / counts[k], pr / counts[k + 1]
                rewards = dpo.beta * pc, dpo.beta * pr
                loss = -F.logsigmoid(dpo.beta * pc - dpo.beta * pr - dpo.simpo_gamma)
            losses.append(loss)
            chosen, rejected = (float(r.detach()) for r in rewards)
            metrics.append(
                [chosen, rejected, float(chosen > rejected), chosen - rejected, float(pc.detach()), float(pr.detach())]
            )
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss), len(losses), np.mean(metrics, axis=0), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "ranks, packing, loss, dpo",
    [
        (1, True, "chunked", DpoSettings(beta=0.1)),
        (2, True, "chunked", DpoSettings(beta=0.1)),
        (1, False, "chunked", DpoSettings(beta=0.5)),
        (2, False, "plain", DpoSettings(beta=0.1)),
        (2, True, "plain", DpoSettings(beta=0.3, loss="ipo")),
        (2, True, "chunked", DpoSettings(beta=2.0, loss="simpo", simpo_gamma=0.8)),
    ],
)  # fmt: skip
def test_one_dpo_step_equals_the_formula(tmp_path, tiny_model_dir, ranks, packing, loss, dpo):
    _, packed, stats = packed_pairs(tmp_path, tiny_model_dir, preference_rows(80), max_seq_len=256, packing=packing)
    assert stats["train"]["pairs_truncated"] == 0
    reference = reference_rows(packed["train"], seed=ranks)
    reference.save_to_disk(str(tmp_path / "reference"))
    run_on_ranks(dpo_step, ranks, tiny_model_dir, tmp_path / "data", tmp_path / "reference", dpo, loss, tmp_path)
    ours = json.loads((tmp_path / "result.json").read_text())
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    expected_loss, pairs, metrics, expected_grads = formula(tiny_model_dir, packed["train"], reference, dpo)
    assert ours["pairs"] == pairs and (pairs > ROWS if packing else pairs == ROWS)
    print(f"{ranks} rank(s), packing {packing}, {loss}, {dpo.loss}: loss {ours['loss']:.6f} vs {expected_loss:.6f}")
    np.testing.assert_allclose(ours["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(ours["metrics"], metrics, rtol=1e-5, atol=1e-6, err_msg=str(METRICS))
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)
