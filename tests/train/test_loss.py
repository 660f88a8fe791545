"""The fused loss without full-vocabulary logits: the same numbers as the plain computation, a fraction of the memory,
three LM-head matmuls per chunk, one compiled graph."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
)

import vectorlm.train.loss
from tests.conftest import REPO, requires_gpu
from vectorlm.config import ConfigError
from vectorlm.train.loss import (
    HiddenStates,
    LogitTransform,
    UnfusedHead,
    chunked_loss_sum,
    forward_logit_change,
    fused_head_supported,
    install_loss,
    liger_loss,
    liger_loss_sum,
    logit_transform,
    plain_loss_sum,
    resolve_loss,
)

VOCAB = 300


def measure(kind: str, mode: str, out) -> dict:
    """bench/loss_memory.py's measurement: a fresh process's peak memory, and the loss and gradients it computed."""
    sys.path.insert(0, str(REPO / "bench"))
    from loss_memory import measure as bench_measure

    return bench_measure(kind, mode, out, vocab=32000)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_chunked_loss_equals_the_plain_one_in_a_quarter_of_the_memory(tmp_path, mode):
    """Vocabulary 32,000 (Llama-2's), hidden 256, 4 x 2,048 tokens, fp32: loss and gradients equal, peak memory of
    forward plus backward (or forward alone, for evaluation) at most a quarter. (bench/loss_memory.py measures
    Llama-3's 128,256.)"""
    plain, chunked = measure("plain", mode, tmp_path / "plain.pt"), measure("chunked", mode, tmp_path / "chunked.pt")
    torch.testing.assert_close(chunked["loss"], plain["loss"], rtol=1e-5, atol=0)
    if mode == "train":
        for name in ("hidden", "weight"):
            scale = plain[name].abs().max()
            torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-5 * scale)
    assert plain["peak_mb"] > 1000  # the full logits (1 GB in fp32) were there to be avoided
    assert chunked["peak_mb"] <= plain["peak_mb"] / 4, (chunked["peak_mb"], plain["peak_mb"])


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 tokens, so that tiny batches have several, the last one partial."""
    monkeypatch.setattr(vectorlm.train.loss, "LOSS_CHUNK_TOKENS", 16)


def tiny(config_class=LlamaConfig, **extra):
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          **{"tie_word_embeddings": False, **extra})  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 rows of 45 tokens: 90 positions, 5 chunks of 16 and a partial one; the first chunk has no target at all."""
    input_ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :20] = -100
    labels[1, ::4] = -100
    return input_ids, labels


