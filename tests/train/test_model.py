"""Activation checkpointing modes: the same numbers as keeping everything, with fewer tensors kept; ``selective``
recomputes every other matmul of a layer (torchtitan's policy), and a mixture-of-experts layer's routing is kept."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, MixtralConfig

from tests.conftest import REPO
from vectorlm.train.activation_checkpointing import apply_activation_checkpointing
from vectorlm.train.model import compile_layers, decoder_layers

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm"}


class RecomputedMatmuls(TorchDispatchMode):
    """Counts the matmuls that run, and names the weights of those that multiply by a weight as the forward does (by
    its transpose, a view of the parameter's storage; the backward's gradient matmuls use the weight as stored): in
    backward, those are the recomputed ones."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.names = {p.untyped_storage().data_ptr(): n.removesuffix(".weight") for n, p in model.named_parameters()}
        self.matmuls, self.others, self.recomputed = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name() in MATMULS:
            self.matmuls += 1
            right = args[2] if func.name() == "aten::addmm" else args[1]
            name = self.names.get(right.untyped_storage().data_ptr())
            if name is not None and not right.is_contiguous():
                self.recomputed[".".join(part for part in name.split(".") if not part.isdigit())] += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def run(model_dir, mode: str, *, lora: bool = False):
    """Loss, gradients, and the operators the backward pass ran (recomputation included)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    if lora:  # peft's adapters, initialised at random (not B = 0) so that every gradient differs from 0
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    names = [name for name, _ in model.named_parameters()]
    apply_activation_checkpointing(decoder_layers(model), mode)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and exports see the same model
    input_ids = torch.randint(2, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    with RecomputedMatmuls(model) as backward:
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, backward


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A 2-layer Mixtral with 4 experts, 2 per token (tests/test_architectures.py's shape)."""
    config = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-moe") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense_runs(tiny_model_dir) -> dict:
    return {mode: run(tiny_model_dir, mode) for mode in ("none", "full", "selective")}


