"""Training FLOPs and MFU: hand counts for real model shapes (built on the meta device: nothing downloaded), and the
formula against ``torch.utils.flop_counter.FlopCounterMode`` and against the attention masks transformers builds,
on a CPU forward and backward of every architecture family of tests/test_architectures.py."""

import inspect

import numpy as np
import pytest
import torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, Qwen3MoeConfig

from tests.test_architectures import ARCHITECTURES
from vectorlm.config import LoraSettings
from vectorlm.data.loader import collate
from vectorlm.train.lora import apply_lora, peft_config
from vectorlm.train.metrics import (
    StepMeter,
    TrainingFlops,
    causal_pairs,
    gpu_model_of,
    measured_matmul_peak,
    peak_flops_of,
    training_flops,
)
from vectorlm.train.step import StepOutput

VOCAB = 128_256


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_llama(**shape) -> LlamaForCausalLM:
    return meta_model(LlamaConfig(vocab_size=VOCAB, **shape))


LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}  # fmt: skip
LLAMA_3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "tie_word_embeddings": False}  # fmt: skip
LLAMA_3_8B_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336


def packed_rows(*rows_of_document_lengths):
    """Rows whose documents have the given lengths, as pack writes them (positions restart per document)."""
    rows = []
    for lengths in rows_of_document_lengths:
        positions = np.concatenate([np.arange(n) for n in lengths])
        rows.append({"input_ids": positions, "labels": positions, "position_ids": positions})
    return collate(rows, flatten=False)


def pairs(n: int) -> int:
    return n * (n + 1) // 2


def test_llama_3_2_1b_counts_the_tied_lm_head_once_and_causal_attention_within_documents():
    flops = training_flops(meta_llama(**LLAMA_32_1B))
    # Per layer: q and o 2048 x 2048, k and v 2048 x 512 (8 KV heads of 64), gate, up, down 2048 x 8192.
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    lm_head = VOCAB * 2048  # tied to the input embedding, still a matmul (once); the embedding lookup is not
    assert flops.per_token == 6 * (16 * layer + lm_head)
    assert flops.per_token == pytest.approx(7.414e9, rel=1e-3)
    # 32 query heads x 64 (KV heads do not matter): 2 x 32 x (64 + 64) per pair forward, 3x in training.
    assert (flops.per_pair, flops.per_window_pair) == (16 * 6 * 32 * 128, ())
    batch = packed_rows([1000, 24], [2048])  # documents of 1000 and 24, and 2048 tokens
    step = flops(batch["num_tokens"], batch["sum_squared_lengths"])
    assert step == 6 * (16 * layer + lm_head) * 3072 + 12 * 16 * 32 * 64 * (pairs(1000) + pairs(24) + pairs(2048))


def test_llama_3_8b_untied_and_attention_within_documents_only():
    flops = training_flops(meta_llama(**LLAMA_3_8B))
    assert flops.per_token == 6 * (32 * LLAMA_3_8B_LAYER + VOCAB * 4096)
    # 8 documents of 1024 in an 8192-token row cost about an eighth of the attention of one 8192-token document.
    eight, one = packed_rows([1024] * 8), packed_rows([8192])
    attention = [flops(8192, b["sum_squared_lengths"]) - flops.per_token * 8192 for b in (eight, one)]
    assert attention == [12 * 32 * 4096 * 8 * pairs(1024), 12 * 32 * 4096 * pairs(8192)]


def test_lora_counts_4_per_frozen_weight_6_per_adapter_weight_and_full_attention():
    lora = LoraSettings(enabled=True, r=16, target_modules=["q_proj", "v_proj"])
    model, _ = apply_lora(meta_llama(**LLAMA_3_8B), lora, seed=0)
    flops = training_flops(model)
    adapters = 32 * (16 * 4096 + 4096 * 16 + 16 * 4096 + 1024 * 16)  # q: A 16x4096, B 4096x16; v: B 1024x16
    assert flops.per_token == 4 * (32 * LLAMA_3_8B_LAYER + VOCAB * 4096) + 6 * adapters
    assert flops.per_pair == 12 * 32 * 32 * 128  # gradients still flow through attention


MIXTRAL_8X7B = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                             num_experts_per_tok=2)  # fmt: skip
QWEN3_30B_A3B = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48,
                               num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                               num_experts_per_tok=8, tie_word_embeddings=False)  # fmt: skip


