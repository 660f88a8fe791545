"""The estimate's GPU target, its time and disk numbers, and its shallow traces against the whole model's."""

from __future__ import annotations

import json

import pytest

from vectorlm.config import ConfigError, ExportConfig, LoraSettings, TrainConfig
from vectorlm.estimate.memory import identical_blocks, step_memory, trace_step_memory
from vectorlm.estimate.run_estimate import GPU_MEMORY_MIB, estimate_stage, target_of
from vectorlm.estimate.table import format_estimate
from vectorlm.pipeline.preflight import check_fit
from vectorlm.train.metrics import training_flops


def test_the_gpu_comes_from_the_config_or_from_gres_and_its_memory_from_the_type():
    h100 = target_of({"gpu": "h100"}, world_size=8, ranks_per_node=8, gres=None)
    assert (h100.gpu, h100.memory) == ("H100", GPU_MEMORY_MIB["H100"] * 2**20)
    assert target_of({}, world_size=8, ranks_per_node=8, gres="gpu:h200:8").gpu == "H200"
    assert target_of({"gpu_memory": "40GB"}, world_size=2, ranks_per_node=2, gres="gpu:a100:2").memory == 40 * 10**9
    assert target_of({}, world_size=2, ranks_per_node=2, gres=None) == target_of({}, world_size=2, ranks_per_node=2,
                                                                                 gres="gpu:2")  # fmt: skip
    assert target_of({"gpu": "A100"}, world_size=8, ranks_per_node=8, gres=None).memory is None  # 40 or 80 GB
    with pytest.raises(ConfigError, match="estimate.gpu: unknown GPU 'V100'"):
        target_of({"gpu": "V100"}, world_size=8, ranks_per_node=8, gres=None)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tiny_model_dir):
    """The tiny model's config with 6 blocks (a config.json alone: the estimate reads nothing else)."""
    config = json.loads((tiny_model_dir / "config.json").read_text())
    path = tmp_path_factory.mktemp("deep")
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    return path


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """A tiny Mixtral (6 blocks of 4 experts, 2 per token): a config.json alone."""
    from transformers import MixtralConfig

    path = tmp_path_factory.mktemp("moe")
    MixtralConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=512).save_pretrained(path)  # fmt: skip
    return path


@pytest.mark.parametrize(
    ("model", "checkpointing", "global_batch_size"),
    [("deep_model", "none", 8), ("deep_model", "full", 8), ("deep_model", "none", 4), ("deep_model", "full", 4),
     ("deep_model", "selective", 4), ("moe_model", "none", 4)],
)  # fmt: skip
def test_two_shallow_traces_extended_to_the_full_depth_equal_the_whole_trace(
    request, model, checkpointing, global_batch_size
):
    """With and without gradient accumulation (8 and 4 rows over 2 ranks of 2), each checkpointing, and a
    mixture of experts."""
    path = request.getfixturevalue(model)
    train = TrainConfig(micro_batch_size=2, global_batch_size=global_batch_size, activation_checkpointing=checkpointing)
    kwargs = {"train": train, "lora": LoraSettings(), "max_seq_len": 64, "world_size": 2, "ranks_per_node": 2}
    extended, how = step_memory(path, **kwargs)
    assert how == "3 and 4 of 6 identical blocks traced, extended linearly"
    assert extended == trace_step_memory(path, **kwargs)


def test_blocks_of_different_kinds_are_traced_whole():
    from transformers import Qwen2Config

    mixed = Qwen2Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=16, max_window_layers=3)
    assert len(set(mixed.layer_types)) == 2 and not identical_blocks(mixed)
    assert identical_blocks(Qwen2Config(num_hidden_layers=6))
    assert not identical_blocks(Qwen2Config(num_hidden_layers=6, mlp_only_layers=[0]))


def test_a_model_of_mixed_blocks_is_traced_whole(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=3,
                max_position_embeddings=512).save_pretrained(tmp_path)  # fmt: skip
    train = TrainConfig(micro_batch_size=2, global_batch_size=4)
    _, how = step_memory(tmp_path, train=train, lora=LoraSettings(), max_seq_len=64, world_size=2, ranks_per_node=2)
    assert how == "all 6 blocks traced"


