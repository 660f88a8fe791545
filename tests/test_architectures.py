"""The architectures people fine-tune, mixture-of-experts included, each through every check (issue 14).

Each architecture is a tiny random model saved by transformers (``save_pretrained``, so its files have the Hub's
layout: one tensor per expert for Mixtral and Qwen3-MoE) with the test tokenizer. For each one:

- packed documents stay apart with the attention ``auto`` picks on a CPU;
- 1 and 2 ranks give equal losses;
- a run killed (SIGKILL) after a checkpoint and rerun gives the uninterrupted run's model;
- the export (consolidate, convert_hf) has the base model's file layout and reproduces the training eval loss;
- LoRA (``all-linear``) trains only the adapters, and its merged export reproduces its eval loss.

The runs of one architecture are started together where they are independent (two 1-rank runs share the 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from tests.conftest import run_training
from tests.export.test_export import eval_loss
from tests.train.test_resume import max_difference, wait_for_checkpoint
from vectorlm.config import ExportConfig, LoraSettings, TrainConfig
from vectorlm.export.consolidate import consolidate
from vectorlm.export.convert import check_export, convert_hf
from vectorlm.hub.meta_model import causal_lm_class
from vectorlm.hub.shards import tensor_shapes, weight_files
from vectorlm.run_dir import RunDir
from vectorlm.train.attention import resolve_attention, supported_attention
from vectorlm.train.checkpoint_reader import SafeFileSystemReader
from vectorlm.train.job import TrainJob
from vectorlm.train.launch import local_rank_commands
from vectorlm.train.placement import Placement

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
WINDOW = {"sliding_window": 16, "head_dim": 8}  # windows shorter than the packed rows (128), so that they matter
EXPERTS = {"intermediate_size": 16, "num_experts_per_tok": 2}
QWEN3_MOE = {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8,
             "decoder_sparse_step": 1, "mlp_only_layers": []}  # fmt: skip
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=8),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=16),
    "phi3": lambda: Phi3Config(**SHAPE),
    "gemma2": lambda: Gemma2Config(**SHAPE, **WINDOW),
    "gemma3": lambda: Gemma3TextConfig(**SHAPE, **WINDOW),
    # GPT-2's config sets dropout (0.1), which training applies as transformers does: each rank then draws its own
    # masks, and losses depend on the number of ranks. Off here, to compare them.
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **NO_DROPOUT),
    "olmo2": lambda: Olmo2Config(**SHAPE),
    "mixtral": lambda: MixtralConfig(**{**SHAPE, **EXPERTS}, num_local_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**SHAPE, **QWEN3_MOE),
}
TRAIN = {"max_steps": 12, "lr": 3e-3, "micro_batch_size": 2, "global_batch_size": 4, "warmup_steps": 1,
         "mixed_precision": False, "checkpoint_every": 3, "keep_checkpoints": 1, "eval_every": 12, "seed": 3,
         "log_every": 1}  # fmt: skip
# No dropout: peft has none for LoRA on parameters, which all-linear adapts in mixture-of-experts models.
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
LORA_TRAIN = {**TRAIN, "max_steps": 4, "checkpoint_every": 4, "eval_every": 4, "lr": 1e-2}


def build(name: str, path: Path, tokenizer_from: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = ARCHITECTURES[name]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def results(output_dir: Path) -> dict:
    records = [json.loads(line) for line in (output_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((output_dir / "train" / "summary.json").read_text()),
            "steps": [r for r in records if "loss" in r]}  # fmt: skip


def cpu_attention(model_dir: Path) -> str:
    return resolve_attention("auto", torch.device("cpu"), supported=supported_attention(causal_lm_class(model_dir)))


def start_rank(output_dir: Path, model: Path, packed: Path, *, lora: dict | None = None) -> subprocess.Popen:
    """A 1-rank training job on one CPU thread, its rank started as the launcher starts it but without a launcher
    process (whose imports cost as much as the rank's), so that two such jobs share the 2 cores."""
    settings = LORA_TRAIN if lora else TRAIN
    job = TrainJob(model=str(model), packed=str(packed), output_dir=str(output_dir), train=TrainConfig(**settings),
                   lora=LoraSettings(**(lora or {})))  # fmt: skip
    (output_dir / "train").mkdir(parents=True, exist_ok=True)
    job.save(RunDir(output_dir).job)
    command = [sys.executable, "-m", "vectorlm.train.rank", str(RunDir(output_dir).job)]
    [(command, env)] = local_rank_commands(command, Placement(1, 1, 1), {**os.environ, "OMP_NUM_THREADS": "1"})
    with open(output_dir / "train.log", "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(process: subprocess.Popen, output_dir: Path) -> dict:
    assert process.wait() == 0, (output_dir / "train.log").read_text()[-3000:]
    return results(output_dir)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def runs(request, tmp_path_factory, tiny_model_dir, packed_dir):
    """The runs of one architecture: 2 ranks; then 1 rank beside 1 rank killed after a checkpoint; then the killed
    one rerun beside a LoRA run."""
    root = tmp_path_factory.mktemp(request.param)
    model = build(request.param, root / "model", tiny_model_dir)
    two = run_training(root / "two", model, packed_dir, **TRAIN)
    one = start_rank(root / "one", model, packed_dir)
    killed = start_rank(root / "resumed", model, packed_dir)
    wait_for_checkpoint(root / "resumed", 3, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (root / "resumed" / "train" / "summary.json").exists(), "the run ended before it was killed"
    resumed = start_rank(root / "resumed", model, packed_dir)
    lora = start_rank(root / "lora", model, packed_dir, lora=LORA)
    return {"name": request.param, "root": root, "model": model, "packed": packed_dir, "two": two,
            "one": finish(one, root / "one"), "resumed": finish(resumed, root / "resumed"),
            "lora": finish(lora, root / "lora")}  # fmt: skip


def test_packed_documents_stay_apart_with_the_attention_auto_picks(runs, tmp_path):
    from tests.data.test_pack import check_isolation, pack

    attention = cpu_attention(runs["model"])
    model = AutoModelForCausalLM.from_pretrained(runs["model"], attn_implementation=attention).eval()
    rng = np.random.default_rng(5)
    docs = [rng.integers(2, 300, size=n).tolist() for n in (40, 17, 60, 9, 25)]
    packed, _ = pack(tmp_path, docs, max_seq_len=128)
    assert check_isolation(model, list(packed), flatten=False) == len(docs)
    assert f"attention {attention}) on 2 rank(s)" in (runs["root"] / "two" / "logs" / "train.log").read_text()


def test_one_and_two_ranks_give_equal_losses(runs):
    two, one = runs["two"], runs["one"]
    assert len(two["steps"]) == TRAIN["max_steps"]
    np.testing.assert_allclose([s["loss"] for s in one["steps"]], [s["loss"] for s in two["steps"]], rtol=1e-5)
    assert two["summary"]["final_eval_loss"] < two["summary"]["initial_eval_loss"]
    assert one["summary"]["final_eval_loss"] == pytest.approx(two["summary"]["final_eval_loss"], rel=1e-5)


def test_a_killed_run_resumes_exactly(runs):
    root, one, resumed = runs["root"], runs["one"], runs["resumed"]
    assert "resumed from" in (root / "resumed" / "train.log").read_text()
    assert [s["step"] for s in resumed["steps"]] == list(range(1, TRAIN["max_steps"] + 1))
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in one["steps"]]
    assert max_difference(Path(resumed["summary"]["checkpoint"]), Path(one["summary"]["checkpoint"])) == 0


def test_the_export_has_the_base_layout_and_reproduces_the_eval_loss(runs):
    root, model, two = runs["root"], runs["model"], runs["two"]
    consolidate(two["summary"]["checkpoint"], model_dir=model, output_dir=root / "consolidated", export=ExportConfig())
    convert_hf(root / "consolidated", model_dir=model, output_dir=root / "hf")
    check_export(root / "hf")
    assert tensor_shapes(weight_files(root / "hf")) == tensor_shapes(weight_files(model))  # e.g. one tensor per expert
    exported = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation=cpu_attention(model))
    assert eval_loss(exported, runs["packed"]) == pytest.approx(two["summary"]["final_eval_loss"], rel=1e-5)


def test_lora_trains_only_the_adapters_and_its_merged_export_reproduces_the_eval_loss(runs):
    root, model, lora = runs["root"], runs["model"], runs["lora"]
    checkpoint = lora["summary"]["checkpoint"]
    saved = SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata
    adapters = [key for key in saved if key.startswith("model.")]
    assert adapters and all(".lora_A." in key or ".lora_B." in key for key in adapters)
    if runs["name"] in ("mixtral", "qwen3_moe"):  # peft adapts the fused experts (and the router) as parameters
        assert any(".mlp.experts." in key for key in adapters) and any(".mlp.gate." in key for key in adapters)
    assert lora["summary"]["trainable_parameters"] < lora["summary"]["parameters"] / 3
    consolidate(checkpoint, model_dir=model, output_dir=root / "lora-consolidated", export=ExportConfig())
    convert_hf(root / "lora-consolidated", model_dir=model, output_dir=root / "lora-hf",
               adapter_dir=root / "lora-adapter")  # fmt: skip
    assert tensor_shapes(weight_files(root / "lora-hf")) == tensor_shapes(weight_files(model))
    merged = AutoModelForCausalLM.from_pretrained(root / "lora-hf", attn_implementation=cpu_attention(model))
    assert eval_loss(merged, runs["packed"]) == pytest.approx(lora["summary"]["final_eval_loss"], rel=1e-5)
    assert lora["summary"]["final_eval_loss"] < lora["summary"]["initial_eval_loss"]
