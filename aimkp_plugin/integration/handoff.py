"""The hand-off of a gradient computed outside an engine to that engine's own backward.

The surrogate loss L = W · Σ_p ⟨p, g_p⟩, with g detached, has ∂L/∂p = W · g_p exactly and needs no model pass, so an
engine that reduces, partitions, accumulates, clips and scales the gradients of a loss (DeepSpeed) does all of that to
g as it would to a loss's gradient. W undoes the engine's averaging over its W data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class _HandOff(torch.autograd.Function):
    """A zero scalar whose backward gives each parameter ``multiplier · grad_output · g_p`` (g detached), so the
    engine's loss scale (``grad_output``) reaches g as it would reach a loss's gradient."""

    @staticmethod
    def forward(ctx: Any, multiplier: float, gradients: Sequence[torch.Tensor], *parameters: torch.Tensor):
        ctx.multiplier = multiplier
        ctx.gradients = gradients
        return torch.zeros((), dtype=torch.float32, device=parameters[0].device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        factor = grad_output * ctx.multiplier
        gradients = [(gradient.to(torch.float32) * factor).to(gradient.dtype) for gradient in ctx.gradients]
        ctx.gradients = None
        return (None, None, *gradients)


def surrogate_loss(
    parameters: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor], multiplier: float
) -> torch.Tensor:
    """L with ∂L/∂p = multiplier · g_p for every parameter p (module docstring); its value is 0."""
    detached = [
        gradient.detach().to(parameter.dtype) for parameter, gradient in zip(parameters, gradients, strict=True)
    ]
    return _HandOff.apply(float(multiplier), detached, *parameters)


def taken_gradients(parameters: Sequence[torch.Tensor], restored: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """g as the step left it in ``.grad`` (a zero tensor where a parameter got none: an engine reduces every
    parameter on every rank), with ``.grad`` set back to ``restored`` (the engine's own gradients, or None)."""
    gradients = [
        parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters
    ]
    for parameter, previous in zip(parameters, restored, strict=True):
        parameter.grad = previous
    return gradients
