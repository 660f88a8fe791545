"""The training loss, computed inside the model's forward without the full-vocabulary logits.

A micro-batch of 4 x 4,096 tokens with Llama 3's 128,256-token vocabulary has 8.4 GB of fp32 logits, and the plain
loss keeps them, their softmax and their gradient alive at once. ``chunked`` (:class:`FusedLinearCrossEntropy`) is a
fused linear cross-entropy: in the forward pass, :data:`LOSS_CHUNK_TOKENS` tokens at a time, it computes the chunk's
logits, its loss and every gradient (three LM-head matmuls per chunk, where recomputing the logits in backward takes
four), so only one chunk's logits ever exist, and the backward pass only scales the stored gradients. The LM head's
weight gradient is summed over the chunks in fp32 and rounded once. Every chunk has the same shape (the last one is
padded), nothing waits for the GPU, and a compiled chunk is one graph whatever the number of tokens. ``liger`` is
Liger's fused linear cross-entropy (Triton, GPU only, the ``liger`` extra), which waits for the GPU twice per
micro-batch (:func:`liger_loss`).

The loss runs as the model's ``loss_function``, inside its forward, where FSDP2 has gathered the LM head's weight; the
LM head itself is replaced by :class:`HiddenStates`, which keeps its parameters (and their names) and hands the
final hidden states to the loss. A forward may change the logits between the head and the loss only in the ways
:data:`LOGIT_CHANGES` recognises (Gemma-2/3's soft-capping, Cohere's and Granite's scaling), which the fused loss then
applies to each chunk itself; any other model keeps its LM head and the plain loss (:func:`fused_head_supported`).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import textwrap
from dataclasses import dataclass
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
    to apply the head chunk by chunk. With ``hold``, for a forward that changes what the head returns before passing
    it to the loss (soft-capping, scaling), it also keeps them for the loss to :meth:`take`."""

    def __init__(self, head: nn.Linear, *, hold: bool = False) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features
        self.hold, self.held = hold, None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hold:
            self.held = hidden
        return hidden

    def take(self, passed: torch.Tensor) -> torch.Tensor:
        """The hidden states of this forward: those held, else ``passed`` (what the forward handed to the loss)."""
        if not self.hold:
            return passed
        hidden, self.held = self.held, None
        return hidden


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next-token target, flattened, with none (-100) after a row's last token: one per hidden state,
    so that the hidden states are used as they are, without copying all but each row's last."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()


def plain_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, **__) -> torch.Tensor:
    """Summed next-token cross-entropy over the loss tokens (labels != -100), in fp32, from full logits."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")  # fmt: skip


def plain_token_logps(logits: torch.Tensor, labels: torch.Tensor, *_, **__) -> torch.Tensor:
    """Each position's log-probability of its next-token target (0 where there is none), flattened, in fp32, from full
    logits: the per-token form of :func:`plain_loss_sum` (preference training sums it per completion)."""
    targets = next_token_targets(labels)
    return -F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def _chunk_logits(hidden, weight, bias, targets, *, scale: float, softcap: float | None):
    """A chunk's logits in fp32 as the model's forward would pass them to its loss (``scale`` times the head's output,
    then ``softcap * tanh(logits / softcap)``), their logsumexp, the rows with a target, and the summed loss."""
    logits = F.linear(hidden, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logsumexp = torch.logsumexp(logits, dim=-1)
    kept = targets != IGNORE_INDEX
    picked = logits.gather(1, torch.where(kept, targets, 0)[:, None])[:, 0]
    return logits, logsumexp, kept, torch.where(kept, logsumexp - picked, 0.0).sum(), picked


def _chunk_loss(hidden, weight, bias, targets, *, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """A chunk's summed loss, for evaluation: one LM-head matmul."""
    return _chunk_logits(hidden, weight, bias, targets, scale=scale, softcap=softcap)[3]


