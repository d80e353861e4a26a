"""Gradient-Based Filtering: cosines between per-variant gradients, keep decisions, and the sample weighting.

For sample i with n_i answer tokens, variant gradients g_orig, g_text, g_image (of each variant's mean cross-entropy)
and thresholds τ:

- c_m = cos(g_orig, g_m), computed in float32 (float64 for float64 gradients); a zero or non-finite gradient
  gives NaN, which counts as disagreement (the copy is dropped and the modality freezes);
- the copy of modality m is kept when c_m ≥ τ_m (dropped when c_m < τ_m); the original is always kept;
- sample gradient G_i = n_i · mean of the kept variants' gradients;
- optimizer-step gradient = Σ_i G_i / N, with N the answer tokens of the whole step (all micro-batches, all ranks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def gradient_cosine(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """cos between two gradients given per parameter; NaN for zero or non-finite ones.

    Accumulated in float32 at least (bf16/fp16 gradients are promoted; float64 ones stay float64).
    """
    dtype = torch.promote_types(first[0].dtype, torch.float32) if first else torch.float32
    dot = first_norm = second_norm = torch.zeros((), dtype=dtype)
    for a, b in zip(first, second, strict=True):
        a, b = a.detach().to(dtype), b.detach().to(dtype)
        dot = dot + (a * b).sum().cpu()
        first_norm = first_norm + (a * a).sum().cpu()
        second_norm = second_norm + (b * b).sum().cpu()
    return cosine_from_products(dot, first_norm, second_norm)


def cosine_from_products(dot: torch.Tensor, first_sq: torch.Tensor, second_sq: torch.Tensor) -> float:
    """cos = <a, b> / (|a| |b|) from the dot product and the squared norms; NaN for zero or non-finite ones."""
    if not bool(torch.isfinite(dot) & torch.isfinite(first_sq) & torch.isfinite(second_sq)):
        return math.nan
    if first_sq == 0 or second_sq == 0:
        return math.nan
    return float(dot / (first_sq.sqrt() * second_sq.sqrt()))


def cosines_from_gram(gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """cos_k = G[a_k, b_k] / (√G[a_k, a_k] · √G[b_k, b_k]) for the row pairs ``(first[k], second[k])`` of a Gram
    matrix ``G`` (``G[r, s] = <g_r, g_s>``), on ``G``'s device and in its dtype; NaN where a product is not finite or a
    norm is zero. Elementwise, the same operations as :func:`cosine_from_products` on each pair."""
    dot, first_sq, second_sq = gram[first, second], gram[first, first], gram[second, second]
    valid = dot.isfinite() & first_sq.isfinite() & second_sq.isfinite() & (first_sq != 0) & (second_sq != 0)
    return torch.where(valid, dot / (first_sq.sqrt() * second_sq.sqrt()), torch.full_like(dot, math.nan))


def keep_copy(cosine: float, threshold: float, filtering: bool = True) -> bool:
    """Whether a masked copy updates the model: c ≥ τ (NaN never); always, when filtering is off."""
    return True if not filtering else cosine >= threshold


def variant_weight(num_kept: int) -> float:
    """The weight of each kept variant's summed cross-entropy in G_i = n_i · mean(kept mean-CE gradients)."""
    return 1.0 / num_kept
