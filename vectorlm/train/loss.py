"""The training loss, computed inside the model's forward without the full-vocabulary logits.

A micro-batch of 4 x 4,096 tokens with Llama 3's 128,256-token vocabulary has 8.4 GB of fp32 logits, and the plain
loss keeps them, their softmax and their gradient alive at once. ``chunked`` (:class:`ChunkedLinearCrossEntropy`)
applies the LM head to 1,024 tokens at a time and recomputes each chunk's logits in backward (one more LM-head
matmul), so only one chunk's logits ever exist. ``liger`` is Liger's fused linear cross-entropy (Triton, GPU only, the ``liger`` extra), which computes the
gradients chunk by chunk in the forward pass instead.

The loss runs as the model's ``loss_function``, inside its forward, where FSDP2 has gathered the LM head's weight; the
LM head itself is replaced by :class:`HiddenStates`, which keeps its parameters (and their names) and hands the
final hidden states to the loss. That is only right when the model's forward passes the LM head's output to the loss
unchanged; a model that scales or soft-caps its logits (Gemma-2, Cohere, Granite) keeps its LM head and the plain
loss (:func:`fused_head_supported`).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vectorlm.config import ConfigError
from vectorlm.packed import IGNORE_INDEX

log = logging.getLogger(__name__)

LOSS_CHUNK_TOKENS = 1024  # 525 MB of fp32 logits per chunk at a 128,256-token vocabulary


class HiddenStates(nn.Module):
    """Stands where the LM head was, with its weight (and bias): returns the hidden states it is given, for the loss
    to apply the head chunk by chunk."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def shifted(tensor: torch.Tensor) -> torch.Tensor:
    """The next-token targets: labels from the second position on, flattened."""
    return tensor[:, 1:].flatten()


def plain_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, **__) -> torch.Tensor:
    """Summed next-token cross-entropy over the loss tokens (labels != -100), in fp32, from full logits."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted(labels), ignore_index=IGNORE_INDEX,
                           reduction="sum")  # fmt: skip


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    """A chunk's summed loss and the gradient of that sum with respect to its logits (in the logits' dtype)."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    kept = (targets != IGNORE_INDEX)[:, None]
    grad = torch.softmax(logits, dim=-1) * kept  # d(-log softmax[t]) / d logits = softmax - one_hot(t)
    grad.scatter_add_(1, targets.clamp(min=0)[:, None], -kept.float())
    return loss, grad.to(hidden.dtype)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b summed in fp32 and returned in fp32 (bf16 inputs on a GPU stay bf16 in the matmul)."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):  # a torch or GPU without bf16 -> fp32 matmuls
            pass
    return torch.mm(a.float(), b.float())


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias``, :data:`LOSS_CHUNK_TOKENS` tokens at a time.

    The forward keeps only its inputs; the backward recomputes each chunk's logits and adds the chunk's weight
    gradient into an fp32 buffer, rounded to the weight's dtype once at the end. (Autograd would add 16 or more bf16
    chunk gradients of the LM head one into the other in bf16, as FSDP's unsharded bf16 parameter receives them.)
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_fn):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), LOSS_CHUNK_TOKENS):
            part = slice(start, start + LOSS_CHUNK_TOKENS)
            total += F.cross_entropy(F.linear(hidden[part], weight, bias).float(), targets[part],
                                     ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_fn = chunk_fn
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        for start in range(0, len(targets), LOSS_CHUNK_TOKENS):
            part = slice(start, start + LOSS_CHUNK_TOKENS)
            _, grad_logits = ctx.chunk_fn(hidden[part], weight, bias, targets[part])
            grad_logits = grad_logits * grad_total.to(grad_logits.dtype)
            grad_hidden[part] = grad_logits @ weight
            grad_weight += _mm_fp32(grad_logits.t(), hidden[part])
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype), None if bias is None else grad_bias.to(bias.dtype), None,
                None)  # fmt: skip


