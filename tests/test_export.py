"""consolidate and convert_hf on checkpoints written by real training runs."""

import json

import datasets
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tests.conftest import CORPUS, run_training
from vectorlm.config import ExportConfig, read_stage_config
from vectorlm.data.loader import fetch
from vectorlm.example import build_example_model
from vectorlm.export import INDEX_FILE, consolidate, convert_hf, plan_shards
from vectorlm.step import loss_sum, num_loss_tokens

TRAIN = dict(max_steps=6, lr=3e-3, micro_batch_size=4, global_batch_size=8, mixed_precision=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, packed_dir):
    root = tmp_path_factory.mktemp("trained")
    return root, run_training(root, tiny_model_dir, packed_dir, **TRAIN)["summary"]


def eval_loss(model, packed_dir) -> float:
    rows = datasets.load_from_disk(str(packed_dir))["eval"]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = fetch(rows, torch.arange(start, min(start + 4, len(rows))).numpy(), flatten=False)
            total += loss_sum(model, batch).item()
            tokens += num_loss_tokens(batch)
    return total / tokens


def test_plan_shards():
    assert plan_shards({"a": 4, "b": 4, "c": 9, "d": 1}, 8) == [["a", "b"], ["c"], ["d"]]


def test_exported_model_reproduces_the_training_eval_loss(trained, tiny_model_dir, packed_dir):
    root, summary = trained
    consolidate(summary["checkpoint"], model_dir=tiny_model_dir, output_dir=root / "consolidated", export=ExportConfig())
    convert_hf(root / "consolidated", model_dir=tiny_model_dir, output_dir=root / "hf", smoke_test_prompt="Once")
    model = AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="sdpa")
    assert eval_loss(model, packed_dir) == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    assert eval_loss(base, packed_dir) == pytest.approx(summary["initial_eval_loss"], rel=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    output = model.generate(**tokenizer("Once upon", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert output.shape[1] > 2
    resolved = read_stage_config(root / "hf")
    assert resolved["train"]["max_steps"] == 6 and resolved["max_seq_len"] == 128
    assert resolved["export"]["smoke_test_prompt"] == "Once"
    assert {p.name for p in (root / "hf").iterdir()} >= {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE,
    }  # fmt: skip


def test_sharded_bf16_export(trained, tiny_model_dir):
    root, summary = trained
    out = root / "sharded"
    stats = consolidate(
        summary["checkpoint"], model_dir=tiny_model_dir, output_dir=out,
        export=ExportConfig(max_shard_size="100KB", dtype="bfloat16"),
    )  # fmt: skip
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert stats["files"] == len(files) > 1 and not list(out.glob("*.pt"))
    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert set(index["weight_map"]) == set(reference.state_dict())
    for name in files:
        with safe_open(out / name, framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    convert_hf(out, model_dir=tiny_model_dir, output_dir=root / "hf_bf16")
    model = AutoModelForCausalLM.from_pretrained(root / "hf_bf16")
    assert model.dtype == torch.bfloat16
    assert json.loads((root / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_embeddings_export(tmp_path, packed_dir):
    model_dir = build_example_model(
        CORPUS, tmp_path / "tied", vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, tie_word_embeddings=True
    )
    model = LlamaForCausalLM.from_pretrained(model_dir)
    assert "lm_head.weight" not in safe_open(model_dir / "model.safetensors", "pt").keys()
    summary = run_training(tmp_path / "run", model_dir, packed_dir, **{**TRAIN, "max_steps": 2})["summary"]
    consolidate(summary["checkpoint"], model_dir=model_dir, output_dir=tmp_path / "c", export=ExportConfig())
    convert_hf(tmp_path / "c", model_dir=model_dir, output_dir=tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(exported.model.embed_tokens.weight, model.model.embed_tokens.weight)  # it trained
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    assert "lm_head.weight" not in index["weight_map"]


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    root, summary = trained
    other = build_example_model(CORPUS, tmp_path / "other", vocab_size=300, hidden_size=64, num_layers=3, num_heads=2)
    with pytest.raises(ValueError, match=r"lacks weights of .*other: model\.layers\.2\."):
        consolidate(summary["checkpoint"], model_dir=other, output_dir=tmp_path / "c", export=ExportConfig())
