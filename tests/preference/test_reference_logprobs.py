"""The reference_logprobs stage: FSDP ranks compute each completion's summed log-probability once; it equals a plain
forward pass of the reference model on each sequence alone."""

import json

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.preference.test_pack_pairs import packed_pairs, preference_rows, row_documents
from vectorlm.config import TrainConfig
from vectorlm.packed import IGNORE_INDEX
from vectorlm.train.placement import Placement
from vectorlm.train.reference_logprobs import ReferenceJob, run_reference_logprobs


def plain_logps(model, ids, labels) -> float:
    logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    targets = torch.tensor(labels[1:])
    kept = targets != IGNORE_INDEX
    return float(logits[:-1].log_softmax(-1)[kept].gather(1, targets[kept][:, None]).double().sum())


@pytest.mark.parametrize("packing", [True, False])
def test_cached_logprobs_equal_a_plain_forward_per_pair(tmp_path, tiny_model_dir, packing):
    _, packed, _ = packed_pairs(tmp_path, tiny_model_dir, preference_rows(50), max_seq_len=256, packing=packing)
    job = ReferenceJob(model=str(tiny_model_dir), packed=str(tmp_path / "data"), output_dir=str(tmp_path / "ref"),
                       digest="d1", train=TrainConfig(micro_batch_size=3, global_batch_size=6, mixed_precision=False, attention="sdpa"))  # fmt: skip
    stats = run_reference_logprobs(job, placement=Placement(2, 1, 1), log_path=tmp_path / "ref.log")
    reference = datasets.load_from_disk(str(tmp_path / "ref"))
    recorded = json.loads((tmp_path / "ref" / "stats.json").read_text())
    assert recorded == stats and stats["rows"] == {split: len(packed[split]) for split in ("train", "eval")}
    assert stats["packed_fingerprint"] == json.loads((tmp_path / "data" / "stats.json").read_text())["fingerprint"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for split in ("train", "eval"):
            assert len(reference[split]) == len(packed[split])
            for row, logps in zip(packed[split], reference[split]["logps"]):
                expected = [plain_logps(model, ids, labels) for ids, labels in row_documents(row)]
                np.testing.assert_allclose(logps, expected, rtol=1e-5)
