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
- DeepSpeed ZeRO-3: the same hand-off, with the model gathered while the step runs (:mod:`.zero3`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .handoff import surrogate_loss, taken_gradients
from .zero3 import is_zero3, zero3_gradients


def is_deepspeed(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_deepspeed_enabled", False))


def distributed() -> bool:
    """More than one process in the default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def deepspeed_multiplier(engine: Any) -> float:
    """What DeepSpeed ZeRO-0/1/2 divides a gradient by when it reduces it: the data-parallel world size under the
    default ``gradient_allreduce_op`` (mean), 1 under ``sum``."""
    if not getattr(engine, "gradient_average", True):
        return 1.0
    import deepspeed.comm

    group = getattr(engine.optimizer, "dp_process_group", None)
    world = deepspeed.comm.get_world_size(group=group) if group is not None else engine.dp_world_size
    return world / float(getattr(engine, "sequence_parallel_size", 1) or 1)


HOOKED_OPTIMIZERS = ("DeepSpeedZeroOptimizer",)  # ZeRO-1/2: per-parameter hooks in _grad_acc_hooks


def check_engine_optimizer(engine: Any) -> None:
    """Stop before the first step when DeepSpeed picked an optimizer wrapper the hand-off is not exact with.

    ``BF16_Optimizer`` (ZeRO-1 with bf16 weights and ``data_types.grad_accum_dtype: fp32``) clears and collects
    gradients only around the engine's own forward passes, which the AimKP step does not use.
    """
    if type(getattr(engine, "optimizer", None)).__name__ == "BF16_Optimizer":
        raise RuntimeError(
            "aimkp-plugin: DeepSpeed picked BF16_Optimizer (ZeRO-1 with bf16 and data_types.grad_accum_dtype: fp32), "
            "which collects gradients only from the engine's own forward passes. Use ZeRO-2, or remove "
            "data_types.grad_accum_dtype from the DeepSpeed config."
        )


@contextlib.contextmanager
def suspended_zero_hooks(engine: Any) -> Iterator[None]:
    """No DeepSpeed ZeRO gradient hook runs inside, whatever backward runs on the engine's parameters.

    Replaces nothing in DeepSpeed: it removes the ZeRO-1/2 optimizer's per-parameter hooks (the
    ``register_post_accumulate_grad_hook`` handles that ``DeepSpeedZeroOptimizer`` keeps in ``_grad_acc_hooks``) for
    the AimKP step's own backward passes, and registers them again afterwards with its own
    ``create_gradient_handling_hooks()``. Why: those hooks move every accumulated gradient into the engine's buffers
    and reduce it across ranks (stage 2, or ``overlap_comm``); a backward the engine did not start would be reduced
    too, asserted as "already reduced", or leave the ranks' collectives out of step. Tested on deepspeed 0.19.8
    (stages 0, 1 and 2; CPU with gloo). It can go when DeepSpeed offers a public way to run a backward pass outside
    the engine. ZeRO-0's optimizers keep gradients in ``.grad`` without hooks and need nothing.
    """
    optimizer = getattr(engine, "optimizer", None)
    if type(optimizer).__name__ not in HOOKED_OPTIMIZERS:
        yield
        return
    handles = getattr(optimizer, "_grad_acc_hooks", None)
    register = getattr(optimizer, "create_gradient_handling_hooks", None)
    if handles is None or not callable(register):
        raise RuntimeError(
            "aimkp-plugin: this DeepSpeed version keeps its ZeRO gradient hooks in a way the AimKP hand-off does not "
            "know (no _grad_acc_hooks / create_gradient_handling_hooks); use the version in constraints.txt."
        )
    if not handles:  # ZeRO-1 without contiguous_gradients and overlap_comm registers none
        yield
        return
    for handle in handles:
        handle.remove()
    handles.clear()
    try:
        yield
    finally:
        register()


def hand_to_deepspeed(
    accelerator: Any, engine: Any, parameters: Sequence[torch.Tensor], held: Sequence[torch.Tensor | None]
) -> None:
    """Give this micro-batch's g (in ``.grad``) to the DeepSpeed engine's own backward, and put the engine's own
    gradients (``held``) back first: once per micro-step on every rank, a zero g included, since the engine reduces
    and steps collectively."""
    gradients = taken_gradients(parameters, held)
    loss = surrogate_loss(parameters, gradients, deepspeed_multiplier(engine))
    accelerator.backward(loss, scale_wrt_gas=False)


def all_reduce_grads(parameters: Sequence[torch.Tensor]) -> None:
    """Sum ``.grad`` over ranks (each rank holds its samples' share of Σ_i G_i / N), in one flat collective."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
    dist.all_reduce(flat)
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter))
        offset += count


@contextlib.contextmanager
def engine_gradients(trainer: Any, engine: Any, parameters: Sequence[torch.Tensor]) -> Iterator[None]:
    """The engine's gradient plumbing around one AimKP micro-step, whose g is written into ``.grad`` inside.

    - DeepSpeed ZeRO-3: :func:`.zero3.zero3_gradients`.
    - DeepSpeed ZeRO-0/1/2: the engine's own gradients are set aside and its ZeRO hooks suspended while the step runs;
      at the end g goes to the engine's backward (:func:`hand_to_deepspeed`).
    - DDP: the step runs under ``no_sync``; at the synchronising micro-step ``.grad`` is summed over the ranks
      (:func:`all_reduce_grads`).
    - Single process: nothing.

    Nothing is handed on when the step raises.
    """
    accelerator = trainer.accelerator
    if is_deepspeed(trainer) and is_zero3(engine):
        with zero3_gradients(accelerator, engine, parameters):
            yield
    elif is_deepspeed(trainer):
        held = [parameter.grad for parameter in parameters]
        for parameter in parameters:
            parameter.grad = None
        check_engine_optimizer(engine)
        with suspended_zero_hooks(engine):
            yield
        hand_to_deepspeed(accelerator, engine, parameters, held)
    else:
        with accelerator.no_sync(engine) if distributed() else contextlib.nullcontext():
            yield
        if accelerator.gradient_state.sync_gradients and distributed():
            all_reduce_grads(parameters)
