"""Activation checkpointing modes: the same numbers as keeping everything, with fewer tensors kept."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tests.conftest import REPO
from vectorlm.train.model import apply_activation_checkpointing, compile_layers, decoder_layers


class CountOps(TorchDispatchMode):
    """Counts the operators that run: matmuls apart from the rest."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.others = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.matmuls += 1
        else:
            self.others += 1
        return func(*args, **(kwargs or {}))


def run(model_dir, mode: str):
    """Loss, gradients, and the operators the backward pass ran (recomputation included)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    names = [name for name, _ in model.named_parameters()]
    apply_activation_checkpointing(model, mode)
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints and exports see the same model
    input_ids = torch.randint(2, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    with CountOps() as backward:
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, backward


def test_full_and_selective_checkpointing_compute_what_keeping_everything_computes(tiny_model_dir):
    results = {mode: run(tiny_model_dir, mode) for mode in ("none", "full", "selective")}
    loss, grads, none = results["none"]
    for mode in ("full", "selective"):
        torch.testing.assert_close(results[mode][0], loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    full, selective = results["full"][2], results["selective"][2]
    assert full.matmuls > none.matmuls and full.others > none.others  # full recomputes everything
    assert selective.matmuls == none.matmuls and selective.others > none.others  # selective: all but the matmuls


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
    apply_activation_checkpointing(model, mode)
    compile_layers(model, backend=aot_autograd(fw_compiler=count, bw_compiler=count))  # inductor's tracing
    input_ids = torch.randint(2, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    return {"loss": loss.item(), "graphs": len(graphs), "blocks": len(decoder_layers(model))}


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_compiled_blocks_are_compiled_under_every_checkpointing_mode(tiny_model_dir, mode):
    """torch.compile of a block whose forward is checkpointed traces the checkpoint (and the selective policy) into
    the block's graph, whole (``fullgraph``: a graph break would be an error): one forward and one backward graph,
    shared by every block, and the loss is the eager one."""
    expected, _, _ = run(tiny_model_dir, mode)
    script = (
        "import json, sys; from tests.train.test_model import compiled_run as r; print(json.dumps(r(*sys.argv[1:])))"
    )
    command = [sys.executable, "-c", script, str(tiny_model_dir), mode]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.strip().splitlines()[-1])
    assert compiled["graphs"] == 2 and compiled["blocks"] > 1, compiled
    assert compiled["loss"] == pytest.approx(expected.item(), rel=1e-5)
