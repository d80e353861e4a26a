"""Progressive Modality Masking: which tokens a masked copy keeps, and the attention mask that hides the rest.

Pure torch. Positions are 0-based offsets inside one modality span.

- Text, stride γ over L tokens: keep offsets γ-1, 2γ-1, 3γ-1, ...; when that keeps nothing (γ > L), keep the last.
- Image, stride γ over an h×w grid (row-major): keep cells with r mod γ = γ-1 and c mod γ = γ-1; when that keeps
  nothing (γ > h and γ > w for a square grid), keep the last image token. 24×24: γ=2 → 144, 4 → 36, 8 → 9,
  16 → 1 (cell 15,15), 32 → 1 (the last token).
- A hidden token is invisible: no other token attends to it, and every token keeps its original position.
"""

from __future__ import annotations

import torch


def text_keep_offsets(length: int, stride: int) -> list[int]:
    """Offsets kept among ``length`` text tokens at stride ``stride`` (all of them at stride 1)."""
    if length <= 0:
        return []
    if stride <= 1:
        return list(range(length))
    kept = list(range(stride - 1, length, stride))
    return kept or [length - 1]


def image_keep_offsets(height: int, width: int, stride: int) -> list[int]:
    """Row-major offsets kept in an ``height``×``width`` grid at stride ``stride`` (all of them at stride 1)."""
    if height <= 0 or width <= 0:
        return []
    if stride <= 1:
        return list(range(height * width))
    kept = [row * width + col for row in range(stride - 1, height, stride) for col in range(stride - 1, width, stride)]
    return kept or [height * width - 1]


def hidden_positions(span_positions: list[int], kept_offsets: list[int]) -> list[int]:
    """Sequence positions of a span that a masked copy hides: the span minus its kept offsets."""
    kept = set(kept_offsets)
    return [position for offset, position in enumerate(span_positions) if offset not in kept]


def as_attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (bool, True = attend) as an attention mask of ``dtype``: bool as it is (for SDPA), a float dtype as
    an additive mask, 0 or the dtype's minimum (for eager attention)."""
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def hide_positions(allowed: torch.Tensor, hidden: list[int]) -> torch.Tensor:
    """Clear the ``hidden`` columns of ``allowed`` (``(..., L, L)`` bool, in place): no token attends to a hidden one.
    A hidden token still attends to itself, so no row is fully masked (a fully masked softmax row would be NaN and
    poison the backward pass); nothing reads its output, because every other row masks its column."""
    if hidden:
        index = torch.tensor(hidden, dtype=torch.long, device=allowed.device)
        allowed[..., index] = False
        allowed[..., index, index] = True
    return allowed


def visibility_attention_mask(length: int, hidden: list[int], dtype: torch.dtype, device=None) -> torch.Tensor:
    """A (1, 1, L, L) causal mask in which no token attends to a ``hidden`` position (:func:`hide_positions`).

    ``dtype`` bool gives True = attend (for SDPA); a float dtype gives an additive mask (0 or the dtype's minimum,
    for eager attention).
    """
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return as_attention_mask(hide_positions(allowed, hidden)[None, None], dtype)
