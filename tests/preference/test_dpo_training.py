"""DPO training runs as SFT does: on 2 ranks with LoRA, resumed on another number of ranks with the same steps, and
mixtures of preference sources packed by weight."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from tests.conftest import write_jsonl
from tests.preference.test_pack_pairs import packed_pairs, preference_rows
from vectorlm.config import DataConfig, DpoSettings, LoraSettings, TrainConfig
from vectorlm.data.pack import run_pack
from vectorlm.data.tokenize import run_tokenize
from vectorlm.train.job import TrainJob, check_job
from vectorlm.train.launch import launch_training
from vectorlm.train.placement import Placement
from vectorlm.train.preference import METRICS
from vectorlm.train.reference_logprobs import ReferenceJob, run_reference_logprobs

TRAIN = {"objective": "dpo", "micro_batch_size": 2, "global_batch_size": 8, "lr": 2e-3, "scheduler": "constant",
         "mixed_precision": False, "log_every": 1, "eval_every": 3, "checkpoint_every": 3, "seed": 1}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir):
    """Packed pairs and the reference log-probabilities of the tiny model (its own reference)."""
    root = tmp_path_factory.mktemp("dpo")
    packed_pairs(root, tiny_model_dir, preference_rows(120, seed=3), max_seq_len=256)
    job = ReferenceJob(model=str(tiny_model_dir), packed=str(root / "data"), output_dir=str(root / "reference"),
                       digest="tiny", train=TrainConfig(micro_batch_size=4, global_batch_size=8,
                                                        mixed_precision=False))  # fmt: skip
    run_reference_logprobs(job, placement=Placement(2, 1, 1), log_path=root / "reference.log")
    return root


def train(output_dir: Path, model: Path, root: Path, *, ranks: int, lora: dict | None = None, **settings) -> dict:
    job = TrainJob(model=str(model), packed=str(root / "data"), output_dir=str(output_dir),
                   train=TrainConfig(**{**TRAIN, **settings}), lora=LoraSettings(**(lora or {})),
                   dpo=DpoSettings(beta=0.2), reference=str(root / "reference"))  # fmt: skip
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    placement = Placement(ranks, 1, max(1, 2 // ranks))
    check_job(job, ranks=ranks)
    launch_training(job, placement=placement, log_path=output_dir / "logs" / "train.log")
    records = [json.loads(line) for line in job.run.metrics.read_text().splitlines()]
    return {"summary": json.loads(job.run.summary.read_text()), "steps": [r for r in records if "loss" in r],
            "evals": [r for r in records if "eval_loss" in r]}  # fmt: skip


def test_lora_dpo_on_two_ranks_learns_and_logs_trl_metrics(prepared, tiny_model_dir, tmp_path):
    run = train(tmp_path / "lora", tiny_model_dir, prepared, ranks=2, max_steps=6, lr=1e-2,
                lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})  # fmt: skip
    assert run["summary"]["trainable_parameters"] < run["summary"]["parameters"] / 5
    for record in run["steps"]:
        assert set(METRICS) <= record.keys()
    first, last = run["evals"][0], run["evals"][-1]
    assert first["eval_loss"] == pytest.approx(np.log(2), abs=1e-4)  # the policy starts as the reference
    assert first["eval_rewards/margins"] == pytest.approx(0, abs=1e-3)
    assert last["eval_loss"] < first["eval_loss"] and last["eval_rewards/margins"] > 0
    assert run["summary"]["final_eval_metrics"]["eval_rewards/accuracies"] == last["eval_rewards/accuracies"]


def test_a_dpo_run_continued_on_one_rank_repeats_the_uninterrupted_steps(prepared, tiny_model_dir, tmp_path):
    whole = train(tmp_path / "whole", tiny_model_dir, prepared, ranks=2, max_steps=6)
    train(tmp_path / "parts", tiny_model_dir, prepared, ranks=2, max_steps=3)
    continued = train(tmp_path / "parts", tiny_model_dir, prepared, ranks=1, max_steps=6)
    later = [r for r in continued["steps"] if r["step"] > 3]
    assert [r["step"] for r in later] == [4, 5, 6]
    for ours, expected in zip(later, whole["steps"][3:]):
        for name in ("loss", *METRICS):
            assert ours[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (ours["step"], name)


def test_a_mixture_of_preference_sources_is_sampled_by_pairs(tmp_path, tiny_model_dir):
    sources = []
    for name, count in (("small", 30), ("large", 90)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", preference_rows(count, seed=len(name)))
        data = DataConfig(train=str(path), prompt_field="prompt", chosen_field="chosen", rejected_field="rejected",
                          eval_fraction=0.1)  # fmt: skip
        run_tokenize(model_dir=tiny_model_dir, data=data, output_dir=tmp_path / f"tok-{name}")
        sources.append(tmp_path / f"tok-{name}")
    stats = run_pack(tokenized_dir=sources, max_seq_len=256, output_dir=tmp_path / "packed", pairs=True,
                     weights=[1.0, 1.0], names=["small", "large"])  # fmt: skip
    shares = {name: source["share"] for name, source in stats["sources"].items()}
    assert shares["small"] == pytest.approx(0.5, abs=0.05) and shares["large"] == pytest.approx(0.5, abs=0.05)
    assert stats["sources"]["small"]["times_repeated"] > 1.5  # the small source's pairs drawn more than once
    packed = datasets.load_from_disk(str(tmp_path / "packed"))
    assert stats["train"]["pairs"] * 2 == stats["train"]["documents"] and len(packed["train"]) == stats["train"]["rows"]
