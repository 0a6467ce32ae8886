"""Binomial deviance loss (Yi et al. 2014) with the paper's pair weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["binomial_deviance", "batch_hard_triplet"]


def binomial_deviance(similarity: torch.Tensor, same_identity: torch.Tensor,
                      alpha: float = 2.0, beta: float = 0.5,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """L = sum_ij W_ij ln(1 + exp(-alpha (S_ij - beta) M_ij)) -> scalar.

    ``similarity`` S and ``same_identity`` (boolean, M = +1 where true, -1 elsewhere) have the
    same shape, typically ``(n, n)``. W_ij = 1/n1 on positive pairs and 1/n2 on negative pairs,
    n1 and n2 their counts, so both kinds weigh the same however rare positives are; a kind
    with no pairs contributes 0. ``valid`` (boolean, same shape) restricts the pairs that
    count, e.g. to leave out an image paired with itself.
    """
    if similarity.shape != same_identity.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and same_identity "
                         f"{tuple(same_identity.shape)} differ in shape")
    positive = same_identity.bool()
    negative = ~positive
    if valid is not None:
        positive, negative = positive & valid, negative & valid
    sign = positive.to(similarity.dtype) * 2 - 1
    deviance = F.softplus(-alpha * (similarity - beta) * sign)  # = ln(1 + exp(.)), stable
    zero = similarity.new_zeros(())
    pos = deviance[positive].mean() if positive.any() else zero
    neg = deviance[negative].mean() if negative.any() else zero
    return pos + neg


def batch_hard_triplet(features: torch.Tensor, pids: torch.Tensor,
                       margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) -> scalar.

    ``features`` ``(n, D)``, ``pids`` ``(n,)``. For each anchor, its farthest positive and
    nearest negative by Euclidean distance: mean of ``relu(d_ap - d_an + margin)``. Anchors
    without a positive or without a negative in the batch are left out (0 if none is left).
    """
    dist = torch.cdist(features, features).clamp_min(1e-12)
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=features.device)
    positive, negative = same & ~eye, ~same
    usable = positive.any(1) & negative.any(1)
    if not usable.any():
        return features.new_zeros(())
    d_ap = dist.masked_fill(~positive, float("-inf")).amax(1)
    d_an = dist.masked_fill(~negative, float("inf")).amin(1)
    return F.relu(d_ap - d_an + margin)[usable].mean()
