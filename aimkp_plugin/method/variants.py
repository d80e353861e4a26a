"""What both AimKP steps share: which masked copies a visit makes, which tokens each copy hides, the per-row loss,
and the curriculum update after the visit.

- A visit of sample i makes the original and, per enabled modality m with γ_m(i) > 1 and a span in the sample, one
  copy masked at γ_m(i).
- The text copy hides the text span's tokens outside offsets γ-1, 2γ-1, ...; the image copy applies the 2-D rule to
  each grid of each image (per tile for tiled images: every tile at the sample's one image stride, each keeping its
  last token when the rule keeps nothing), leaves image tokens outside any grid visible, and falls back to every γ-th
  image token for an image without grids. An image whose grids are cross-attention keys hides keys
  (:func:`hidden_keys_for`), no token.
- The loss of a row is Σ over its answer tokens of the next-token cross-entropy; a variant's loss is that sum over
  n_i (the mean of the spec).

Pure torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .masking import hidden_positions, image_keep_offsets, text_keep_offsets
from .state import CurriculumState, next_modality_state
from .types import IGNORE_INDEX, ModalitySpans, SampleInputs, SampleOutcome, StepConfig


def hidden_for(spans: ModalitySpans, modality: str, stride: int) -> list[int]:
    """Positions a copy of ``modality`` at ``stride`` hides (per grid; 1-D over the tokens of an image without one)."""
    if modality == "text":
        return hidden_positions(spans.text, text_keep_offsets(len(spans.text), stride))
    hidden: list[int] = []
    for image in spans.images:
        if image.keys:
            continue  # its cells are cross-attention keys: hidden_keys_for
        if image.grids is None:
            hidden += hidden_positions(image.positions, text_keep_offsets(len(image.positions), stride))
            continue
        for grid in image.grids:
            kept = image_keep_offsets(grid.height, grid.width, stride)
            hidden += hidden_positions(list(grid.positions), kept)
    return sorted(hidden)


def hidden_keys_for(spans: ModalitySpans, modality: str, stride: int) -> list[int]:
    """The cross-attention vision keys a copy of ``modality`` at ``stride`` hides: the 2-D rule on each key grid of
    each image whose grids are keys (none for a text copy or for images of tokens)."""
    if modality != "image":
        return []
    hidden: list[int] = []
    for image in spans.images:
        for grid in image.grids if image.keys and image.grids else ():
            hidden += hidden_positions(list(grid.positions), image_keep_offsets(grid.height, grid.width, stride))
    return sorted(hidden)


def kept_positions(length: int, hidden: list[int]) -> torch.Tensor:
    """The positions ``0..length-1`` that a copy hiding ``hidden`` keeps, ascending (long)."""
    hidden_set = set(hidden)
    return torch.tensor([position for position in range(length) if position not in hidden_set], dtype=torch.long)


def span_present(spans: ModalitySpans, modality: str) -> bool:
    return bool(spans.text) if modality == "text" else bool(spans.images)


def planned_copies(sample: SampleInputs, state: CurriculumState, config: StepConfig) -> list[tuple[str, int]]:
    """The masked copies of a visit: ``(modality, stride)`` for each enabled modality with γ > 1 and a span."""
    copies = []
    for modality in config.modalities:
        stride = state.get(sample.index, modality).stride
        if stride > 1 and span_present(sample.spans, modality):
            copies.append((modality, stride))
    return copies


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over each row's answer tokens of the next-token cross-entropy, in float32 at least (float64 stays float64)."""
    return predicted_loss_sums(logits[:, :-1], labels[:, 1:])


def predicted_loss_sums(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over each row of the cross-entropy of ``logits`` (``(rows, K, V)``) against ``targets`` (``(rows, K)``,
    :data:`IGNORE_INDEX` where no token is predicted), in float32 at least (float64 stays float64)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.to(logits.device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(targets.shape[0], -1).sum(dim=1)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over all answer tokens of the next-token cross-entropy (one sample: its row of :func:`row_loss_sums`)."""
    return row_loss_sums(logits, labels).sum()


def update_curriculum(
    sample: SampleInputs,
    state: CurriculumState,
    config: StepConfig,
    cosines: dict[str, float],
    epoch: int,
    outcome: SampleOutcome,
) -> None:
    """Move the sample's strides after its visit (first visit of ``epoch`` only), recording the changes in ``outcome``.

    A modality without a span in this sample is skipped; one without a copy this visit gets no cosine (γ = 1 → 2).
    """
    if not state.first_visit(sample.index, epoch):
        return
    outcome.visit = (sample.index, epoch)
    for modality in config.modalities:
        if not span_present(sample.spans, modality):
            continue  # the modality is skipped for this sample
        current = state.get(sample.index, modality)
        cosine = cosines.get(modality)
        if cosine is not None and not config.filtering:
            cosine = math.inf  # without filtering every copy counts as agreeing
        updated = next_modality_state(current, cosine, config.thresholds[modality], config.progressive)
        if updated != current:
            state.set(sample.index, modality, updated)
            outcome.updates.append((sample.index, modality, updated))