MODELS = {  # transforms large enough to matter for logits of these tiny random models (|logits| ~ 0.1 to 1)
    "untied": lambda: tiny(),
    "tied": lambda: tiny(tie_word_embeddings=True),
    "head_bias": lambda: tiny(PhiConfig, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
    "softcapped": lambda: tiny(Gemma2Config, head_dim=8, final_logit_softcapping=0.1),  # Gemma-2
    "scaled": lambda: tiny(CohereConfig, logit_scale=4.0),  # Cohere
    "divided": lambda: tiny(GraniteConfig, logits_scaling=0.25),  # Granite
}


@pytest.mark.parametrize("architecture", MODELS)
def test_the_loss_inside_the_model_matches_the_model_own_logits(architecture, small_chunks):
    """install_loss swaps the LM head for HiddenStates and computes the loss from the hidden states, soft-capping or
    scaling each chunk's logits as the model's forward does: the loss and every gradient of the summed cross-entropy
    of the model's own logits, the same parameter names (so checkpoints and exports are unchanged)."""
    input_ids, labels = batch()
    results = {}
    for kind in ("reference", "chunked"):
        model = MODELS[architecture]()
        names = [name for name, _ in model.named_parameters()]
        if kind == "chunked":
            assert install_loss(model, kind) == kind
            assert isinstance(model.get_output_embeddings(), HiddenStates)
            loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        else:
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     reduction="sum")  # fmt: skip
        assert [name for name, _ in model.named_parameters()] == names
        loss.backward()
        results[kind] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    with torch.no_grad():  # evaluation: the loss alone
        evaluated = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    (reference, reference_grads), (chunked, chunked_grads) = results["reference"], results["chunked"]
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(evaluated, reference, rtol=1e-5, atol=0)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max(), msg=name)


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(softcap=0.5), LogitTransform(scale=3.0)],
                         ids=["plain", "softcapped", "scaled"])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gradients_of_hidden_weight_and_bias_equal_autograd_of_the_plain_loss(bias, transform, small_chunks):
    """Straight on the loss: gradients with respect to the hidden states, the head's weight and its bias, scaled by
    the loss's own gradient, train and evaluation losses equal."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 50, bias=bias)
    hidden = torch.randn(3, 13, 8).mul(3).requires_grad_()
    labels = torch.randint(0, 50, (3, 13))
    labels[0], labels[1, ::3] = -100, -100
    options = {"scale": transform.scale, "softcap": transform.softcap}
    chunks = {"train_chunk": lambda *a: vectorlm.train.loss._chunk_loss_and_grads(*a, **options),
              "eval_chunk": lambda *a: vectorlm.train.loss._chunk_loss(*a, **options)}  # fmt: skip
    results = []
    for compute in ("chunked", "plain"):
        hidden.grad = None
        linear.zero_grad()
        if compute == "chunked":
            loss = chunked_loss_sum(hidden, labels, head=HiddenStates(linear), **chunks)
        else:
            logits = linear(hidden) * transform.scale
            if transform.softcap:
                logits = transform.softcap * torch.tanh(logits / transform.softcap)
            loss = plain_loss_sum(logits, labels)
        (loss * 0.7).backward()
        results.append([loss.detach(), hidden.grad, *(p.grad.clone() for p in linear.parameters())])
    for chunked, plain in zip(*results):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        evaluated = chunked_loss_sum(hidden, labels, head=HiddenStates(linear), **chunks)
    torch.testing.assert_close(evaluated, results[1][0], rtol=1e-5, atol=0)


class LMHeadMatmuls(TorchDispatchMode):
    """Counts matrix products with an operand of the vocabulary's size (LM-head matmuls), and their FLOPs."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.count, self.flops = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = args[-2:] if packet is not torch.ops.aten.mm else args[:2]
            if self.vocab in (*a.shape, *b.shape):
                self.count += 1
                self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_three_lm_head_matmuls_per_chunk_in_training_and_one_in_evaluation(head, small_chunks):
    """Forward and backward of 90 tokens (6 chunks of 16, the last padded): the logits, the hidden states' gradient
    and the weight's gradient, each once per chunk, all in the forward pass; evaluation only the logits. A frozen head
    (LoRA) skips the weight's. The FLOPs are those of 16-token chunks (the last one's padding included)."""
    model = tiny()
    install_loss(model, "chunked")
    model.get_output_embeddings().weight.requires_grad_(head == "trained")
    input_ids, labels = batch()
    per_chunk = 3 if head == "trained" else 2
    with LMHeadMatmuls(VOCAB) as train:
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    forward_count = train.count
    with train:
        loss.backward()
    assert forward_count == train.count == per_chunk * 6
    assert train.flops == per_chunk * 6 * 2 * 16 * 32 * VOCAB
    with torch.no_grad(), LMHeadMatmuls(VOCAB) as evaluation:
        model(input_ids=input_ids, labels=labels, use_cache=False)
    assert evaluation.count == 6
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # it sees the weight gradient's product (an addmm) too
        model(input_ids=input_ids, labels=labels, use_cache=False).loss.backward()
    weight_gradient = counter.get_flop_counts()["Global"].get(torch.ops.aten.addmm, 0)
    assert weight_gradient == (per_chunk - 2) * 6 * 2 * 16 * 32 * VOCAB


def test_the_compiled_chunk_is_one_graph_for_training_and_one_for_evaluation(small_chunks, monkeypatch):
    """Every chunk has one shape: batches of 96, 150 and 7 tokens build one training graph, evaluation one more."""
    graphs, compile_ = [], torch.compile

    def counting(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def compile_counting(fn, **options):
        assert options == {"fullgraph": True, "dynamic": False}
        return compile_(fn, backend=counting, **options)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_counting)
    model = tiny(Gemma2Config, head_dim=8, final_logit_softcapping=0.1)
    assert install_loss(model, "chunked", compile=True) == "chunked"
    try:
        for rows, length in ((2, 48), (3, 50), (1, 7)):
            input_ids = torch.randint(0, VOCAB, (rows, length))
            model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
            assert len(graphs) == 1
        with torch.no_grad():
            for rows, length in ((2, 48), (3, 50)):
                input_ids = torch.randint(0, VOCAB, (rows, length))
                model(input_ids=input_ids, labels=input_ids, use_cache=False)
        assert len(graphs) == 2
    finally:
        torch._dynamo.reset()


