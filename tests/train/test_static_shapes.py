"""Compiled blocks and compiled losses trace one graph for training and one for evaluation, whatever the batches hold.

Every micro-batch of a run has one shape (vectorlm.data.loader.BatchShape), the loss's chunks one size, and the
varlen path's varying number of documents is symbolic: over many batches of packed rows with random document
boundaries and lengths, dynamo builds no second graph. Counted in a fresh interpreter per case, as a training rank
runs, with every ``torch.compile`` given a backend that counts the graphs of each compiled function (AOT autograd's
tracing, as inductor's, without generating kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from vectorlm.packed import IGNORE_INDEX

WIDTH, ROWS = 64, 2


def random_rows(rng: np.random.Generator, num_rows: int) -> list[dict]:
    """Packed rows of 1 to 4 documents of random lengths; a row is not always full."""
    rows = []
    for _ in range(num_rows):
        lengths = rng.integers(2, WIDTH // 2, size=rng.integers(1, 5))
        lengths = lengths[np.cumsum(lengths) <= WIDTH]
        ids = rng.integers(2, 300, size=int(lengths.sum()))
        positions = np.concatenate([np.arange(n) for n in lengths])
        labels = np.where(positions == 0, IGNORE_INDEX, ids)
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


def varlen_reference() -> None:
    """Installs a flash_attn module whose varlen function is a per-document sdpa reference, registered as custom ops
    (forward and backward) as flash-attn >= 2.7 registers its kernels, so that dynamo sees it as one opaque op."""
    import types

    from tests.train.test_attention import reference_varlen

    @torch.library.custom_op("vectorlm_test::varlen", mutates_args=())
    def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int,
               scale: float) -> torch.Tensor:  # fmt: skip
        return reference_varlen(q, k, v, cu, cu, max_length, max_length, softmax_scale=scale, causal=True)

    @torch.library.custom_op("vectorlm_test::varlen_backward", mutates_args=())
    def varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                        max_length: int, scale: float) -> list[torch.Tensor]:  # fmt: skip
        def attend(*qkv):
            return reference_varlen(*qkv, cu, cu, max_length, max_length, softmax_scale=scale, causal=True)

        return list(torch.func.vjp(attend, q, k, v)[1](grad))  # autograd is off inside a custom op: functorch

    varlen.register_fake(lambda q, k, v, cu, max_length, scale: torch.empty_like(q))
    varlen_backward.register_fake(lambda grad, q, k, v, *_: [torch.empty_like(q), torch.empty_like(k),
                                                              torch.empty_like(v)])  # fmt: skip

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.max_length, ctx.scale = inputs[4], inputs[5]

    def backward(ctx, grad):
        return *varlen_backward(grad, *ctx.saved_tensors, ctx.max_length, ctx.scale), None, None, None

    varlen.register_autograd(backward, setup_context=setup_context)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0):  # fmt: skip
        assert causal and window_size == (-1, -1) and not softcap
        return varlen(q, k, v, cu_q, max_q, softmax_scale or q.shape[-1] ** -0.5)

    sys.modules["flash_attn"] = types.ModuleType("flash_attn")
    sys.modules["flash_attn"].flash_attn_varlen_func = flash_attn_varlen_func


def graph_counts(model_dir: str, attention: str, loss: str, steps: str) -> dict:
    """The graphs each compiled function built over ``steps`` training steps, then over evaluation batches."""
    from collections import Counter

    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from vectorlm.data.loader import BatchShape, collate
    from vectorlm.train.attention import model_attention
    from vectorlm.train.loss import install_loss
    from vectorlm.train.model import compile_layers
    from vectorlm.train.step import loss_sum

    graphs, backends, compile = Counter(), {}, torch.compile

    def counting_compile(fn, **options):
        label = fn.__qualname__
        if label not in backends:  # one backend object per function: the blocks share their compiled graphs

            def backend(graph, example_inputs, label=label):
                graphs[label] += 1
                return aot_eager(graph, example_inputs)

            backends[label] = backend
        return compile(fn, **{**options, "backend": backends[label]})

    torch.compile = counting_compile
    flatten = attention == "varlen"
    if flatten:
        varlen_reference()
        attention = "flash_attention_2"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=model_attention(attention),
                                                 dtype=torch.float32)  # fmt: skip
    install_loss(model, loss, compile=True)
    compile_layers(model)
    # flex attention has no backward on a CPU: its training graph is traced with nothing to differentiate.
    model.requires_grad_(attention != "flex_attention")
    rng, shape = np.random.default_rng(0), BatchShape(ROWS, WIDTH)
    for _ in range(int(steps)):
        batch = collate(random_rows(rng, ROWS), flatten=flatten, shape=shape)
        total = loss_sum(model, batch)
        if total.requires_grad:
            total.backward()
    training = dict(graphs)
    model.eval()
    with torch.no_grad():
        for num_rows in (ROWS, ROWS, 1):  # the last evaluation batch may be short
            loss_sum(model, collate(random_rows(rng, num_rows), flatten=flatten, shape=shape))
    return {"training": training, "all": dict(graphs), "graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("loss", ["plain", "chunked"])
@pytest.mark.parametrize("attention", ["sdpa", "eager", "flex_attention", "varlen"])
def test_one_graph_for_training_and_one_for_evaluation(tiny_model_dir, attention, loss):
    script = "import json, sys; from tests.train.test_static_shapes import graph_counts as g; " \
             "print(json.dumps(g(*sys.argv[1:])))"  # fmt: skip
    command = [sys.executable, "-c", script, str(tiny_model_dir), attention, loss, "50"]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert "recompile_limit" not in result.stderr and counts["graph_breaks"] == 0, result.stderr[-3000:]
    assert "Module._call_impl" in counts["all"] and len(counts["all"]) >= 2, counts  # the blocks and the loss
    for label, built in counts["all"].items():  # a loss may compile one function for training, one for evaluation
        trained = counts["training"].get(label, 0)
        assert trained <= 1 and built - trained <= 1, counts
    assert counts["training"]["Module._call_impl"] == 1 and counts["all"]["Module._call_impl"] == 2, counts
