"""Per-row gradients from one backward pass: every row of a batch is one (sample, variant), and each row's gradient
with respect to every trainable parameter is kept apart, in one flat ``(rows, P)`` buffer.

- Linear layers (LoRA's ``lora_A``/``lora_B``, a trained ``lm_head``): forward hooks keep the input ``x`` and hook the
  output's gradient ``δ``; row r's gradient is ``Σ_t δ[r, t] x[r, t]ᵀ`` for the weight and ``Σ_t δ[r, t]`` for the
  bias (Opacus' ``GradSampleModule`` rule for ``nn.Linear``). The hooks' handles are kept and removed on exit.
  While hooked, these layers' parameters are marked as not requiring grad, so that autograd does not also form
  their summed gradient (``Σ_r`` of the rows: one more gradient's memory and the same products again); the output
  gradients still flow, since each layer's input requires grad. The marks are put back on exit.
- Parameters upstream of a shared tensor (the projector, whose image features every variant of a sample reads):
  the rows' gradients with respect to that tensor are pushed back through its graph in one vmapped backward
  (``torch.autograd.grad(..., is_grads_batched=True)``).

Then ``gram()`` gives every dot product between rows (one matmul), from which the cosines come, and ``combine(w)``
gives ``Σ_r w_r g_r`` (one matrix-vector product): the optimizer-step gradient without another backward.
Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RowGradients:
    """A ``(rows, P)`` buffer over ``parameters`` (in their order) and the hooks that fill it."""

    def __init__(
        self, parameters: Sequence[nn.Parameter], rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.parameters = list(parameters)
        self.offsets: dict[int, tuple[int, int]] = {}
        start = 0
        for parameter in self.parameters:
            self.offsets[id(parameter)] = (start, start + parameter.numel())
            start += parameter.numel()
        self.flat = torch.zeros(rows, start, dtype=dtype, device=device)
        self.rows = slice(0, rows)  # the rows of the forward pass now running: set by the caller per group
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.trained: dict[nn.Module, tuple[bool, bool]] = {}  # hooked layer: (weight trained, bias trained)
        self.unmarked: list[nn.Parameter] = []  # trained parameters marked requires_grad=False while hooked

    # filling
    def add(self, parameter: nn.Parameter, rows: slice | torch.Tensor, per_row: torch.Tensor) -> None:
        """Add ``per_row`` (``(len(rows), *parameter.shape)``) into the rows' slots of ``parameter``."""
        start, stop = self.offsets[id(parameter)]
        self.flat[rows, start:stop] += per_row.reshape(per_row.shape[0], -1).to(self.flat.dtype)

    def hook_linear_layers(self, modules: Sequence[nn.Linear]) -> RowGradients:
        """Register the forward hooks on ``modules`` (each owns trainable parameters listed in this buffer) and mark
        their trainable parameters as not requiring grad until :meth:`remove_hooks`."""
        for module in modules:
            bias_trained = module.bias is not None and module.bias.requires_grad
            self.trained[module] = (module.weight.requires_grad, bias_trained)
            for parameter in module.parameters(recurse=False):
                if parameter.requires_grad:
                    parameter.requires_grad_(False)
                    self.unmarked.append(parameter)
            self.handles.append(module.register_forward_hook(self._linear_forward_hook))
        return self

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for parameter in self.unmarked:
            parameter.requires_grad_(True)
        self.unmarked.clear()

    def __enter__(self) -> RowGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def _linear_forward_hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # Not under grad (inference, or the first pass of a reentrant checkpoint): nothing will flow back here.
        if not torch.is_grad_enabled():
            return
        if not output.requires_grad:  # the input is a constant, so no output gradient would reach this layer
            raise RuntimeError(
                f"aimkp fast step: the trained layer {type(module).__name__}({module.in_features} -> "
                f"{module.out_features}) reads an input that does not require grad, so its per-row gradient cannot be "
                "formed; use aimkp_impl: reference for this model."
            )
        activations, rows = inputs[0].detach(), self.rows

        def on_output_gradient(gradient: torch.Tensor) -> None:
            self._linear_row_gradients(module, activations, gradient, rows)

        output.register_hook(on_output_gradient)

    def _linear_row_gradients(
        self, module: nn.Linear, activations: torch.Tensor, gradient: torch.Tensor, rows: slice
    ) -> None:
        count = gradient.shape[0]
        delta = gradient.reshape(count, -1, gradient.shape[-1])
        inputs = activations.reshape(count, -1, activations.shape[-1]).to(delta.dtype)
        weight_trained, bias_trained = self.trained[module]
        if weight_trained:
            self.add(module.weight, rows, torch.einsum("rto,rti->roi", delta, inputs))
        if bias_trained:
            self.add(module.bias, rows, delta.sum(dim=1))

    def add_through(
        self,
        shared: Sequence[torch.Tensor],
        parameters: Sequence[nn.Parameter],
        rows: list[int],
        row_gradients: Sequence[torch.Tensor],
        retain_graph: bool = True,
    ) -> None:
        """Push ``row_gradients`` back to ``parameters`` through the graphs of the ``shared`` tensors, the rows in one
        vmapped backward, and add the results. ``row_gradients[k]`` is ``(len(rows), *shared[k].shape)``: each row's
        gradient with respect to ``shared[k]``."""
        if not parameters:
            return
        per_parameter = torch.autograd.grad(
            list(shared),
            list(parameters),
            grad_outputs=list(row_gradients),
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain_graph,
        )
        index = torch.tensor(rows, device=self.flat.device)
        for parameter, per_row in zip(parameters, per_parameter, strict=True):
            if per_row is not None:
                self.add(parameter, index, per_row)

    # reading
    def gram(self) -> torch.Tensor:
        """``G[r, s] = <g_r, g_s>`` over all parameters."""
        return self.flat @ self.flat.T

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_r weights[r] g_r`` as one flat vector."""
        return weights.to(self.flat.dtype) @ self.flat

    def add_into_grad(self, vector: torch.Tensor) -> None:
        """``parameter.grad += vector[slice]`` for every parameter (created when missing)."""
        for parameter in self.parameters:
            start, stop = self.offsets[id(parameter)]
            contribution = vector[start:stop].view_as(parameter).to(parameter.dtype)
            parameter.grad = contribution.clone() if parameter.grad is None else parameter.grad + contribution
