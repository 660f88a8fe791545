"""LoRA under FSDP2: what trains, what is saved, what is exported, and that a killed run resumes exactly."""

from __future__ import annotations

import hashlib
import os
import signal

import datasets
import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import run_training
from tests.export.test_export import eval_loss
from tests.train.test_resume import model_tensors, start_job, wait_for_checkpoint, wait_for_step
from vectorlm.config import ConfigError, ExportConfig, LoraSettings, TrainConfig
from vectorlm.export.consolidate import consolidate
from vectorlm.export.convert import convert_hf
from vectorlm.hub.meta_model import build_empty_model
from vectorlm.train.checkpoint_reader import SafeFileSystemReader
from vectorlm.train.job import TrainJob, check_job
from vectorlm.train.lora import check_targets
from vectorlm.train.loss import plain_loss_sum
from vectorlm.train.model import build_model
from vectorlm.train.step import build_optimizer, loss_sum

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}
RUN = {"max_steps": 12, "lr": 1e-2, "micro_batch_size": 2, "global_batch_size": 8, "mixed_precision": False,
       "checkpoint_every": 4, "eval_every": 12, "seed": 7, "log_every": 1}  # fmt: skip


def digest(directory) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, packed_dir):
    before = digest(tiny_model_dir)
    root = tmp_path_factory.mktemp("lora")
    run = run_training(root, tiny_model_dir, packed_dir, lora=LORA, **RUN)
    consolidate(run["summary"]["checkpoint"], model_dir=tiny_model_dir, output_dir=root / "consolidated",
                export=ExportConfig())  # fmt: skip
    convert_hf(root / "consolidated", model_dir=tiny_model_dir, output_dir=root / "hf_model",
               adapter_dir=root / "hf_adapter")  # fmt: skip
    assert digest(tiny_model_dir) == before, "the base model's files must never change"
    return root, run


def test_only_adapter_parameters_get_gradients_and_optimizer_state(process_group, tiny_model_dir, packed_dir):
    train, lora = TrainConfig(mixed_precision=False), LoraSettings(**LORA)
    model, _ = build_model(tiny_model_dir, process_group, train=train, lora=lora, attention="sdpa")
    rows = datasets.load_from_disk(str(packed_dir))["train"].select(range(2))
    batch = {"input_ids": torch.tensor([rows[0]["input_ids"][:64]]), "position_ids": torch.arange(64)[None],
             "labels": torch.tensor([rows[0]["labels"][:64]])}  # fmt: skip
    loss_sum(model, batch).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    optimizer = build_optimizer(model, train)
    optimizer.step()
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(
        p.numel() for n, p in model.named_parameters() if n in with_grad
    )
    assert len(optimizer.state) == len(with_grad)
    # lora_B starts at zero: the adapted model first computes exactly what the base model does.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.zero_grad()
    with torch.no_grad():
        fresh, _ = build_model(tiny_model_dir, process_group, train=train, lora=lora, attention="sdpa")
        fresh.eval()
        expected = plain_loss_sum(base(input_ids=batch["input_ids"]).logits, batch["labels"])
        torch.testing.assert_close(loss_sum(fresh, batch), expected)  # the chunked loss of the built model


def test_with_mixed_precision_the_frozen_base_is_stored_in_bf16(process_group, tiny_model_dir):
    model, _ = build_model(tiny_model_dir, process_group, train=TrainConfig(), lora=LoraSettings(**LORA),
                           attention="sdpa")  # fmt: skip
    base = load_file(tiny_model_dir / "model.safetensors")
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # adapters: fp32 masters
    weight = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert torch.equal(frozen[weight].full_tensor(), base["model.layers.0.self_attn.q_proj.weight"].bfloat16())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)


def test_checkpoints_hold_the_adapter_not_the_base(lora_run):
    _root, run = lora_run
    saved = SafeFileSystemReader(run["summary"]["checkpoint"]).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert run["summary"]["trainable_parameters"] < run["summary"]["parameters"] / 5
    assert run["summary"]["final_eval_loss"] < run["summary"]["initial_eval_loss"]


def test_streamed_merge_equals_peft_merge_and_unload_in_fp32(lora_run, tiny_model_dir):
    root, _ = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, root / "hf_adapter").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(root / "hf_model", dtype=torch.float32).state_dict()
    assert merged.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, rtol=1e-5, atol=1e-5)
    assert (
        load_file(root / "hf_adapter" / "adapter_model.safetensors")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ].dtype
        == torch.float32
    )


def test_adapter_on_base_equals_merged_model_and_the_training_loss(lora_run, tiny_model_dir, packed_dir):
    root, run = lora_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    adapted = PeftModel.from_pretrained(base, root / "hf_adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(root / "hf_model", attn_implementation="sdpa").eval()
    input_ids = torch.tensor([datasets.load_from_disk(str(packed_dir))["eval"][0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=input_ids).logits, merged(input_ids=input_ids).logits,
                                   atol=1e-4, rtol=0)  # fmt: skip
    assert eval_loss(merged, packed_dir) == pytest.approx(run["summary"]["final_eval_loss"], rel=1e-5)
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0]
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, untouched.self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].self_attn.k_proj.weight, untouched.self_attn.k_proj.weight)  # no adapter


def test_adapter_round_trips_through_save_and_load(lora_run, tiny_model_dir, tmp_path):
    root, run = lora_run
    trained = {k.removeprefix("base_model.model."): v for k, v in model_tensors(run["summary"]["checkpoint"]).items()}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), root / "hf_adapter")
    state = get_peft_model_state_dict(loaded)
    assert len(state) == len(trained)
    for name, tensor in state.items():
        key = name.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        torch.testing.assert_close(tensor, trained[key], atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    original = load_file(root / "hf_adapter" / "adapter_model.safetensors")
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)


def test_killed_lora_run_resumes_exactly(lora_run, tmp_path, tiny_model_dir, packed_dir):
    reference, _ = lora_run
    job = TrainJob(model=str(tiny_model_dir), packed=str(packed_dir), output_dir=str(tmp_path),
                   train=TrainConfig(**RUN), lora=LoraSettings(**LORA))  # fmt: skip
    process = start_job(tmp_path, tiny_model_dir, packed_dir, job=job)
    wait_for_step(tmp_path, 6, process)
    wait_for_checkpoint(tmp_path, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = run_training(tmp_path, tiny_model_dir, packed_dir, lora=LORA, **RUN)
    assert "resumed from" in (tmp_path / "logs" / "train.log").read_text()
    ours, theirs = model_tensors(resumed["summary"]["checkpoint"]), model_tensors(reference / "checkpoints" / "step_12")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6  # dropout too: RNG restored


def test_target_modules_that_match_nothing_list_the_linear_layers(tiny_model_dir, tmp_path, packed_dir):
    model = build_empty_model(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"lora\.target_modules: 'qkv' match no module of the model; its linear "
                                          r"layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
                                          r"up_proj, v_proj"):  # fmt: skip
        check_targets(model, LoraSettings(enabled=True, target_modules=["q_proj", "qkv"]))
    job = TrainJob(model=str(tiny_model_dir), packed=str(packed_dir), output_dir=str(tmp_path),
                   lora=LoraSettings(enabled=True, target_modules=["qkv"]))  # fmt: skip
    with pytest.raises(ConfigError, match="'qkv' match no module"):  # before any rank starts, not in each of them
        check_job(job, ranks=2)
