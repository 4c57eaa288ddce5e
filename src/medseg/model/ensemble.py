"""Several networks as one: the weighted mean of their probabilities, as one exported graph."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Probabilities are kept this far from 0 and 1 before they are turned back into logits, so the
# graph's output stays finite (|logit| <= 13.8); a probability moves by at most this much.
EPSILON = 1e-6


class ProbabilityAverage(nn.Module):
    """``members`` run on the same image; their probabilities (sigmoid for one output channel,
    softmax over K) averaged with weights ``shares`` (summing to 1), and returned as logits
    again, so that what reads one network's logits reads the ensemble's unchanged:
    sigmoid(output) (binary) or softmax(output) (K classes) is the averaged probability.
    """

    def __init__(self, members: Sequence[nn.Module], shares: Sequence[float]):
        super().__init__()
        if len(members) != len(shares) or not members:
            raise ValueError(f"{len(members)} members but {len(shares)} shares")
        self.members = nn.ModuleList(members)
        self.shares = [float(share) for share in shares]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (N, C, H, W), normalised as every member takes it
        probabilities = None
        for member, share in zip(self.members, self.shares, strict=True):
            logits = member(image)  # (N, K, H, W), K = 1 for binary
            member_probabilities = logits.softmax(1) if logits.shape[1] > 1 else logits.sigmoid()
            weighted = share * member_probabilities
            probabilities = weighted if probabilities is None else probabilities + weighted
        probabilities = probabilities.clamp(EPSILON, 1 - EPSILON)
        if probabilities.shape[1] > 1:
            return probabilities.log()  # softmax(log p) = p / sum(p) = p
        return probabilities.log() - (1 - probabilities).log()  # the logit: sigmoid⁻¹(p)
