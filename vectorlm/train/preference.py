"""Preference tuning: the DPO, IPO and SimPO losses of a micro-batch of packed pairs, and their metrics.

A packed row holds whole pairs, the chosen completion's document right before the rejected one's (vectorlm/data/
pack.py), so a pair's loss needs nothing from another micro-batch or rank. The model returns each position's
log-probability of its next token (:func:`vectorlm.train.loss.install_loss` with ``per_token``), which is summed per
completion here; the reference model's sums come with the batch, computed once by the reference_logprobs stage
(vectorlm/train/reference_logprobs.py).

The losses and metric names are TRL's (``DPOTrainer`` with ``loss_type`` sigmoid or ipo, ``CPOTrainer`` with simpo),
with log-probabilities averaged over each completion's tokens for IPO and SimPO as TRL does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vectorlm.config import DpoSettings
from vectorlm.train.step import token_logps

# The metrics of a step and of an evaluation, as TRL names them: means over the pairs of the global batch.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")  # fmt: skip


def sequence_logps(token_logps: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """The sum of each sequence's token log-probabilities (``sequence_ids``: the sequence of each position's target;
    ``num_sequences`` for a position that has none)."""
    sums = torch.zeros(num_sequences + 1, dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, sequence_ids, token_logps.double())[:num_sequences]


def preference_losses(chosen: torch.Tensor, rejected: torch.Tensor, reference_chosen: torch.Tensor | None,
                      reference_rejected: torch.Tensor | None, *, dpo: DpoSettings):  # fmt: skip
    """Each pair's loss and the rewards of its chosen and rejected completions, from the policy's and the reference's
    log-probabilities of each (averaged over the completion's tokens for ipo and simpo, summed for sigmoid)."""
    if dpo.loss == "simpo":
        chosen_rewards, rejected_rewards = dpo.beta * chosen, dpo.beta * rejected
        losses = -F.logsigmoid(chosen_rewards - rejected_rewards - dpo.simpo_gamma)
        return losses, chosen_rewards.detach(), rejected_rewards.detach()
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    margin = chosen_ratio - rejected_ratio
    if dpo.loss == "ipo":
        losses = (margin - 1 / (2 * dpo.beta)) ** 2
    else:
        losses = -F.logsigmoid(dpo.beta * margin)
    return losses, (dpo.beta * chosen_ratio).detach(), (dpo.beta * rejected_ratio).detach()


class PreferenceObjective:
    """The loss of a micro-batch of pairs, summed over its pairs (``num_pairs``: the count a step's loss is averaged
    over), and the sums of :data:`METRICS` over them."""

    count = "num_pairs"
    metrics = METRICS
    pairs = True

    def __init__(self, dpo: DpoSettings) -> None:
        self.dpo = dpo

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        num_sequences = len(batch["sequence_lengths"])
        logps = sequence_logps(token_logps(model, batch), batch["sequence_ids"], num_sequences)
        reference = batch.get("reference_logps")
        if self.dpo.loss in ("ipo", "simpo"):  # averaged over the completion's tokens, as TRL does
            lengths = batch["sequence_lengths"].double().clamp(min=1)
            logps = logps / lengths
            reference = None if reference is None else reference.double() / lengths
        if self.dpo.uses_reference and reference is None:
            raise ValueError(f"dpo.loss {self.dpo.loss} needs the reference model's log-probabilities")
        reference_pairs = (None, None) if reference is None else (reference[0::2].double(), reference[1::2].double())
        losses, chosen_rewards, rejected_rewards = preference_losses(logps[0::2], logps[1::2], *reference_pairs,
                                                                     dpo=self.dpo)  # fmt: skip
        mask = batch["pair_mask"].double()
        chosen, rejected = logps[0::2].detach(), logps[1::2].detach()
        metrics = torch.stack([chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).double(),
                               chosen_rewards - rejected_rewards, chosen, rejected])  # fmt: skip
        return (losses * mask).sum().float(), (metrics * mask).sum(dim=1).float()
