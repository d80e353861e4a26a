"""The reference AimKP training step: one sample and one variant at a time, exactly as the spec states it.

For every sample of a micro-batch: build the original and the masked copies its state asks for, get each copy's
gradient of its mean answer cross-entropy with a plain backward pass, compare the copies with the original (cosine in
float32), keep or drop them, and add ``n_i / |kept| / N`` times each kept copy's summed-cross-entropy gradient into
``.grad`` (N: answer tokens of the whole optimizer step). Then the per-sample strides are updated.

Pure torch: the model is any callable returning logits, so the same code runs inside LLaMA-Factory and in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.spans import ModalitySpans
from .filtering import gradient_cosine, keep_copy, variant_weight
from .masking import hidden_positions, image_keep_offsets, text_keep_offsets, visibility_attention_mask
from .state import CurriculumState, ModalityState, next_modality_state


IGNORE_INDEX = -100
ORIGINAL = "original"


@dataclass
class StepConfig:
    modalities: Sequence[str]
    thresholds: dict[str, float]
    filtering: bool = True
    progressive: bool = True


@dataclass
class SampleInputs:
    """One unpadded sample: ``model_inputs`` hold batch-of-one tensors (input_ids, labels, pixel inputs, ...)."""

    index: int
    model_inputs: dict[str, torch.Tensor]
    spans: ModalitySpans

    @property
    def labels(self) -> torch.Tensor:
        return self.model_inputs["labels"]

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class CopyOutcome:
    modality: str
    stride: int
    cosine: float
    kept: bool


@dataclass
class SampleOutcome:
    index: int
    num_answer_tokens: int
    original_loss_sum: float
    copies: list[CopyOutcome] = field(default_factory=list)
    updates: list[tuple[int, str, ModalityState]] = field(default_factory=list)
    visit: tuple[int, int] | None = None  # (index, epoch) when this visit moved the curriculum


def hidden_for(spans: ModalitySpans, modality: str, stride: int) -> list[int]:
    """Positions a copy of ``modality`` at ``stride`` hides (per image grid; 1-D over tokens without a grid)."""
    if modality == "text":
        return hidden_positions(spans.text, text_keep_offsets(len(spans.text), stride))
    hidden: list[int] = []
    for image in spans.images:
        if image.grid is not None:
            kept = image_keep_offsets(image.grid[0], image.grid[1], stride)
        else:
            kept = text_keep_offsets(len(image.positions), stride)
        hidden += hidden_positions(image.positions, kept)
    return hidden


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


def masked_inputs(sample: SampleInputs, hidden: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The sample's model inputs with ``hidden`` positions invisible and every position unchanged."""
    inputs = {key: value for key, value in sample.model_inputs.items() if key != "labels"}
    length = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    inputs["attention_mask"] = visibility_attention_mask(length, hidden, dtype, device)
    if "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(length, device=device)[None]
    return inputs


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over each row's answer tokens of the next-token cross-entropy, in float32 at least (float64 stays float64)."""
    shifted_logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.view(labels.shape[0], -1).sum(dim=1)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over all answer tokens of the next-token cross-entropy (one sample: its row of :func:`row_loss_sums`)."""
    return row_loss_sums(logits, labels).sum()


def _gradients_of(loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d parameters by a plain backward (fine with reentrant checkpointing); ``.grad`` is left as it was."""
    saved = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    loss.backward()
    gradients = [
        parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters
    ]
    for parameter, previous in zip(parameters, saved, strict=True):
        parameter.grad = previous
    return gradients


def _add_into_grad(parameters: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], scale: float) -> None:
    for parameter, gradient in zip(parameters, gradients, strict=True):
        contribution = gradient.to(parameter.dtype) * scale
        parameter.grad = contribution if parameter.grad is None else parameter.grad + contribution


def reference_sample_step(
    model: Callable[..., object],
    parameters: Sequence[torch.Tensor],
    sample: SampleInputs,
    state: CurriculumState,
    config: StepConfig,
    total_answer_tokens: float,
    mask_dtype: torch.dtype,
    epoch: int = 0,
) -> SampleOutcome:
    """Run one visit of one sample: gradients into ``.grad``, the state updated, the outcome returned.

    A second visit within the same ``epoch`` (a distributed sampler's padding) trains but leaves the state alone.
    """
    n_tokens = sample.num_answer_tokens
    outcome = SampleOutcome(sample.index, n_tokens, 0.0)
    variants: list[tuple[str, int, list[int]]] = [(ORIGINAL, 1, [])]
    variants += [
        (modality, stride, hidden_for(sample.spans, modality, stride))
        for modality, stride in planned_copies(sample, state, config)
    ]
    gradients: dict[str, list[torch.Tensor]] = {}
    for name, _, hidden in variants:
        if n_tokens == 0:
            break
        logits = model(**masked_inputs(sample, hidden, mask_dtype)).logits
        loss_sum = summed_cross_entropy(logits, sample.labels)
        if name == ORIGINAL:
            outcome.original_loss_sum = float(loss_sum.detach())
        gradients[name] = _gradients_of(loss_sum / n_tokens, parameters)

    kept = [ORIGINAL] if n_tokens else []
    cosines: dict[str, float] = {}
    for name, stride, _ in variants[1:]:
        if name not in gradients:
            continue
        cosines[name] = gradient_cosine(gradients[ORIGINAL], gradients[name])
        decision = keep_copy(cosines[name], config.thresholds[name], config.filtering)
        outcome.copies.append(CopyOutcome(name, stride, cosines[name], decision))
        if decision:
            kept.append(name)
    for name in kept:
        _add_into_grad(parameters, gradients[name], n_tokens * variant_weight(len(kept)) / total_answer_tokens)

    update_curriculum(sample, state, config, cosines, epoch, outcome)
    return outcome


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
