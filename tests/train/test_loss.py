"""The loss without full-vocabulary logits: the same numbers as the plain computation, a fraction of the memory."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from tests.conftest import REPO, requires_gpu
from vectorlm.train.loss import (
    HiddenStates,
    _forward_passes_logits_through,
    fused_head_supported,
    install_loss,
    liger_loss_sum,
    plain_loss_sum,
)


def measure(kind: str, mode: str, out) -> dict:
    """bench/loss_memory.py's measurement: a fresh process's peak memory, and the loss and gradients it computed."""
    sys.path.insert(0, str(REPO / "bench"))
    from loss_memory import measure as bench_measure

    return bench_measure(kind, mode, out)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_chunked_loss_equals_the_plain_one_in_a_quarter_of_the_memory(tmp_path, mode):
    """Vocabulary 128,256, hidden 256, 4 x 2,048 tokens, fp32: loss and gradients equal, peak memory of forward plus
    backward (or forward alone, for evaluation) at most a quarter."""
    plain, chunked = measure("plain", mode, tmp_path / "plain.pt"), measure("chunked", mode, tmp_path / "chunked.pt")
    torch.testing.assert_close(chunked["loss"], plain["loss"], rtol=1e-5, atol=0)
    if mode == "train":
        for name in ("hidden", "weight"):
            scale = plain[name].abs().max()
            torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-5 * scale)
    assert plain["peak_mb"] > 2000  # the full logits (4.2 GB in fp32) were there to be avoided
    assert chunked["peak_mb"] <= plain["peak_mb"] / 4, (chunked["peak_mb"], plain["peak_mb"])


def tiny(config_class=LlamaConfig, **extra):
    config = config_class(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          **{"tie_word_embeddings": False, **extra})  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_loss_inside_the_model_matches_the_plain_loss(tied):
    """install_loss swaps the LM head for HiddenStates and computes the loss from the hidden states: same loss, same
    gradients, the same parameter names (so checkpoints and exports are unchanged)."""
    input_ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :5] = -100
    results = {}
    for kind in ("plain", "chunked"):
        model = tiny(tie_word_embeddings=tied)
        names = [name for name, _ in model.named_parameters()]
        assert install_loss(model, kind) == kind
        assert [name for name, _ in model.named_parameters()] == names
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        loss.backward()
        results[kind] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results["plain"], results["chunked"]
    reference = torch.nn.functional.cross_entropy(
        tiny(tie_word_embeddings=tied)(input_ids=input_ids).logits[:, :-1].flatten(0, 1),
        labels[:, 1:].flatten(),
        reduction="sum",
    )
    torch.testing.assert_close(plain_loss, reference.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("LlamaForCausalLM", None), ("GPT2LMHeadModel", None), ("MixtralForCausalLM", None),
     ("Qwen3MoeForCausalLM", None), ("Phi3ForCausalLM", None), ("Olmo2ForCausalLM", None),
     ("Gemma2ForCausalLM", "changes the logits"), ("CohereForCausalLM", "changes the logits"),
     ("FalconH1ForCausalLM", "does not apply self.lm_head to the hidden states alone"),
     ("BambaForCausalLM", "uses the logits after the loss")],
)  # fmt: skip
def test_which_forwards_pass_the_head_output_to_the_loss_unchanged(name, reason):
    """Read from transformers' own forwards: a multiplier on the head's line (Falcon-H1), soft-capping or scaling
    before the loss (Gemma-2, Cohere), or a z-loss from the logits after it (Bamba) keep the plain loss."""
    import transformers

    found = _forward_passes_logits_through(getattr(transformers, name))
    assert found is None if reason is None else reason in found


def test_a_model_that_changes_its_logits_keeps_its_head():
    """Gemma-2 soft-caps its logits after the LM head: the hidden states must not be passed for logits there."""
    model = tiny(Gemma2Config, head_dim=8, final_logit_softcapping=30.0)
    assert "changes the logits" in fused_head_supported(model)
    assert install_loss(model, "chunked") == "plain"
    assert not isinstance(model.get_output_embeddings(), HiddenStates)
    assert fused_head_supported(tiny()) is None


@requires_gpu
def test_liger_loss_equals_the_plain_one_on_gpu():
    liger = pytest.importorskip("liger_kernel.transformers")
    torch.manual_seed(0)
    head = HiddenStates(torch.nn.Linear(256, 32000, bias=False, device="cuda", dtype=torch.bfloat16))
    hidden = torch.randn(2, 1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (2, 1024), device="cuda")
    labels[:, ::5] = -100
    results = []
    for compute in (
        lambda: plain_loss_sum(torch.nn.functional.linear(hidden, head.weight), labels),
        lambda: liger_loss_sum(
            hidden, labels, head=head, fused=liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")
        ),
    ):
        hidden.grad = head.weight.grad = None
        loss = compute()
        loss.backward()
        results.append((loss.detach().float(), hidden.grad.float(), head.weight.grad.float()))
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2 * plain.abs().max().item())
