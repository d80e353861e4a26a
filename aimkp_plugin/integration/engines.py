"""How the AimKP step's gradient reaches the training engine's optimizer step.

The step computes, for its micro-batch, g = Σ_i n_i / |K_i| / N · Σ_{v ∈ K_i} g_{i,v} (N: the answer tokens of the
whole optimizer step, all micro-batches and ranks) with its own backward passes, and leaves it in ``.grad``.

- Single process: g stays in ``.grad``.
- DDP: the step runs under ``no_sync`` and the trainer all-reduces (sums) ``.grad`` at the synchronising micro-step.
- DeepSpeed ZeRO-0/1/2: the engine owns reduction, partitioning, accumulation boundaries, clipping and loss scaling
  through hooks on every parameter, which the step's own backward passes must not fire
  (:func:`suspended_zero_hooks`). g is then handed to the engine's own backward as the surrogate loss
  L = W · Σ_p ⟨p, g_p⟩ with g detached (:func:`surrogate_loss`): ∂L/∂p = W · g_p exactly, with no model pass. ZeRO
  averages the gradients over the W data-parallel ranks, so W = that world size (1 for ``gradient_allreduce_op:
  sum``) makes the reduced gradient Σ_ranks g, as under DDP. The trainer passes ``scale_wrt_gas=False``: g is already
  normalised over the whole optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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


def is_deepspeed(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def deepspeed_multiplier(engine: Any) -> float:
    """What DeepSpeed ZeRO-0/1/2 divides a gradient by when it reduces it: the data-parallel world size under the
    default ``gradient_allreduce_op`` (mean), 1 under ``sum``."""
    if not getattr(engine, "gradient_average", True):
        return 1.0
    import deepspeed.comm

    group = getattr(engine.optimizer, "dp_process_group", None)
    world = deepspeed.comm.get_world_size(group=group) if group is not None else engine.dp_world_size
    return world / float(getattr(engine, "sequence_parallel_size", 1) or 1)


REGISTER_HOOKS = ("create_gradient_handling_hooks", "create_grad_acc_hooks")  # ZeRO-1/2, then BF16_Optimizer


@contextlib.contextmanager
def suspended_zero_hooks(engine: Any) -> Iterator[None]:
    """No DeepSpeed gradient hook runs inside, whatever backward runs on the engine's parameters.

    Replaces nothing in DeepSpeed: it removes the optimizer's per-parameter hooks (the
    ``register_post_accumulate_grad_hook`` handles kept in ``_grad_acc_hooks`` by ``DeepSpeedZeroOptimizer``, ZeRO-1/2,
    and by ``BF16_Optimizer``, ZeRO-0 with bf16) for the AimKP step's own backward passes, and registers them again
    afterwards with the optimizer's own method (``create_gradient_handling_hooks`` / ``create_grad_acc_hooks``).
    Why: those hooks move every accumulated gradient into the engine's buffers and reduce it across ranks (stage 2, or
    ``overlap_comm``); a backward the engine did not start would be reduced too, asserted as "already reduced", or
    leave the ranks' collectives out of step. Tested on deepspeed 0.19.8 (stages 0, 1 and 2; CPU with gloo). It can go
    when DeepSpeed offers a public way to run a backward pass outside the engine. Optimizers without hooks (ZeRO-0 in
    float32, ZeRO-1 without ``contiguous_gradients`` and ``overlap_comm``) need nothing.
    """
    optimizer = getattr(engine, "optimizer", None)
    handles = getattr(optimizer, "_grad_acc_hooks", None)
    if not handles:
        yield
        return
    register = next(
        (getattr(optimizer, name) for name in REGISTER_HOOKS if callable(getattr(optimizer, name, None))), None
    )
    if register is None:
        raise RuntimeError(
            f"aimkp-plugin: cannot pause the gradient hooks of {type(optimizer).__name__} (no "
            f"{' or '.join(REGISTER_HOOKS)} in this DeepSpeed version); the tested version is in constraints.txt."
        )
    for handle in handles:
        handle.remove()
    handles.clear()
    try:
        yield
    finally:
        register()