def test_mixture_of_experts_count_the_routed_experts_and_the_router():
    attention_8x7b = 2 * 4096 * 4096 + 2 * 4096 * 1024
    expert_8x7b = 3 * 4096 * 14336
    # 2 of 8 experts per token, the router (8 x 4096) for every token: 12.75e9 weights a token uses, not 46.6e9.
    mixtral = training_flops(meta_model(MIXTRAL_8X7B))
    assert mixtral.per_token == 6 * (32 * (attention_8x7b + 2 * expert_8x7b + 8 * 4096) + 32000 * 4096)
    assert mixtral.per_token == pytest.approx(6 * 12.749e9, rel=1e-4)
    attention_a3b = 2 * 2048 * 32 * 128 + 2 * 2048 * 4 * 128
    qwen = training_flops(meta_model(QWEN3_30B_A3B))  # 8 of 128 experts of 3 x 2048 x 768: 3.04e9, not 30.2e9
    assert qwen.per_token == 6 * (48 * (attention_a3b + 8 * 3 * 2048 * 768 + 128 * 2048) + 151936 * 2048)


def test_lora_on_experts_counts_the_routed_share_of_the_adapters():
    config = ARCHITECTURES["mixtral"]()  # 4 experts of 32 -> 16 -> 32, 2 per token, 2 layers
    config.vocab_size = 300
    model, _ = apply_lora(meta_model(config), LoraSettings(enabled=True, r=4, dropout=0.0), seed=0)
    attention = 2 * 32 * 32 + 2 * 32 * 16
    experts = 4 * (32 * 32 + 32 * 16)  # gate_up 4 x 32 x 32, down 4 x 32 x 16
    # all-linear: rank 4 on q, k, v, o and the router (4 x 32, every token), on the fused experts as parameters:
    # gate_up (peft doubles its rank: gate and up) A 32 x 32, B 32 x 32; down A 16 x 16, B 32 x 16, half of it routed.
    adapters = 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16) + 4 * (32 + 4)
    routed_adapters = 32 * 32 + 32 * 32 + 16 * 16 + 32 * 16
    frozen = 2 * (attention + experts / 2 + 4 * 32) + 300 * 32
    assert training_flops(model).per_token == 4 * frozen + 6 * 2 * (adapters + routed_adapters / 2)


def test_causal_pairs_count_what_each_query_sees():
    lengths = [1, 5, 16, 17, 40]
    for window in (None, 1, 4, 16):
        brute = sum(min(i + 1, window or n) for n in lengths for i in range(n))
        assert causal_pairs(lengths, window=window) == brute
    assert causal_pairs(np.array([], dtype=np.int64)) == 0


def test_sliding_windows_and_their_upper_bound_when_the_pairs_are_not_given():
    flops = TrainingFlops(per_token=10.0, per_pair=3.0, per_window_pair=((4, 2.0),))
    lengths = [2, 10]  # 3 + 55 full pairs; within a window of 4: 3 + (10 + 6 x 4) = 37
    assert flops.window_pairs(lengths) == (37,)
    assert flops(12, 4 + 100, window_pairs=flops.window_pairs(lengths)) == 10 * 12 + 3 * 58 + 2 * 37
    # Without the pairs, an upper bound: min(58, 4 x 12) = 48.
    assert flops(12, 4 + 100) == 10 * 12 + 3 * 58 + 2 * 48
    with pytest.raises(ValueError):
        flops(12, 104, window_pairs=())


# The formula against what the model computes: a packed batch of 2 rows of 48 tokens (documents of 10 and 38, and
# 48; sliding windows are 16), no padding, so that every token is a document's and is routed.
ROWS = [[10, 38], [48]]
FAMILIES = [*ARCHITECTURES, "llama_tied", "llama_lora"]


def tiny(family: str) -> torch.nn.Module:
    """The family's tiny model with random weights, fp32, eager attention, and experts computed by plain matmuls
    (the CPU default, grouped_mm, is one custom op whose FLOPs the counter does not see)."""
    config = ARCHITECTURES[family.removesuffix("_tied").removesuffix("_lora")]()
    config.vocab_size, config.pad_token_id = 300, None
    config.tie_word_embeddings = config.tie_word_embeddings or family.endswith("_tied")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    if family.endswith("_lora"):
        model = get_peft_model(model, peft_config(LoraSettings(enabled=True, r=4, dropout=0.0), model))
    return model.train()


