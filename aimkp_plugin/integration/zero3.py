"""Touch point: DeepSpeed ZeRO-3, where every parameter is partitioned over the data-parallel ranks.

Outside a gather a ZeRO-3 parameter holds no data (shape ``(0,)``), and two kinds of hooks act on it:

- module hooks on every submodule gather its parameters before a call and release them after it, each fetch a
  collective; the root's pre-hook also checks the recorded module trace against the other ranks;
- a post-accumulate hook on every trained parameter moves its ``.grad`` into a bucket and reduce-scatters it.

The AimKP step runs a data-dependent number of forward and backward passes on each rank (copies per sample, pass
planning, images present or not), so with those hooks live the ranks' collectives would fall out of step. One AimKP
micro-step under ZeRO-3 therefore (:func:`zero3_gradients`):

1. gathers every parameter of the model once (one collective, the same on all ranks);
2. removes the module hooks and pauses the gradient reduction while the step's own passes run on the plain,
   gathered model, so that they issue no collective and leave g in ``.grad`` at full shape;
3. hands g to the engine's own backward as the surrogate loss L = W · Σ_p ⟨p, g_p⟩ (:func:`.handoff.surrogate_loss`),
   while the trained parameters are still gathered (autograd checks a gradient's shape against the parameter's when
   its graph was built). ZeRO-3 always averages over the W data-parallel ranks, whatever ``gradient_allreduce_op``
   says, so the reduced gradient is Σ_ranks g, as under DDP;
4. takes the engine's optimizer step at the accumulation boundary after the parameters are partitioned again.

Memory: while the step runs each rank holds the whole model, as under ZeRO-2; the optimizer states, the float32
master weights and the gradient partitions stay sharded (docs/engines.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .handoff import surrogate_loss, taken_gradients


ZERO3_OPTIMIZER = "DeepSpeedZeroOptimizer_Stage3"  # the one tested (not SuperOffload's subclass)
# engine settings the hand-off is not tested with: (the engine's getter, its "off" value, what it is)
UNTESTED_ENGINE_SETTINGS = (
    ("zero_hpz_partition_size", 1, "hierarchical partitioning (zero_hpz_partition_size)"),
    ("zero_quantized_weights", False, "quantized weights (zero_quantized_weights)"),
    ("zero_quantized_nontrainable_weights", False, "quantized frozen weights (zero_quantized_nontrainable_weights)"),
    ("zero_quantized_gradients", False, "quantized gradients (zero_quantized_gradients)"),
)


def is_zero3(engine: Any) -> bool:
    """Whether the DeepSpeed engine partitions the parameters themselves (ZeRO stage 3)."""
    partitions_weights = getattr(engine, "zero_optimization_partition_weights", None)
    return bool(callable(partitions_weights) and partitions_weights())


def is_partitioned(parameter: torch.Tensor) -> bool:
    """A parameter created or converted by ``deepspeed.zero.Init``."""
    return hasattr(parameter, "ds_id")


def trained_parameters_to_one_dtype(model: torch.nn.Module) -> list[str]:
    """Under ZeRO-3, when the trained parameters are of two dtypes: cast them to the dtype in which
    ``deepspeed.zero.Init`` holds the model; the names of those cast (none when they are of one dtype already).

    ``deepspeed.zero.Init`` holds the loaded model in the half dtype of a bf16 (or fp16) run. LLaMA-Factory then leaves
    the trained parameters as they are under ZeRO-3: the adapter's (LoRA's), created after the load, in float32; the
    ``additional_target`` copies (a trained projector or ``lm_head``), copied from the loaded modules, in the half
    dtype. Without ``offload_param``, DeepSpeed's stage-3 optimizer takes one dtype across all trained parameters and
    stops while it is built otherwise (``assert len(set(t.dtype for t in tensors)) == 1`` in ``defragment``), with or
    without AimKP; with it, DeepSpeed converts them all to the first one's dtype. The cast makes the trained
    parameters what DeepSpeed's ZeRO-0/1/2 engines make every parameter in bf16: half-dtype weights in the passes,
    float32 master copies in the optimizer. An adapter alone keeps its float32."""
    held = {parameter.dtype for parameter in model.parameters() if is_partitioned(parameter)}
    trained = [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and parameter.is_floating_point()
    ]
    if len(held) != 1 or len({parameter.dtype for _, parameter in trained}) < 2:
        return []
    dtype = held.pop()
    cast = []
    for name, parameter in trained:
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast.append(name)
    return cast


def full_bytes(parameters: Sequence[torch.Tensor]) -> int:
    """The size of ``parameters`` gathered: ``ds_numel`` elements for a partitioned one."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in parameters)