def assert_same_numbers(results: dict) -> None:
    loss, grads, _ = results["none"]
    for mode in ("full", "selective"):
        torch.testing.assert_close(results[mode][0], loss, rtol=1e-5, atol=0)
        assert results[mode][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_full_and_selective_checkpointing_compute_what_keeping_everything_computes(dense_runs):
    assert_same_numbers(dense_runs)
    none, full, selective = (dense_runs[mode][2] for mode in ("none", "full", "selective"))
    assert full.matmuls > selective.matmuls > none.matmuls and full.others > none.others
    assert selective.others > none.others  # norms, activations, rotary embeddings: recomputed
    # Of a layer's 7 matmuls (q, k, v, o, gate, up, down), 3 are recomputed: every other one, counting from the second
    assert selective.matmuls - none.matmuls == 3 * 2


def test_selective_checkpointing_recomputes_every_other_matmul_of_each_layer(dense_runs):
    """The 2nd, 4th and 6th matmul of each layer (k, o and up projections) are recomputed; the 1st, 3rd, 5th and 7th
    (q, v, gate, down) are kept, as are attention's outputs: nothing else that multiplies by a weight runs again."""
    none, full, selective = (dense_runs[mode][2] for mode in ("none", "full", "selective"))
    assert none.recomputed == {}
    layer = "model.layers"
    assert selective.recomputed == {f"{layer}.self_attn.k_proj": 2, f"{layer}.self_attn.o_proj": 2,
                                    f"{layer}.mlp.up_proj": 2}  # fmt: skip
    # full recomputes the other four too (but down: its output is not needed by the backward, which stops before it)
    assert set(full.recomputed) == set(selective.recomputed) | {
        f"{layer}.self_attn.q_proj", f"{layer}.self_attn.v_proj", f"{layer}.mlp.gate_proj"}  # fmt: skip


def test_mixture_of_experts_routing_is_kept_and_gradients_are_unchanged(tiny_moe_dir):
    """Mixtral's layer runs q, k, v, o, the router, then the experts' two grouped matmuls: the router's logits are
    kept (the recomputation routes each token to the same experts) and left out of the count, so k, o and the
    experts' down projection are recomputed."""
    results = {mode: run(tiny_moe_dir, mode) for mode in ("none", "full", "selective")}
    assert_same_numbers(results)
    layer = "model.layers"
    assert results["selective"][2].recomputed == {f"{layer}.self_attn.k_proj": 2, f"{layer}.self_attn.o_proj": 2,
                                                  f"{layer}.mlp.experts.down_proj": 2}  # fmt: skip
    assert f"{layer}.mlp.gate" in results["full"][2].recomputed  # full recomputes the routing too


def test_lora_adapters_are_recomputed_and_not_counted(tiny_model_dir):
    """peft's adapter matmuls are cheap and always recomputed (a kept base output and a kept adapter output beside it
    would be two tensors where one is needed), and left out of the count: the base projections recomputed are those
    of the model without adapters. Gradients are unchanged."""
    results = {mode: run(tiny_model_dir, mode, lora=True) for mode in ("none", "full", "selective")}
    assert_same_numbers(results)
    recomputed = results["selective"][2].recomputed
    layer = "base_model.model.model.layers"
    base = {name: count for name, count in recomputed.items() if ".lora_" not in name}
    assert base == {f"{layer}.self_attn.k_proj.base_layer": 2, f"{layer}.self_attn.o_proj.base_layer": 2,
                    f"{layer}.mlp.up_proj.base_layer": 2}  # fmt: skip
    # every adapter's output is recomputed but down's, which the backward does not need (it stops before)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    assert {f"{layer}.{projection}.lora_B.default" for projection in (*projections, "mlp.up_proj")} <= set(recomputed)


def test_unknown_mode_is_an_error():
    from vectorlm.config import ConfigError, TrainConfig

    with pytest.raises(
        ConfigError,
        match=r"config key train\.activation_checkpointing: 'some' is not one of \['none', 'full', 'selective'",
    ):
        TrainConfig(activation_checkpointing="some")
    assert TrainConfig(activation_checkpointing=False).activation_checkpointing == "none"
    assert TrainConfig(activation_checkpointing=True).activation_checkpointing == "full"


def compiled_run(model_dir: str, mode: str) -> dict:
    """The loss of the model with compiled blocks, and the graphs dynamo built: run in a fresh interpreter, as a
    training rank is, so that what earlier tests left in dynamo's process-wide state cannot decide the result."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    graphs = []

    def count(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    apply_activation_checkpointing(decoder_layers(model), mode)
    compile_layers(model, backend=aot_autograd(fw_compiler=count, bw_compiler=count))  # inductor's tracing
    input_ids = torch.randint(2, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    # Each mm of the forward graph has two in the backward graph (the input's and the weight's gradients); any more
    # are recomputed forward matmuls.
    forward, backward = (sum(node.target == torch.ops.aten.mm.default for node in g.graph.nodes) for g in graphs[:2])
    return {"loss": loss.item(), "graphs": len(graphs), "blocks": len(decoder_layers(model)),
            "recomputed_matmuls": backward - 2 * forward}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "mode"), [("tiny_model_dir", "none"), ("tiny_model_dir", "full"), ("tiny_model_dir", "selective"),
                        ("tiny_moe_dir", "selective")],
)  # fmt: skip
def test_compiled_blocks_are_compiled_under_every_checkpointing_mode(request, model, mode):
    """torch.compile of a block whose forward is checkpointed traces the checkpoint (and the selective policy) into
    the block's graph, whole (``fullgraph``: a graph break would be an error): one forward and one backward graph,
    shared by every block, and the loss is the eager one. The compiled backward recomputes the matmuls that the
    policy leaves (3 of each Llama block's 7 under ``selective``; of a Mixtral block's 5 mm, k and o, the router's
    logits being kept and the experts' matmuls grouped ones), as eager does."""
    model_dir = request.getfixturevalue(model)
    expected, _, _ = run(model_dir, mode)
    script = (
        "import json, sys; from tests.train.test_model import compiled_run as r; print(json.dumps(r(*sys.argv[1:])))"
    )
    command = [sys.executable, "-c", script, str(model_dir), mode]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled["graphs"] == 2 and compiled["blocks"] > 1, compiled
    assert compiled["loss"] == pytest.approx(expected.item(), rel=1e-5)
    if mode == "full":
        assert compiled["recomputed_matmuls"] > 3, compiled
    else:
        assert compiled["recomputed_matmuls"] == {"none": 0, "selective": 3 if model == "tiny_model_dir" else 2}[mode]
