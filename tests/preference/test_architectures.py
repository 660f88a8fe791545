"""Every architecture of the matrix (tests/test_architectures.py) gives preference training the log-probabilities it
must: each completion's sum from packed pairs, by the fused per-token head, equals the model run on the sequence
alone, and its gradients equal autograd's of the plain computation."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

import vectorlm.train.loss
from tests.preference.test_pack_pairs import packed_pairs, preference_rows, row_documents
from tests.test_architectures import ARCHITECTURES, build, cpu_attention
from vectorlm.data.loader import fetch
from vectorlm.hub.meta_model import causal_lm_class
from vectorlm.packed import IGNORE_INDEX
from vectorlm.train.attention import check_pairs_apart, keeps_documents_apart
from vectorlm.train.loss import install_loss
from vectorlm.train.model import disable_dropout
from vectorlm.train.preference import sequence_logps
from vectorlm.train.step import token_logps


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model_dir) -> datasets.DatasetDict:
    root = tmp_path_factory.mktemp("pairs")
    _, packed, _ = packed_pairs(root, tiny_model_dir, preference_rows(40), max_seq_len=256)
    return packed


def alone(model, row) -> torch.Tensor:
    """Each document of ``row`` run alone, with full logits: its summed log-probability of its loss tokens."""
    sums = []
    for ids, labels in row_documents(row):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
        targets = torch.tensor(labels[1:])
        kept = targets != IGNORE_INDEX
        sums.append(logits[:-1].log_softmax(-1)[kept].gather(1, targets[kept][:, None]).double().sum())
    return torch.stack(sums)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_packed_pair_logprobs_and_gradients_equal_each_sequence_alone(name, pairs, tmp_path, tiny_model_dir,
                                                                      monkeypatch):  # fmt: skip
    monkeypatch.setattr(vectorlm.train.loss, "LOSS_CHUNK_TOKENS", 64)
    path = build(name, tmp_path / name, tiny_model_dir)
    attention = cpu_attention(path)
    models = [AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
              for _ in range(2)]  # fmt: skip
    fused, plain = models
    assert install_loss(fused, "chunked", per_token=True) in ("chunked", "plain")
    packing = keeps_documents_apart(causal_lm_class(path), fused.config)
    rows = pairs["train"].select(range(3))
    if packing:  # several pairs per row, documents kept apart as in training
        batch = fetch(pairs["train"], torch.arange(3).numpy(), flatten=False, pairs=True)
    else:  # a model whose packed documents would see each other trains unpacked: one row per batch
        rows = rows.select([0])
        batch = fetch(pairs["train"], torch.arange(1).numpy(), flatten=False, pairs=True)
    weights = torch.randn(
        len(batch["sequence_lengths"]), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ours = sequence_logps(token_logps(fused, batch), batch["sequence_ids"], len(batch["sequence_lengths"]))
    expected = torch.cat([alone(plain, row) for row in rows]) if packing else alone(plain, rows[0])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    (ours * weights).sum().backward()
    (expected * weights).sum().backward()
    for (param_name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5 * b.grad.abs().max().item(), msg=param_name)


def test_a_model_whose_packed_documents_see_each_other_cannot_train_on_pairs():
    """A pair's sequences share a row whatever data.packing says: gpt-oss (its masks ignore the positions) is refused
    before any weight is read, naming the objective."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(num_hidden_layers=1)
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="train.objective dpo: GptOssForCausalLM with attention eager would let"):
        check_pairs_apart(GptOssForCausalLM, config, "eager")


def test_dpo_turns_dropout_off_so_the_policy_starts_as_its_reference(tiny_model_dir, tmp_path):
    """GPT-2's dropout (0.1) and LoRA's would make the policy's log-probabilities noisy against the reference's (which
    has none): in DPO a forward in training mode computes what evaluation mode does."""
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, vocab_size=300)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    reference = model.eval()(ids).logits
    disable_dropout(model)
    torch.testing.assert_close(model.train()(ids).logits, reference, rtol=0, atol=0)