def forward_backward(model: torch.nn.Module) -> None:
    positions = torch.tensor(np.array([np.concatenate([np.arange(n) for n in row]) for row in ROWS]))
    input_ids = torch.randint(1, 300, positions.shape, generator=torch.Generator().manual_seed(0))
    model(input_ids=input_ids, position_ids=positions, labels=input_ids, use_cache=False).loss.backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_formula_counts_what_flop_counter_mode_counts(family):
    """``FlopCounterMode`` counts the matmuls that run: here every weight's (the routed experts' for the tokens
    routed to them), and eager attention's scores and weighted sums over every (query, key) pair of each row, L^2,
    whatever the mask hides. So this compares the formula's weight FLOPs and its FLOPs per pair of each layer, with
    the pairs taken as the counter's L^2 per row; which pairs a layer really needs (causal, within documents and
    windows) is checked against transformers' own masks in the next test. The tied models (gemma2, gemma3, gpt2,
    llama_tied) count their LM head once. LoRA (llama_lora): with frozen embeddings the first layer's attention
    input needs no gradient, so its q, k, v projections (base and lora_A) skip the 2 FLOPs per weight and token the
    formula counts for every frozen weight's input gradient: a 1 / layers share of them, taken out here. LoRA on
    experts is not compared: peft adds B x A to the whole expert stack every forward (docs/config.md), work beyond
    the model FLOPs that test_lora_on_experts_counts_the_routed_share_of_the_adapters counts by hand."""
    model = tiny(family)
    with FlopCounterMode(display=False) as counter:
        forward_backward(model)
    flops = training_flops(model)
    num_tokens = sum(map(sum, ROWS))
    per_pair = flops.per_pair + sum(f for _, f in flops.per_window_pair)
    expected = flops.per_token * num_tokens + per_pair * sum(sum(row) ** 2 for row in ROWS)
    if family.endswith("_lora"):
        first = model.get_base_model().model.layers[0].self_attn
        inputs = [p for name in ("q_proj", "k_proj", "v_proj") for n, p in getattr(first, name).named_parameters()
                  if "lora_B" not in n]  # fmt: skip
        expected -= 2 * sum(p.numel() for p in inputs) * num_tokens
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.05)


def attended_pairs(model: torch.nn.Module) -> list[int]:
    """Forward and backward with each attention layer's mask counted: the (query, key) pairs it lets through."""
    counts = []

    def count(module, args, kwargs):
        mask = inspect.signature(module.forward).bind(*args, **kwargs).arguments["attention_mask"]
        counts.append(int((mask == 0).sum()))  # eager masks add 0 where a query sees a key, the dtype's min elsewhere

    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for m in attention]
    forward_backward(model)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("family", list(ARCHITECTURES))
def test_the_pairs_counted_are_those_the_masks_of_transformers_let_through(family):
    """Every layer's mask, as transformers builds it for packed rows (block-diagonal, causal, sliding windows per
    layer type), lets through exactly the pairs the formula counts for that layer."""
    model = tiny(family)
    counts = attended_pairs(model)
    flops = training_flops(model)
    lengths = [n for row in ROWS for n in row]
    num_tokens, squared = sum(lengths), sum(n * n for n in lengths)
    attention = flops(num_tokens, squared, window_pairs=flops.window_pairs(lengths)) - flops.per_token * num_tokens
    assert len(counts) == model.config.get_text_config().num_hidden_layers
    assert attention == (flops.per_pair + sum(f for _, f in flops.per_window_pair)) / len(counts) * sum(counts)
    assert len(set(counts)) == 1 + bool(flops.per_pair and flops.per_window_pair)  # windows matter here: 16 < 38


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA A10G", 70e12), ("NVIDIA A40", 149.7e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA RTX 6000 Ada Generation", 364.2e12), ("NVIDIA RTX A6000", 154.8e12),
    ("Tesla V100-SXM2-32GB", None), ("NVIDIA GeForce RTX 4090", None), ("Quadro RTX 6000", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
])  # fmt: skip
def test_peak_flops_by_the_device_name(name, peak):
    assert peak_flops_of(name) == peak


@pytest.mark.parametrize(("one", "other"), [
    (("NVIDIA L40", "L40"), ("NVIDIA L4", "L4")), (("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4")),
    (("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40")), (("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10")),
    (("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA A10", "A10")), (("NVIDIA H200", "H200"), ("NVIDIA H20", "H20")),
    (("NVIDIA GH200 480GB", "GH200"), ("NVIDIA H200", "H200")),
    (("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H100", "H100")),
    (("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 80GB HBM3", "H100")),
])  # fmt: skip
def test_a_name_that_contains_another_is_not_taken_for_it(one, other):
    (one_name, one_model), (other_name, other_model) = one, other
    assert other_model in one_name  # a substring match would confuse them
    assert (gpu_model_of(one_name), gpu_model_of(other_name)) == (one_model, other_model)


def test_measured_matmul_peak_on_cpu():
    peak = measured_matmul_peak(torch.device("cpu"), size=64, repeats=3, rounds=2)
    assert isinstance(peak, float) and peak > 0


def test_meter_reports_the_longest_run_of_skipped_steps_between_logged_steps(process_group):
    meter = StepMeter(world_size=1, device=torch.device("cpu"), flops=TrainingFlops(6.0, 12.0), peak=None)
    runs = []
    for window in ([1, 1, 1, 0, 0], [0, 1, 1], [1, 0, 0], []):
        for skipped in window:
            output = StepOutput(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(float(skipped)), lr=0.1)
            meter.add(output, tokens=10, sum_squared_lengths=50)
        record = meter.read(output, 4)
        runs.append((meter.longest_skip_run, record["skipped_steps"]))
    # A run of 3 that ended before the log still counts; a run crossing a log continues into the next window.
    assert runs == [(3, 3), (2, 5), (3, 6), (0, 6)]
    assert record["loss"] == 0.5 and record["mfu"] is None
