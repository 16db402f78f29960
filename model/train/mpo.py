"""Mixed Preference Optimization (InternVL's MPO): 0.8 * DPO-sigmoid preference + 0.2 * BCO-pair quality
+ 1.0 * NLL on the chosen response, beta 0.1, against a frozen reference (../shared/reference/internvl3-facts.md).

With log pi and log ref the summed log-probabilities of a response's tokens under the policy and the
reference, and the log-ratios l_c = log pi_c - log ref_c, l_r = log pi_r - log ref_r of a pair:

- preference: -log sigmoid(beta * (l_c - l_r))
- quality:    r_c = beta * l_c, r_r = beta * l_r; -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta)), where
              delta (the reward shift) is the running mean over batches of mean(r_c, r_r), updated with the
              current batch first (TRL's bco_pair)
- generation: token-mean cross-entropy over the chosen responses' tokens.

Preference and quality are means over pairs, generation a mean over tokens. The functions here return the
sums and counts, so the trainer can normalise them over gradient accumulation and data-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX

MPO_WEIGHTS = (0.8, 0.2, 1.0)  # preference, quality, generation
MPO_BETA = 0.1


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B]: the sum of ``values`` [T] over each sample of the pack."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    return values.new_zeros(lengths.numel()).index_add(0, segment, values)


@dataclass
class PairLogps:
    """Per pair of a pack: the summed response log-probabilities of chosen and rejected, and the chosen
    responses' supervised token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor


def pair_logps(token_logps: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, roles: Sequence[str]) -> PairLogps:
    """Split a pack of MPO pairs (samples in order chosen, rejected, chosen, ...; ``roles`` says which).
    ``token_logps`` float32 [T]: each position's log-probability of its label, 0 where the label is
    ignored (the negated per-token CE of the model's ``loss_reduction='none'``)."""
    sums = segment_sums(token_logps, cu_seqlens)
    counts = segment_sums((labels != IGNORE_INDEX).to(torch.float32), cu_seqlens)
    chosen = [index for index, role in enumerate(roles) if role == "chosen"]
    rejected = [index for index, role in enumerate(roles) if role == "rejected"]
    if len(chosen) != len(rejected) or len(chosen) + len(rejected) != len(roles):
        raise ValueError(f"an MPO pack holds chosen/rejected pairs only, got roles {list(roles)}")
    chosen_index = torch.tensor(chosen, device=token_logps.device)
    rejected_index = torch.tensor(rejected, device=token_logps.device)
    return PairLogps(sums[chosen_index], sums[rejected_index], counts[chosen_index])


@dataclass
class MPOTerms:
    """Sums over the pairs of a batch (preference, quality, the chosen responses' NLL) and the rewards."""

    preference_sum: torch.Tensor
    quality_sum: torch.Tensor
    nll_sum: torch.Tensor
    pairs: int
    chosen_tokens: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor

    def loss(self, weights: Sequence[float] = MPO_WEIGHTS, pairs: Optional[float] = None, tokens=None) -> torch.Tensor:
        """weights[0] * preference + weights[1] * quality (means over ``pairs``, default this batch's) +
        weights[2] * generation (mean over ``tokens``, default this batch's chosen tokens)."""
        pairs = self.pairs if pairs is None else pairs
        tokens = self.chosen_tokens.sum() if tokens is None else tokens
        return (weights[0] * self.preference_sum + weights[1] * self.quality_sum) / pairs + weights[2] * self.nll_sum / tokens


def mpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_nll_sum: torch.Tensor,
    chosen_tokens: torch.Tensor,
    reward_shift,
    beta: float = MPO_BETA,
) -> MPOTerms:
    """The MPO terms of a batch of pairs (all [P]); ``chosen_nll_sum`` is the summed token NLL of the chosen
    responses (a scalar or [P]), ``reward_shift`` the BCO delta (the trainer's: the mean reward of the packs of
    earlier steps)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    preference = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    rewards_chosen = beta * chosen_ratio
    rewards_rejected = beta * rejected_ratio
    quality = -F.logsigmoid(rewards_chosen - reward_shift) - F.logsigmoid(-(rewards_rejected - reward_shift))
    return MPOTerms(
        preference_sum=preference.sum(),
        quality_sum=quality.sum(),
        nll_sum=chosen_nll_sum.sum(),
        pairs=int(policy_chosen.numel()),
        chosen_tokens=chosen_tokens,
        rewards_chosen=rewards_chosen.detach(),
        rewards_rejected=rewards_rejected.detach(),
    )


def batch_reward_mean(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = MPO_BETA) -> torch.Tensor:
    """mean(r_c, r_r) over a batch's pairs: the value the reward shift's running mean takes in."""
    rewards = torch.cat([beta * (policy_chosen - reference_chosen), beta * (policy_rejected - reference_rejected)])
    return rewards.detach().mean()


class RunningMean:
    """The BCO reward shift: the mean of the values added so far, each pack's mean reward counting once
    (saved in checkpoints)."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    def add(self, total: float, count: int) -> float:
        """Take in ``count`` values summing to ``total``; returns the new mean."""
        self.total += float(total)
        self.count += int(count)
        return self.mean

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total = float(state["total"])
        self.count = int(state["count"])
