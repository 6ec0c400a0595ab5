"""Layer selection (the paper's l*): how well held-out projections onto a class's vector separate
that class from the others, per layer, by three measures, and the layer they agree on:

    l* = floor(mean(argmax_l AUROC, argmax_l |Cohen's d|, argmin_l histogram overlap))
"""

from __future__ import annotations

import math

import torch

from welfare_server.vectors.types import LayerSelection

OVERLAP_BINS = 30
"""Bins of the two histograms whose overlap is measured (over the range both projections span)."""


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive projection > a negative one), ties counting one half (the Mann-Whitney U)."""
    values = torch.cat([positive, negative]).double()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    for v in values.unique()[torch.unique(values, return_counts=True)[1] > 1]:  # average ranks of ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def cohens_d(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """(mean_pos - mean_neg) / pooled standard deviation (Bessel-corrected)."""
    a, b = positive.double(), negative.double()
    n_a, n_b = len(a), len(b)
    scatter = sum(float(((x - x.mean()) ** 2).sum()) for x in (a, b))  # (n - 1) * var, 0 for one example
    pooled = scatter / max(n_a + n_b - 2, 1)
    return float((a.mean() - b.mean()) / math.sqrt(max(float(pooled), 1e-30)))


def histogram_overlap(positive: torch.Tensor, negative: torch.Tensor, bins: int = OVERLAP_BINS) -> float:
    """Sum over bins of the smaller of the two normalised histograms: 0 disjoint, 1 identical."""
    lo = float(min(positive.min(), negative.min()))
    hi = float(max(positive.max(), negative.max()))
    if hi <= lo:
        return 1.0
    h_pos = torch.histc(positive.double(), bins, lo, hi) / len(positive)
    h_neg = torch.histc(negative.double(), bins, lo, hi) / len(negative)
    return float(torch.minimum(h_pos, h_neg).sum())


def select_layer(projections: torch.Tensor, is_class: torch.Tensor) -> LayerSelection:
    """projections [N, L]: held-out examples projected onto the class's vector at each layer;
    is_class bool [N]: which examples belong to the class (the rest are the negatives)."""
    if not bool(is_class.any()) or bool(is_class.all()):
        raise ValueError("select_layer: the held-out split needs examples in and out of the class")
    L = projections.shape[1]
    pos, neg = projections[is_class], projections[~is_class]
    a = [auroc(pos[:, l], neg[:, l]) for l in range(L)]
    d = [cohens_d(pos[:, l], neg[:, l]) for l in range(L)]
    o = [histogram_overlap(pos[:, l], neg[:, l]) for l in range(L)]
    optima = (max(range(L), key=lambda l: a[l]), max(range(L), key=lambda l: abs(d[l])),
              min(range(L), key=lambda l: o[l]))
    return LayerSelection(auroc=a, cohens_d=d, overlap=o, best_layer=int(math.floor(sum(optima) / 3)))
