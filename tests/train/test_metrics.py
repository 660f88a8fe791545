"""Training FLOPs and MFU against hand counts for real model shapes (built on the meta device: nothing downloaded)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vectorlm.config import LoraSettings
from vectorlm.data.loader import collate
from vectorlm.train.lora import apply_lora
from vectorlm.train.metrics import StepMeter, TrainingFlops, peak_flops_of, training_flops
from vectorlm.train.step import StepOutput

VOCAB = 128_256


def meta_llama(**shape) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **shape))


LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}  # fmt: skip
LLAMA_3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "tie_word_embeddings": False}  # fmt: skip


def packed_rows(*rows_of_document_lengths):
    """Rows whose documents have the given lengths, as pack writes them (positions restart per document)."""
    rows = []
    for lengths in rows_of_document_lengths:
        positions = np.concatenate([np.arange(n) for n in lengths])
        rows.append({"input_ids": positions, "labels": positions, "position_ids": positions})
    return collate(rows, flatten=False)


def test_llama_3_2_1b_counts_the_tied_lm_head_and_packed_attention():
    flops = training_flops(meta_llama(**LLAMA_32_1B))
    # Per layer: q and o 2048 x 2048, k and v 2048 x 512 (8 KV heads of 64), gate, up, down 2048 x 8192.
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    lm_head = VOCAB * 2048  # tied to the input embedding, still a matmul; the embedding lookup is not
    assert flops.per_token == 6 * (16 * layer + lm_head)
    assert flops.per_token == pytest.approx(7.414e9, rel=1e-3)
    # 32 heads x 64: 4 x that per query-key pair forward, 3x in training; documents of 1000 and 24, and 2048 tokens.
    batch = packed_rows([1000, 24], [2048])
    assert batch["sum_squared_lengths"] == 1000**2 + 24**2 + 2048**2
    step = flops(batch["num_tokens"], batch["sum_squared_lengths"])
    assert step == 6 * (16 * layer + lm_head) * 3072 + 12 * 16 * 32 * 64 * (1000**2 + 24**2 + 2048**2)


def test_llama_3_8b_untied_and_attention_within_documents_only():
    flops = training_flops(meta_llama(**LLAMA_3_8B))
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert flops.per_token == 6 * (32 * layer + VOCAB * 4096)
    # 8 documents of 1024 in an 8192-token row cost an eighth of the attention of one 8192-token document.
    eight = packed_rows([1024] * 8)["sum_squared_lengths"]
    one = packed_rows([8192])["sum_squared_lengths"]
    assert flops.per_squared_length == 12 * 32 * 32 * 128
    assert one == 8 * eight == 8192**2
    per_token_at_8k = (flops(8192, eight) / 8192, flops(8192, one) / 8192)
    assert per_token_at_8k == (6 * (32 * layer + VOCAB * 4096) + 12 * 32 * 4096 * 1024,
                               6 * (32 * layer + VOCAB * 4096) + 12 * 32 * 4096 * 8192)  # fmt: skip


def test_lora_counts_4_per_frozen_weight_6_per_adapter_weight_and_full_attention():
    lora = LoraSettings(enabled=True, r=16, target_modules=["q_proj", "v_proj"])
    model, _ = apply_lora(meta_llama(**LLAMA_3_8B), lora, seed=0)
    flops = training_flops(model)
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    adapters = 32 * (16 * 4096 + 4096 * 16 + 16 * 4096 + 1024 * 16)  # q: A 16x4096, B 4096x16; v: B 1024x16
    assert flops.per_token == 4 * (32 * layer + VOCAB * 4096) + 6 * adapters
    assert flops.per_squared_length == 12 * 32 * 32 * 128  # gradients still flow through attention


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("Tesla V100-SXM2-32GB", None),
])  # fmt: skip
def test_peak_flops_by_the_most_specific_device_name(name, peak):
    assert peak_flops_of(name) == peak


def test_meter_reports_the_longest_run_of_skipped_steps_between_logged_steps(process_group):
    meter = StepMeter(world_size=1, device=torch.device("cpu"), flops=TrainingFlops(6.0, 12.0), peak=None)
    runs = []
    for window in ([1, 1, 1, 0, 0], [0, 1, 1], [1, 0, 0], []):
        for skipped in window:
            output = StepOutput(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(float(skipped)), lr=0.1)
            meter.add(output, tokens=10, sum_squared_lengths=50)
        record = meter.read(output, loss_tokens=4)
        runs.append((meter.longest_skip_run, record["skipped_steps"]))
    # A run of 3 that ended before the log still counts; a run crossing a log continues into the next window.
    assert runs == [(3, 3), (2, 5), (3, 6), (0, 6)]
    assert record["loss"] == 0.5 and record["mfu"] is None