def chunked_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, head: HiddenStates, chunk_fn=_chunk_loss,
                     **__) -> torch.Tensor:  # fmt: skip
    """The same sum as :func:`plain_loss_sum` from the final hidden states (which the model passes as ``logits``),
    with the LM head applied :data:`LOSS_CHUNK_TOKENS` tokens at a time and each chunk's logits recomputed in backward
    instead of kept."""
    return ChunkedLinearCrossEntropy.apply(logits[:, :-1].flatten(0, 1), head.weight, head.bias, shifted(labels),
                                           chunk_fn)  # fmt: skip


def liger_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, head: HiddenStates, fused: nn.Module,
                   **__) -> torch.Tensor:  # fmt: skip
    """Liger's fused linear cross-entropy from the final hidden states (passed as ``logits``), summed."""
    return fused(head.weight, logits[:, :-1].flatten(0, 1), shifted(labels), head.bias)


def fused_head_supported(model: nn.Module) -> str | None:
    """None when ``model``'s forward hands the LM head's output to its loss unchanged and uses it for nothing else,
    else why not. Read from the forward's source: the head's line must be exactly ``x = self.lm_head(hidden_states)``
    (or of its sliced states), ``x`` not reassigned before the loss, and after the loss only returned."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain Linear"
    return _forward_passes_logits_through(type(model))


def _forward_passes_logits_through(model_class: type) -> str | None:
    source = inspect.getsource(model_class.forward)
    found = re.search(r"^\s*(\w+) = self\.lm_head\(hidden_states(\[:, slice_indices, :\])?\)\s*$", source, re.MULTILINE)
    call = source.find("self.loss_function(")
    if found is None or call < found.end():
        return "its forward does not apply self.lm_head to the hidden states alone and then self.loss_function"
    name = found.group(1)
    if re.search(rf"^\s*{name}\s*[-+*/]?=", source[found.end() : call], flags=re.MULTILINE):
        return "its forward changes the logits between the LM head and the loss (scaling or soft-capping)"
    depth, end = 0, call + len("self.loss_function")
    while True:  # to just past the call's closing parenthesis
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        end += 1
        if depth == 0:
            break
    if re.search(rf"\b{name}\b", re.sub(rf"\blogits={name}\b", "", source[end:])):
        return "its forward uses the logits after the loss (e.g. for an extra loss term)"
    return None


def resolve_loss(requested: str, device: torch.device) -> str:
    """The loss to use: ``auto`` is ``liger`` on a GPU where liger-kernel is installed, else ``chunked``."""
    has_liger = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if requested == "auto":
        return "liger" if has_liger else "chunked"
    if requested == "liger" and not has_liger:
        raise ConfigError("train.loss: liger needs a CUDA GPU and the liger-kernel package (pip install "
                          "vectorlm-pipeline[liger])")  # fmt: skip
    return requested


def has_loss(model: nn.Module) -> bool:
    """Whether :func:`install_loss` made ``model(..., labels=labels).loss`` our summed loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "vectorlm_loss")


def install_loss(model: nn.Module, kind: str, *, compile: bool = False) -> str:
    """Makes ``model(..., labels=labels).loss`` the summed token loss of ``kind`` (plain, chunked, liger); returns the
    kind installed, which is ``plain`` for a model whose logits are changed after the LM head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    if kind != "plain" and (reason := fused_head_supported(base)):
        log.info("train.loss: %s is not available for %s (%s); using the plain loss", kind, type(base).__name__, reason)
        kind = "plain"
    base.vectorlm_loss = kind
    if kind == "plain":
        base.loss_function = torch.compile(plain_loss_sum) if compile else plain_loss_sum
        return kind
    head = HiddenStates(base.get_output_embeddings())
    base.set_output_embeddings(head)
    if kind == "chunked":
        chunk_fn = torch.compile(_chunk_loss, dynamic=False) if compile else _chunk_loss
        base.loss_function = partial(chunked_loss_sum, head=head, chunk_fn=chunk_fn)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
        base.loss_function = partial(liger_loss_sum, head=head, fused=fused)
    return kind