def _chunk_loss_and_grads(hidden, weight, bias, targets, *, scale: float = 1.0, softcap: float | None = None):
    """A chunk's summed loss, the gradient of that sum with respect to the LM head's output (in the hidden states'
    dtype) and to the hidden states (the second matmul), and with respect to the bias (fp32, or None)."""
    logits, logsumexp, kept, loss, _ = _chunk_logits(hidden, weight, bias, targets, scale=scale, softcap=softcap)
    # d(logsumexp - logits[target]) / d logits = softmax - one_hot(target), on the rows with a target
    grad = (logits - logsumexp[:, None]).exp_().mul_(kept[:, None])
    grad.scatter_add_(1, torch.where(kept, targets, 0)[:, None], -kept[:, None].float())
    if softcap is not None:  # d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2, and tanh(z / c) = logits / c
        grad.mul_(1 - (logits / softcap).square())
    if scale != 1.0:
        grad.mul_(scale)
    grad_bias = None if bias is None else grad.sum(0)
    grad = grad.to(hidden.dtype)
    return loss, grad, grad @ weight, grad_bias


_MIXED_ADDMM: dict[torch.device, bool] = {}  # whether addmm(out_dtype=fp32, out=) works, by device


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b``: ``total`` in fp32, ``a`` and ``b`` multiplied in their own dtype (bf16 on tensor cores)."""
    if a.dtype == total.dtype or not a.is_cuda:  # a CPU has no mixed-dtype matmul
        torch.addmm(total, a.to(total.dtype), b.to(total.dtype), out=total)  # (FlopCounterMode skips addmm_)
        return
    if _MIXED_ADDMM.get(a.device, True):
        try:  # in place, products summed in fp32
            torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
            _MIXED_ADDMM[a.device] = True
            return
        except RuntimeError as error:  # tried once per device, not in every chunk
            _MIXED_ADDMM[a.device] = False
            log.warning("train.loss: this torch cannot add a bf16 matmul into an fp32 buffer in place (%s); each "
                        "chunk adds an fp32 product instead: one more vocabulary x hidden fp32 temporary", error)  # fmt: skip
    total += torch.mm(a, b, out_dtype=total.dtype)


def _chunks(hidden: torch.Tensor, targets: torch.Tensor):
    """(first token, hidden states, targets) of each chunk of :data:`LOSS_CHUNK_TOKENS` tokens. The last chunk is
    padded with zero hidden states and no targets, so that every chunk has the same shape (one compiled graph)."""
    size = LOSS_CHUNK_TOKENS
    for start in range(0, len(targets), size):
        part, part_targets = hidden[start : start + size], targets[start : start + size]
        if len(part_targets) < size:
            part = F.pad(part, (0, 0, 0, size - len(part_targets)))
            part_targets = F.pad(part_targets, (0, size - len(part_targets)), value=IGNORE_INDEX)
        yield start, part, part_targets


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the (scaled, soft-capped) logits ``hidden @ weight.T + bias``, with its gradients
    computed chunk by chunk in the forward pass and stored.

    The weight gradient is summed into an fp32 buffer and rounded to the weight's dtype once at the end (autograd
    would add 16 or more bf16 chunk gradients of the LM head one into the other in bf16). The backward multiplies the
    stored gradients by the loss's gradient in place: no copy of the LM head's gradient, and no test of its value
    (Liger skips the multiplication when it is 1, which waits for the GPU).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_fn):
        needs_weight, needs_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        for start, part, part_targets in _chunks(hidden.detach(), targets):
            loss, grad_logits, part_grad_hidden, part_grad_bias = chunk_fn(part, weight, bias, part_targets)
            total += loss
            grad_hidden[start : start + LOSS_CHUNK_TOKENS] = part_grad_hidden[: len(hidden) - start]
            if needs_weight:
                _add_product(grad_weight, grad_logits.t(), part)
            if needs_bias:
                grad_bias += part_grad_bias
        ctx.save_for_backward(
            grad_hidden if ctx.needs_input_grad[0] else None,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # In place: a second backward through the same graph finds them changed and fails, as autograd should.
        grads = [None if grad is None else grad.mul_(grad_total) for grad in ctx.saved_tensors]
        return *grads, None, None


def _chunk_token_logps(hidden, weight, bias, targets, *, scale: float = 1.0, softcap: float | None = None):
    """A chunk's log-probability of each row's target (0 where there is none): one LM-head matmul."""
    _, logsumexp, kept, _, picked = _chunk_logits(hidden, weight, bias, targets, scale=scale, softcap=softcap)
    return torch.where(kept, picked - logsumexp, 0.0)


def _chunk_token_grads(hidden, weight, bias, targets, grad_logps, *, scale: float = 1.0, softcap: float | None = None):
    """The gradients of ``sum(grad_logps * token log-probabilities)`` of a chunk with respect to the LM head's output
    (in the hidden states' dtype), the hidden states and the bias (fp32, or None), the logits recomputed."""
    logits, logsumexp, kept, _, _ = _chunk_logits(hidden, weight, bias, targets, scale=scale, softcap=softcap)
    weights = torch.where(kept, grad_logps, 0.0)[:, None]
    # d(logits[target] - logsumexp) / d logits = one_hot(target) - softmax
    grad = (logits - logsumexp[:, None]).exp_().mul_(-weights)
    grad.scatter_add_(1, torch.where(kept, targets, 0)[:, None], weights)
    if softcap is not None:
        grad.mul_(1 - (logits / softcap).square())
    if scale != 1.0:
        grad.mul_(scale)
    grad_bias = None if bias is None else grad.sum(0)
    grad = grad.to(hidden.dtype)
    return grad, grad @ weight, grad_bias


class ChunkedTokenLogProbs(torch.autograd.Function):
    """Each token's log-probability of its target under the (scaled, soft-capped) logits ``hidden @ weight.T + bias``,
    :data:`LOSS_CHUNK_TOKENS` tokens at a time: one chunk's logits exist at a time, never the full vocabulary's.

    The loss of a preference pair is not a sum over tokens, so its gradient with respect to each token is known only
    after the forward: the backward recomputes each chunk's logits (four LM-head matmuls per chunk in all, one more
    than :class:`FusedLinearCrossEntropy`) and sums the weight gradient in fp32, rounded once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_fn, grad_fn):
        logps = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        for start, part, part_targets in _chunks(hidden.detach(), targets):
            logps[start : start + LOSS_CHUNK_TOKENS] = chunk_fn(part, weight, bias, part_targets)[: len(hidden) - start]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.grad_fn = grad_fn
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        padded = F.pad(grad_logps.float(), (0, -len(grad_logps) % LOSS_CHUNK_TOKENS))
        for start, part, part_targets in _chunks(hidden.detach(), targets):
            part_grad = padded[start : start + LOSS_CHUNK_TOKENS]
            grad_logits, part_grad_hidden, part_grad_bias = ctx.grad_fn(part, weight, bias, part_targets, part_grad)
            if needs_hidden:
                grad_hidden[start : start + LOSS_CHUNK_TOKENS] = part_grad_hidden[: len(hidden) - start]
            if needs_weight:
                _add_product(grad_weight, grad_logits.t(), part)
            if needs_bias:
                grad_bias += part_grad_bias
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def chunked_token_logps(logits: torch.Tensor, labels: torch.Tensor, *_, head: HiddenStates,
                        logps_chunk=_chunk_token_logps, grads_chunk=_chunk_token_grads, **__) -> torch.Tensor:  # fmt: skip
    """The same as :func:`plain_token_logps` from the final hidden states (passed as ``logits``, or held by
    ``head``), chunk by chunk (:class:`ChunkedTokenLogProbs`)."""
    hidden, targets = head.take(logits).flatten(0, 1), next_token_targets(labels)
    return ChunkedTokenLogProbs.apply(hidden, head.weight, head.bias, targets, logps_chunk, grads_chunk)


def chunked_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, head: HiddenStates,
                     train_chunk=_chunk_loss_and_grads, eval_chunk=_chunk_loss, **__) -> torch.Tensor:  # fmt: skip
    """The same sum as :func:`plain_loss_sum` from the final hidden states (which the model passes as ``logits``, or
    ``head`` holds), with the LM head applied :data:`LOSS_CHUNK_TOKENS` tokens at a time. Without gradients to
    compute (evaluation), only the loss: one LM-head matmul per chunk, no gradient buffers."""
    hidden, targets = head.take(logits).flatten(0, 1), next_token_targets(labels)
    inputs = (hidden, head.weight) if head.bias is None else (hidden, head.weight, head.bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, train_chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for _, part, part_targets in _chunks(hidden, targets):
        total += eval_chunk(part, head.weight, head.bias, part_targets)
    return total


def liger_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *_, head: HiddenStates, fused: nn.Module,
                   **__) -> torch.Tensor:  # fmt: skip
    """Liger's fused linear cross-entropy from the final hidden states (passed as ``logits``, or held), summed."""
    return fused(head.weight, head.take(logits).flatten(0, 1), next_token_targets(labels), head.bias)


def liger_loss(softcap: float | None) -> nn.Module:
    """Liger's loss module, with fp32 accumulation of the weight gradient where its version has ``accum_dtype``.

    Liger 0.8.5 cannot avoid waiting for the GPU: its forward counts the loss tokens with ``.item()`` whatever the
    reduction (liger_kernel/ops/fused_linear_cross_entropy.py, line 132) and its backward tests the loss's gradient
    with ``torch.equal`` (line 420); without ``accum_dtype`` it sums the weight gradient in the weight's dtype (line
    116). Hence ``auto`` never picks it.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    options = {"ignore_index": IGNORE_INDEX, "reduction": "sum", "softcap": softcap}
    if "accum_dtype" in inspect.signature(LigerFusedLinearCrossEntropyLoss).parameters:
        options["accum_dtype"] = torch.float32
        precision = ""
    else:
        precision = ", and this liger-kernel sums the LM head's gradient in bf16 (it has no accum_dtype)"
    log.warning("train.loss: liger waits for the GPU twice per micro-batch (.item() in its forward, torch.equal in "
                "its backward)%s; chunked does neither", precision)  # fmt: skip
    return LigerFusedLinearCrossEntropyLoss(**options)


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to the LM head's output before its loss: ``logits * scale``, then
    ``softcap * tanh(logits / softcap)`` when ``softcap`` is set."""

    scale: float = 1.0
    softcap: float | None = None


# The changes between the LM head and the loss that the fused loss can make itself, exactly as transformers' forwards
# write them ({x}: the logits' name; blank lines, comments and the `if labels` line of the loss left out), and the
# parameters they read, read from the same place.
LOGIT_CHANGES = {
    "": lambda model: LogitTransform(),
    "{x} = {x} * self.logit_scale": lambda model: LogitTransform(scale=float(model.logit_scale)),  # Cohere
    "{x} = {x} / self.config.logits_scaling": lambda model: LogitTransform(scale=1 / model.config.logits_scaling),
    "if self.config.final_logit_softcapping is not None:\n    {x} = {x} / self.config.final_logit_softcapping\n"
    "    {x} = torch.tanh({x})\n    {x} = {x} * self.config.final_logit_softcapping": lambda model: LogitTransform(
        softcap=model.config.final_logit_softcapping
    ),  # Gemma-2, Gemma-3
}


class UnfusedHead(ValueError):
    """A model's forward does something with its logits that the fused loss cannot do instead."""


def forward_logit_change(model_class: type) -> str:
    """The key of :data:`LOGIT_CHANGES` for what ``model_class.forward`` does between the LM head and the loss.

    Read from the forward's source: the head's line must be exactly ``x = self.lm_head(hidden_states)`` (or of its
    sliced states), what follows it up to the loss one of :data:`LOGIT_CHANGES`, and ``x`` after the loss only
    returned. Raises :class:`UnfusedHead` with the reason otherwise.
    """
    source = textwrap.dedent(inspect.getsource(model_class.forward))
    found = re.search(r"^\s*(\w+) = self\.lm_head\(hidden_states(\[:, slice_indices, :\])?\)\s*$", source, re.MULTILINE)
    call = source.find("self.loss_function(")
    if found is None or call < found.end():
        raise UnfusedHead("its forward does not apply self.lm_head to the hidden states alone and then "
                          "self.loss_function")  # fmt: skip
    name = found.group(1)
    between = [re.sub(r"\s*#.*$", "", line) for line in source[found.end() : source.rfind("\n", 0, call)].split("\n")]
    between = [line for line in between if line.strip() not in ("", "loss = None", "if labels is not None:")]
    change = re.sub(rf"\b{name}\b", "{x}", textwrap.dedent("\n".join(between)).strip("\n"))
    if change not in LOGIT_CHANGES:
        raise UnfusedHead("its forward changes the logits between the LM head and the loss in a way not recognised")
    depth, end = 0, call + len("self.loss_function")
    while True:  # to just past the call's closing parenthesis
        depth += {"(": 1, ")": -1}.get(source[end], 0)
        end += 1
        if depth == 0:
            break
    if re.search(rf"\b{name}\b", re.sub(rf"\blogits={name}\b", "", source[end:])):
        raise UnfusedHead("its forward uses the logits after the loss (e.g. for an extra loss term)")
    return change


def fused_head_supported(model: nn.Module) -> str | None:
    """None when the fused loss computes what ``model``'s forward computes from its LM head, else why not."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its output layer is a {type(head).__name__}, not a plain Linear"
    try:
        forward_logit_change(type(model))
    except UnfusedHead as reason:
        return str(reason)
    return None


def logit_transform(model: nn.Module) -> LogitTransform:
    """What ``model``'s forward does to its logits before the loss, with the parameters it reads (supported models)."""
    return LOGIT_CHANGES[forward_logit_change(type(model))](model)


def resolve_loss(requested: str, device: torch.device) -> str:
    """The loss to use: ``auto`` is ``chunked`` (Liger waits for the GPU, :func:`liger_loss`); ``liger`` needs a GPU
    and liger-kernel."""
    if requested == "auto":
        return "chunked"
    if requested == "liger" and (device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        raise ConfigError("train.loss: liger needs a CUDA GPU and the liger-kernel package (pip install "
                          "vectorlm-pipeline[liger])")  # fmt: skip
    return requested


def has_loss(model: nn.Module) -> bool:
    """Whether :func:`install_loss` made ``model(..., labels=labels).loss`` our summed loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "vectorlm_loss")


def install_loss(model: nn.Module, kind: str, *, compile: bool = False, per_token: bool = False) -> str:
    """Makes ``model(..., labels=labels).loss`` the summed token loss of ``kind`` (plain, chunked, liger); returns the
    kind installed: ``plain`` for a model whose logits the fused losses cannot reproduce, ``chunked`` for liger with a
    model that scales its logits (Liger has soft-capping but no scale). With ``per_token`` (preference training) it is
    instead each position's log-probability of its next token (:func:`plain_token_logps`), and liger is chunked."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft wrapper
    if kind != "plain" and (reason := fused_head_supported(base)):
        log.info("train.loss: %s is not available for %s (%s); using the plain loss", kind, type(base).__name__, reason)
        kind = "plain"
    if per_token and kind == "liger":
        log.info("train.loss: liger has no per-token log-probabilities (preference training); using chunked")
        kind = "chunked"
    if kind == "plain":
        base.vectorlm_loss = kind
        function = plain_token_logps if per_token else plain_loss_sum
        base.loss_function = torch.compile(function) if compile else function
        return kind
    transform = logit_transform(base)
    if kind == "liger" and transform.scale != 1.0:
        log.info("train.loss: liger cannot scale %s's logits; using chunked", type(base).__name__)
        kind = "chunked"
    base.vectorlm_loss = kind
    head = HiddenStates(base.get_output_embeddings(), hold=transform != LogitTransform())
    base.set_output_embeddings(head)
    if kind == "liger":
        base.loss_function = partial(liger_loss_sum, head=head, fused=liger_loss(transform.softcap))
        return kind
    if per_token:
        chunk_fns = [_chunk_token_logps, _chunk_token_grads]
        if compile:
            chunk_fns = [torch.compile(fn, fullgraph=True, dynamic=False) for fn in chunk_fns]
        logps_chunk, grads_chunk = (partial(fn, scale=transform.scale, softcap=transform.softcap) for fn in chunk_fns)
        base.loss_function = partial(chunked_token_logps, head=head, logps_chunk=logps_chunk, grads_chunk=grads_chunk)
        return kind
    chunk_fns = [_chunk_loss_and_grads, _chunk_loss]
    if compile:  # every chunk has one shape: one graph for training and one for evaluation
        chunk_fns = [torch.compile(fn, fullgraph=True, dynamic=False) for fn in chunk_fns]
    # The transform bound outside the compiled functions: dynamo wraps a compiled partial in one shared function.
    train_chunk, eval_chunk = (partial(fn, scale=transform.scale, softcap=transform.softcap) for fn in chunk_fns)
    base.loss_function = partial(chunked_loss_sum, head=head, train_chunk=train_chunk, eval_chunk=eval_chunk)
    return kind