def test_time_and_disk_follow_the_model_and_the_data(deep_model, tmp_path):
    """FLOPs per token from the training log's formula, steps from packed/stats.json, time at the stated MFU,
    checkpoint and export sizes from the parameter count; and a table that says all of it."""
    from vectorlm.hub.meta_model import build_empty_model

    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"train": {"rows": 100, "tokens": 6000, "chunks": 300}}))
    train = TrainConfig(max_steps=None, num_epochs=2, micro_batch_size=2, global_batch_size=8)
    result = estimate_stage(deep_model, tmp_path / "estimate.json", train=train, lora=LoraSettings(),
                            export=ExportConfig(dtype="bfloat16"), max_seq_len=64,
                            settings={"gpu": "H100", "mfu": 0.5}, resources={"tasks": 2},
                            packed_stats=stats)  # fmt: skip
    assert json.loads((tmp_path / "estimate.json").read_text()) == json.loads(json.dumps(result))
    model = build_empty_model(deep_model)
    num_params = sum(p.numel() for p in model.parameters())
    assert result["steps"] == 2 * (100 // 8) and result["tokens_per_step"] == 8 * 60
    flops = training_flops(model)(480, 480 * 20)  # 8 rows of 60 tokens, documents of 20
    assert result["flops_per_token"] == pytest.approx(flops / 480)
    assert result["seconds_per_step"] == pytest.approx(flops / (2 * 989e12 * 0.5))
    assert result["disk"] == {"checkpoint": 12 * num_params, "hf_model": 2 * num_params, "hf_adapter": 0}
    assert result["memory"]["fits"] is True
    table = "\n".join(format_estimate(result))
    assert "| **peak** |" in table and "(fits)" in table and "At 50% MFU" in table and "24 steps" in table


def test_a_run_that_does_not_fit_names_the_micro_batch_and_the_levers(deep_model, tmp_path):
    """On a GPU with room for the allowance and a little more: the configured micro-batch does not fit, a smaller one
    does, and each lever is tried."""
    train = TrainConfig(max_steps=10, micro_batch_size=8, global_batch_size=16)
    kwargs = {"train": train, "lora": LoraSettings(), "export": ExportConfig(), "max_seq_len": 512,
              "resources": {"tasks": 2}, "packed_stats": None}  # fmt: skip
    fits = estimate_stage(deep_model, tmp_path / "a.json", settings={"gpu": "H100"}, **kwargs)
    one_row, _ = step_memory(deep_model, train=TrainConfig(max_steps=10, micro_batch_size=1, global_batch_size=16),
                             lora=LoraSettings(), max_seq_len=512, world_size=2, ranks_per_node=2)  # fmt: skip
    budget = (fits["memory"]["peak"] + int(1.5 * 2**30) + 1.1 * one_row.peak) / 2  # between 1 row and 8
    small = {"gpu": "H100", "gpu_memory": f"{int(budget)}B"}
    assert estimate_stage(deep_model, tmp_path / "b.json", settings=small, **kwargs)["memory"]["fits"] is False
    with pytest.raises(ConfigError) as error:  # what the workflow does with it before train is queued
        check_fit(tmp_path / "b.json", check="error")
    result = json.loads((tmp_path / "b.json").read_text())
    assert 1 <= result["largest_micro_batch_size"] < 8 and 8 % result["largest_micro_batch_size"] == 0
    changes = [lever["change"] for lever in result["levers"]]
    assert changes[:2] == ["train.activation_checkpointing: selective", "train.activation_checkpointing: full"]
    assert "train.micro_batch_size: 1" in changes  # (LoRA's dropout copies make this tiny model's peak higher)
    assert all(lever["peak"] < result["memory"]["peak"] for lever in result["levers"])
    message = str(error.value)
    assert "train was not queued" in message and "set estimate.check: warn" in message
    assert f"Largest train.micro_batch_size that fits: {result['largest_micro_batch_size']}." in message
    check_fit(tmp_path / "b.json", check="warn")  # a warning in the estimate's log, and training goes on
    check_fit(tmp_path / "a.json", check="error")


def test_deferred_gradient_sync_holds_unsharded_fp32_gradients_of_every_parameter(tiny_model_dir):
    """With train.defer_gradient_sync and accumulation, the micro-steps before the last keep an unsharded fp32
    gradient of every parameter on every rank instead of this rank's shard (docs/config.md): the peak grows by the
    difference, 4 bytes x parameters x (1 - 1 / ranks)."""
    from vectorlm.hub.meta_model import build_empty_model

    num_params = sum(p.numel() for p in build_empty_model(tiny_model_dir).parameters())
    peaks = {}
    for defer in (False, True):
        train = TrainConfig(micro_batch_size=1, global_batch_size=8, defer_gradient_sync=defer)
        memory, _ = step_memory(tiny_model_dir, train=train, lora=LoraSettings(), max_seq_len=512, world_size=2,
                                ranks_per_node=2)  # fmt: skip
        peaks[defer] = memory.peak
    assert peaks[True] - peaks[False] == pytest.approx(4 * num_params / 2, rel=0.01)