def test_a_second_backward_through_the_stored_gradients_fails():
    """The backward scales the stored gradients in place: going through it twice must fail, not double them."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    loss = chunked_loss_sum(hidden, torch.randint(0, 50, (2, 5)), head=HiddenStates(torch.nn.Linear(8, 50)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class DoubledLogits(LlamaForCausalLM):
    """A forward that changes its logits in a way the fused loss does not know."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits * 2.0
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class OtherSoftcap(LlamaForCausalLM):
    """Gemma-2's soft-capping under another condition: not the same computation."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden_states)
        if self.training:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


@pytest.mark.parametrize(
    ("model_class", "reason"),
    [("LlamaForCausalLM", None), ("GPT2LMHeadModel", None), ("MixtralForCausalLM", None),
     ("Qwen3MoeForCausalLM", None), ("Phi3ForCausalLM", None), ("Olmo2ForCausalLM", None),
     ("Gemma2ForCausalLM", None), ("Gemma3ForCausalLM", None), ("Gemma3ForConditionalGeneration", None),
     ("CohereForCausalLM", None), ("Cohere2ForCausalLM", None), ("GraniteForCausalLM", None),
     (DoubledLogits, "changes the logits between the LM head and the loss in a way not recognised"),
     (OtherSoftcap, "changes the logits between the LM head and the loss in a way not recognised"),
     ("FalconH1ForCausalLM", "does not apply self.lm_head to the hidden states alone"),
     ("BambaForCausalLM", "uses the logits after the loss")],
)  # fmt: skip
def test_which_forwards_the_fused_loss_can_stand_in_for(model_class, reason):
    """Read from transformers' own forwards: soft-capping (Gemma-2/3) and scaling (Cohere, Granite) are recognised;
    another change of the logits, a multiplier on the head's line (Falcon-H1) or a z-loss from the logits after the
    loss (Bamba) keep the plain loss."""
    model_class = getattr(transformers, model_class) if isinstance(model_class, str) else model_class
    if reason is None:
        forward_logit_change(model_class)
    else:
        with pytest.raises(UnfusedHead, match=reason):
            forward_logit_change(model_class)


def test_the_transforms_read_their_parameters_where_the_forward_does():
    assert logit_transform(tiny()) == LogitTransform()
    assert logit_transform(tiny(Gemma2Config, head_dim=8, final_logit_softcapping=30.0)) == LogitTransform(softcap=30)
    assert logit_transform(tiny(Gemma2Config, head_dim=8, final_logit_softcapping=None)) == LogitTransform()
    assert logit_transform(tiny(CohereConfig, logit_scale=0.0625)) == LogitTransform(scale=0.0625)
    assert logit_transform(tiny(GraniteConfig, logits_scaling=8.0)) == LogitTransform(scale=0.125)


def test_a_model_with_an_unrecognised_change_keeps_its_head():
    model = DoubledLogits(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert "not recognised" in fused_head_supported(model)
    assert install_loss(model, "chunked") == "plain"
    assert not isinstance(model.get_output_embeddings(), HiddenStates)
    assert fused_head_supported(tiny()) is None


def test_auto_is_chunked_everywhere_and_liger_needs_a_gpu(monkeypatch):
    """Liger waits for the GPU (its .item() and torch.equal): auto never picks it, even where it is installed."""
    monkeypatch.setattr(vectorlm.train.loss.importlib.util, "find_spec", lambda name: object())
    assert resolve_loss("auto", torch.device("cuda")) == "chunked"
    assert resolve_loss("auto", torch.device("cpu")) == "chunked"
    assert resolve_loss("liger", torch.device("cuda")) == "liger"
    with pytest.raises(ConfigError, match="liger needs a CUDA GPU"):
        resolve_loss("liger", torch.device("cpu"))


def gpu_results(head, hidden, labels, computes) -> list[tuple[torch.Tensor, ...]]:
    results = []
    for compute in computes:
        hidden.grad = head.weight.grad = None
        loss = compute()
        loss.backward()
        results.append((loss.detach().float(), hidden.grad.float(), head.weight.grad.float()))
    return results


def gpu_inputs(vocab=32000, hidden_size=256):
    torch.manual_seed(0)
    head = HiddenStates(torch.nn.Linear(hidden_size, vocab, bias=False, device="cuda", dtype=torch.bfloat16))
    hidden = torch.randn(2, 1000, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 1000), device="cuda")
    labels[:, ::5] = -100
    return head, hidden, labels


@requires_gpu
def test_the_chunked_loss_on_gpu_in_bf16_never_waits_and_matches_fp32():
    """bf16 inputs, the weight gradient summed in fp32 (addmm with out_dtype), under CUDA's sync debug mode: no
    synchronisation, and loss and gradients those of the fp32 plain loss within bf16's precision."""
    head, hidden, labels = gpu_inputs()
    chunked = partial(chunked_loss_sum, hidden, labels, head=head)
    chunked().backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (fused,) = gpu_results(head, hidden, labels, [chunked])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    weight = head.weight.detach().float().requires_grad_()
    exact = hidden.detach().float().requires_grad_()
    loss = plain_loss_sum(torch.nn.functional.linear(exact, weight), labels)
    loss.backward()
    for value, reference in zip(fused, (loss.detach(), exact.grad, weight.grad)):
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


@requires_gpu
def test_liger_loss_equals_the_plain_one_on_gpu():
    pytest.importorskip("liger_kernel.transformers")
    head, hidden, labels = gpu_inputs()
    plain, liger = gpu_results(head, hidden, labels, [
        lambda: plain_loss_sum(torch.nn.functional.linear(hidden, head.weight), labels),
        lambda: liger_loss_sum(hidden, labels, head=head, fused=liger_loss(None)),
    ])  # fmt: skip
    for reference, value in zip(plain, liger):
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
