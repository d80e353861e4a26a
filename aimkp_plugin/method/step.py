"""The reference AimKP training step: one sample and one variant at a time, exactly as the spec states it.

For every sample of a micro-batch: build the original and the masked copies its state asks for, get each copy's
gradient of its mean answer cross-entropy with a plain backward pass, compare the copies with the original (cosine in
float32), keep or drop them, and add ``n_i / |kept| / N`` times each kept copy's summed-cross-entropy gradient into
``.grad`` (N: answer tokens of the whole optimizer step). Then the per-sample strides are updated.

A model that mixes tokens outside attention (linear attention, convolutions) runs each copy with its hidden tokens
removed from the sequence instead (:class:`TokenRemoval`): a forward pre-hook on its language model keeps only the
kept positions of ``inputs_embeds`` (the image features already in place) and of every position-id row, and the loss
reads the kept tokens' labels. In a pure-attention model both ways give the same outputs at the kept tokens. A
model whose images are cross-attention keys (Mllama) runs an image copy with its hidden vision keys blocked in every
text row (:class:`KeyHiding`, a forward pre-hook on its language model).

Pure torch: the model is any callable returning logits, so the same code runs inside LLaMA-Factory and in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from .family_interface import KeyHiding, TokenRemoval
from .filtering import gradient_cosine, keep_copy, variant_weight
from .masking import visibility_attention_mask
from .state import CurriculumState
from .types import ORIGINAL, CopyOutcome, SampleInputs, SampleOutcome, StepConfig
from .variants import (
    hidden_for,
    hidden_keys_for,
    kept_positions,
    planned_copies,
    summed_cross_entropy,
    update_curriculum,
)


# A model family's attention pattern for a copy: (sample, hidden positions, mask dtype) -> the ``attention_mask``
# argument of the model (a (1, 1, L, L) mask, or one per layer type). None: causal, with the hidden columns cleared.
AttentionMaskBuilder = Callable[[SampleInputs, list[int], torch.dtype], object]


def copy_logits(
    model: Callable[..., object],
    sample: SampleInputs,
    hidden: list[int],
    dtype: torch.dtype,
    attention_mask: AttentionMaskBuilder | None = None,
    removal: TokenRemoval | None = None,
    keys: KeyHiding | None = None,
    hidden_keys: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy's logits and the labels they predict: the whole sequence with ``hidden`` invisible (attention), or
    with ``removal`` only the kept positions and their labels; ``hidden_keys`` (cross-attention vision keys) hidden by
    ``keys``. Without a cache, as in training (a Qwen3.5 forward with ``use_cache`` builds its masks against the
    cache and gives other outputs)."""
    if hidden_keys and keys is None:
        raise ValueError("aimkp: a copy hides cross-attention vision keys, and no KeyHiding was given for them")
    with keys.hiding(list(hidden_keys)) if hidden_keys else nullcontext():
        return _copy_logits(model, sample, hidden, dtype, attention_mask, removal)


def _copy_logits(
    model: Callable[..., object],
    sample: SampleInputs,
    hidden: list[int],
    dtype: torch.dtype,
    attention_mask: AttentionMaskBuilder | None,
    removal: TokenRemoval | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if removal is None:
        return model(**masked_inputs(sample, hidden, dtype, attention_mask), use_cache=False).logits, sample.labels
    length = sample.model_inputs["input_ids"].shape[1]
    keep = kept_positions(length, hidden)
    inputs = {key: value for key, value in sample.model_inputs.items() if key != "labels"}
    with removal.keeping(keep):
        logits = model(**inputs, use_cache=False).logits
    return logits, sample.labels[:, keep.to(sample.labels.device)]


def masked_inputs(
    sample: SampleInputs, hidden: list[int], dtype: torch.dtype, attention_mask: AttentionMaskBuilder | None = None
) -> dict[str, torch.Tensor]:
    """The sample's model inputs with ``hidden`` positions invisible and every position unchanged."""
    inputs = {key: value for key, value in sample.model_inputs.items() if key != "labels"}
    length = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask(sample, hidden, dtype)
    else:
        inputs["attention_mask"] = visibility_attention_mask(length, hidden, dtype, device)
    if "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(length, device=device)[None]
    return inputs


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
    attention_mask: AttentionMaskBuilder | None = None,
    removal: TokenRemoval | None = None,
    keys: KeyHiding | None = None,
) -> SampleOutcome:
    """Run one visit of one sample: gradients into ``.grad``, the state updated, the outcome returned.

    A second visit within the same ``epoch`` (a distributed sampler's padding) trains but leaves the state alone.
    ``attention_mask`` builds a copy's mask for a model family whose attention is not plain causal (Gemma 3's
    bidirectional image blocks); ``removal`` runs every variant with its hidden tokens removed (a model that mixes
    tokens outside attention); ``keys`` hides an image copy's vision keys (a model whose images are cross-attention
    keys).
    """
    n_tokens = sample.num_answer_tokens
    outcome = SampleOutcome(sample.index, n_tokens, 0.0)
    variants: list[tuple[str, int, list[int], list[int]]] = [(ORIGINAL, 1, [], [])]
    variants += [
        (modality, stride, hidden_for(sample.spans, modality, stride), hidden_keys_for(sample.spans, modality, stride))
        for modality, stride in planned_copies(sample, state, config)
    ]
    gradients: dict[str, list[torch.Tensor]] = {}
    for name, _, hidden, hidden_keys in variants:
        if n_tokens == 0:
            break
        logits, labels = copy_logits(model, sample, hidden, mask_dtype, attention_mask, removal, keys, hidden_keys)
        loss_sum = summed_cross_entropy(logits, labels)
        if name == ORIGINAL:
            outcome.original_loss_sum = float(loss_sum.detach())
        gradients[name] = _gradients_of(loss_sum / n_tokens, parameters)

    kept = [ORIGINAL] if n_tokens else []
    cosines: dict[str, float] = {}
    for name, stride, _, _ in variants[1:]:
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
