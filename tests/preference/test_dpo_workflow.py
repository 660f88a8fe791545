"""DPO as a user runs it: the embedded config/dpo.yaml through the whole workflow (held-out preference accuracy well
above chance), then the plans of a second experiment: another dpo.beta reuses the cached reference log-probabilities,
another reference model computes them again, SimPO needs none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_reruns import copy_workflow, planned, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def dpo_repo(tmp_path_factory):
    """A copy of the repository's workflow with a finished run of config/dpo.yaml (the example model built too)."""
    root = tmp_path_factory.mktemp("repo")
    copy_workflow(root)
    result = snakemake(root, "--configfile=config/dpo.yaml", "all", minutes=15)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    return root


def experiment(root: Path, name: str, **changes) -> str:
    """config/dpo.yaml with another output_dir and ``changes`` ({section: {key: value}}), as a file in ``root``."""
    config = yaml.safe_load((root / "config" / "dpo.yaml").read_text())
    config["output_dir"] = f"results/{name}"
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return f"--configfile={name}.yaml"


def test_the_example_learns_the_preference_on_held_out_pairs(dpo_repo):
    summary = json.loads((dpo_repo / "results" / "tiny-dpo" / "train" / "summary.json").read_text())
    metrics = summary["final_eval_metrics"]
    print(f"held-out preference accuracy {metrics['eval_rewards/accuracies']:.3f}, margin "
          f"{metrics['eval_rewards/margins']:.2f}; eval loss {summary['initial_eval_loss']:.4f} -> "
          f"{summary['final_eval_loss']:.4f}")  # fmt: skip
    assert metrics["eval_rewards/accuracies"] >= 0.8
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] < 0.7  # log 2 = 0.693 at the start
    records = [json.loads(line) for line in (dpo_repo / "results/tiny-dpo/train/metrics.jsonl").read_text().split("\n")
               if line]  # fmt: skip
    logged = next(r for r in records if "loss" in r)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= logged.keys()  # fmt: skip
    entries = list((dpo_repo / "results" / "cache" / "reference_logprobs").iterdir())
    assert len(entries) == 1 and (entries[0] / "stats.json").is_file()


def test_another_beta_plans_no_reference_job_and_another_reference_does(dpo_repo):
    beta = experiment(dpo_repo, "beta", dpo={"beta": 0.3})
    assert planned(dpo_repo, beta) == {"estimate", "link_data", "train", "consolidate", "convert_hf", "report", "all"}
    lora = experiment(dpo_repo, "lora-dpo", lora={"enabled": True}, train={"lr": 5.0e-3})
    assert "reference_logprobs" not in planned(dpo_repo, lora)  # the reference of LoRA-DPO is the same base model
    other = experiment(dpo_repo, "other-reference", dpo={"reference_model": "results/tiny-dpo/hf_model"})
    assert planned(dpo_repo, other) == {"estimate", "link_data", "reference_logprobs", "train", "consolidate",
                                        "convert_hf", "report", "all"}  # fmt: skip
    simpo = experiment(dpo_repo, "simpo", dpo={"loss": "simpo", "beta": 2.0})
    assert "reference_logprobs" not in planned(dpo_repo, simpo)
    result = snakemake(dpo_repo, "-n", simpo, "reference_logprobs")
    assert result.returncode != 0  # no such rule without a reference


def test_a_reference_with_another_vocabulary_fails_before_any_job(dpo_repo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dpo_repo / "resources" / "tiny-llama", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    flag = experiment(dpo_repo, "bad-reference", dpo={"reference_model": str(other)})
    result = snakemake(dpo_repo, "-n", flag)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "dpo.reference_model" in output and "must share the model's tokenizer" in output, output