def size_words(count: int) -> str:
    """A byte count in GiB, or in MiB below one GiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def unavailable_bytes(parameters: Sequence[torch.Tensor]) -> int:
    """What gathering ``parameters`` adds on this rank: the full size of every partitioned parameter not gathered
    now (``ds_numel`` elements each)."""
    total = 0
    for parameter in parameters:
        if is_partitioned(parameter) and getattr(parameter.ds_status, "name", "") == "NOT_AVAILABLE":
            total += parameter.ds_numel * parameter.element_size()
    return total


def check_gather_fits(needed: int, free: int, everywhere: bool) -> None:
    """Stop with the sizes when the model does not fit gathered: ``needed`` bytes to gather and ``free`` bytes free
    on this rank's device; ``everywhere``: whether it fits on every rank (all ranks stop together, none is left
    waiting in the gather)."""
    if everywhere:
        return
    raise RuntimeError(
        f"aimkp-plugin: under DeepSpeed ZeRO-3 the AimKP step gathers the whole model on each rank, "
        f"{size_words(needed)} more than this rank holds, and its device has {size_words(free)} free (on "
        "some rank it does not fit). ZeRO-3 with AimKP saves optimizer and gradient memory, not the weights' "
        "(docs/engines.md): use devices that hold the bf16 model next to the step, or a smaller model."
    )


def check_gather_fits_on_every_rank(parameters: Sequence[torch.Tensor], device: torch.device) -> None:
    """:func:`check_gather_fits` on a CUDA device, agreed over the ranks (one small all-reduce); nothing elsewhere."""
    if device.type != "cuda":
        return
    needed = unavailable_bytes(parameters)
    free = torch.cuda.mem_get_info(device)[0]
    fits = torch.tensor([1 if needed < free else 0], device=device)
    torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    check_gather_fits(needed, free, bool(fits.item()))


def check_zero3_engine(engine: Any) -> None:
    """Stop before the first step when the ZeRO-3 engine runs with a setting the hand-off is not tested with."""
    optimizer = engine.optimizer
    if type(optimizer).__name__ != ZERO3_OPTIMIZER:
        raise RuntimeError(
            f"aimkp-plugin: aimkp: true is tested with DeepSpeed's {ZERO3_OPTIMIZER} under ZeRO-3, and this config "
            f"made the engine use {type(optimizer).__name__} (for example super_offload). Remove that setting."
        )
    for name, off, words in UNTESTED_ENGINE_SETTINGS:
        getter = getattr(engine, name, None)
        value = getter() if callable(getter) else off
        if value is not None and value != off:
            raise RuntimeError(
                f"aimkp-plugin: aimkp: true is not tested with ZeRO-3 {words}. Remove it from the DeepSpeed config."
            )
    if getattr(optimizer, "leaf_parameters", None):
        modules = sorted({type(module).__name__ for module in optimizer.leaf_parameters})
        raise RuntimeError(
            f"aimkp-plugin: aimkp: true is not tested with ZeRO-3 leaf modules ({', '.join(modules)}; LLaMA-Factory "
            "sets them for mixture-of-experts blocks). Train this model with ZeRO-2, or DDP."
        )
    needed = ("_coalesce_grad_reduction", "parameter_offload", "clear_backward_seen_flag")
    if any(not hasattr(optimizer, name) for name in needed) or optimizer._coalesce_grad_reduction is not False:
        raise RuntimeError(
            "aimkp-plugin: this DeepSpeed version's ZeRO-3 optimizer is not the one the AimKP hand-off knows "
            f"(it needs {', '.join(needed)}); use the version in constraints.txt."
        )


@contextlib.contextmanager
def suspended_module_hooks(offload: Any) -> Iterator[None]:
    """No ZeRO-3 module hook runs inside: the model's submodules are called as plain modules.

    Replaces nothing in DeepSpeed: it removes the hooks that ``DeepSpeedZeRoOffload.setup_zero_stage3_hooks`` put on
    every submodule (``forward_hooks``, ``backward_hooks``) and on the root (``fwd_pre_hook``, which resets and checks
    the recorded module trace), and registers them again afterwards with the offload's own
    ``_register_deepspeed_module``, as DeepSpeed's ``unwrap_model_for_generation`` does. Why: each of those hooks
    fetches or releases parameters with a collective, and the AimKP step's passes differ from rank to rank. Tested on
    deepspeed 0.19.8 (CPU, gloo). It can go when DeepSpeed offers a public way to run rank-local passes on a gathered
    ZeRO-3 model.
    """
    root = offload.module
    start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
    for handle in (*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook):
        handle.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)
        offload._register_deepspeed_module(root)  # also invalidates the recorded trace


@contextlib.contextmanager
def paused_reduction(optimizer: Any) -> Iterator[None]:
    """ZeRO-3's per-parameter gradient hooks return at once inside and leave ``.grad`` where autograd put it.

    Sets the flag of the engine's own ``coalesce_grad_reduction()`` context (``_coalesce_grad_reduction``), without
    that context's reduction of every ``.grad`` on exit. Why: the step's own backward passes must not be bucketed and
    reduce-scattered; their gradients are each copy's, read by the step. Tested on deepspeed 0.19.8. It can go with
    :func:`suspended_module_hooks`.
    """
    optimizer._coalesce_grad_reduction = True
    try:
        yield
    finally:
        optimizer._coalesce_grad_reduction = False


@contextlib.contextmanager
def zero3_gradients(accelerator: Any, engine: Any, parameters: Sequence[torch.Tensor]) -> Iterator[None]:
    """One AimKP micro-step under ZeRO-3 (module docstring): the step inside writes its g into ``.grad`` of the
    gathered ``parameters``; at the end g goes to the engine's backward, and at the accumulation boundary the engine
    steps. Nothing is handed on when the step raises."""
    import deepspeed

    check_zero3_engine(engine)
    optimizer = engine.optimizer
    synchronising = accelerator.gradient_state.sync_gradients
    everything = list(engine.module.parameters())
    check_gather_fits_on_every_rank(everything, accelerator.device)
    # one collective, the same list on every rank
    with deepspeed.zero.GatheredParameters(everything, modifier_rank=None):
        for parameter in parameters:
            parameter.grad = None
        with suspended_module_hooks(optimizer.parameter_offload), paused_reduction(optimizer):
            yield
        gradients = taken_gradients(parameters, [None] * len(parameters))
        # what engine.forward does first: counts the previous micro-step (ZeRO-3 copies the first micro-step's
        # gradient into its partitions and adds the next ones), and resets the hook counters the step's passes moved
        optimizer.clear_backward_seen_flag()
        engine.set_gradient_accumulation_boundary(synchronising)
        world = float(torch.distributed.get_world_size(group=optimizer.dp_process_group))
        engine.backward(surrogate_loss(parameters, gradients, world), scale_wrt_gas=False)
    if synchronising:
        engine.step()
