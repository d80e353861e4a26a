"""Per-row gradients from one backward pass: every row of a batch is one (sample, variant), and each row's gradient
with respect to every trainable parameter is kept apart, in one flat ``(rows, P)`` buffer.

- Linear layers (LoRA's ``lora_A``/``lora_B``, a trained ``lm_head``): forward hooks keep the input ``x`` and hook the
  output's gradient ``δ``; row r's gradient is ``Σ_t δ[r, t] x[r, t]ᵀ`` for the weight and ``Σ_t δ[r, t]`` for the
  bias (Opacus' ``GradSampleModule`` rule for ``nn.Linear``). The hooks' handles are kept and removed on exit.
  Autograd still forms these layers' summed gradient (``Σ_r`` of the rows) in ``.grad``; a post-accumulate hook
  drops it as soon as it is written, so that at most one parameter's summed gradient is alive at a time instead
  of a whole gradient's worth. (Marking the parameters as not requiring grad would skip the products too, but
  LLaMA-Factory's gradient checkpointing then treats the layers as frozen and stops checkpointing them, which keeps
  every activation.)
- Parameters upstream of a shared tensor (the projector, whose image features every variant of a sample reads):
  the rows' gradients with respect to that tensor are pushed back through its graph in one vmapped backward
  (``torch.autograd.grad(..., is_grads_batched=True)``).

Then ``gram()`` gives every dot product between rows (one matmul), from which the cosines come, and
``add_combination_into_grad(w)`` adds ``Σ_r w_r g_r`` into ``.grad`` (a matrix-vector product per parameter): the
optimizer-step gradient without another backward.
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
        self.tokens: int | None = None  # the sequence length of the pass now running (its padded rows)
        # when set, the rows a backward now running attributes to (one per row of the layer's input), and their
        # length: a layer that runs on other rows than the pass's (the shared prefix's packed rows) sets both for each
        # of its products
        self.fire_rows: torch.Tensor | None = None
        self.fire_tokens: int | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    # filling
    def add(self, parameter: nn.Parameter, rows: slice | torch.Tensor, per_row: torch.Tensor) -> None:
        """Add ``per_row`` (``(len(rows), *parameter.shape)``) into the rows' slots of ``parameter``."""
        start, stop = self.offsets[id(parameter)]
        values = per_row.reshape(per_row.shape[0], -1).to(self.flat.dtype)
        if isinstance(rows, slice):
            self.flat[rows, start:stop].add_(values)  # in place into the buffer's view: no read-back and copy
        else:  # distinct rows
            self.flat[:, start:stop].index_add_(0, rows, values)

    def hook_linear_layers(self, modules: Sequence[nn.Linear]) -> RowGradients:
        """Register the forward hooks on ``modules`` (each owns trainable parameters listed in this buffer), and on
        their trainable parameters the hooks that drop the summed gradient autograd writes into ``.grad``."""
        try:
            for module in modules:
                self.handles.append(module.register_forward_hook(self._linear_forward_hook))
                for parameter in module.parameters(recurse=False):
                    if parameter.requires_grad:
                        self.handles.append(parameter.register_post_accumulate_grad_hook(self._drop_summed_gradient))
        except BaseException:
            self.remove_hooks()  # a hook left behind would clear .grad in every later backward
            raise
        return self

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @staticmethod
    def _drop_summed_gradient(parameter: torch.Tensor) -> None:
        parameter.grad = None  # the rows hold this gradient apart; the sum is formed again from them

    def __enter__(self) -> RowGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def _linear_forward_hook(self, module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        # Not under grad (inference, or the first pass of a reentrant checkpoint): nothing will flow back here.
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        activations, rows, tokens = inputs[0].detach(), self.rows, self.tokens

        def on_output_gradient(gradient: torch.Tensor) -> None:
            if self.fire_rows is None:
                self._linear_row_gradients(module, activations, gradient, rows, tokens)
            else:
                self._linear_row_gradients(module, activations, gradient, self.fire_rows, self.fire_tokens)

        output.register_hook(on_output_gradient)

    def _linear_row_gradients(
        self,
        module: nn.Linear,
        activations: torch.Tensor,
        gradient: torch.Tensor,
        rows: slice | torch.Tensor,
        tokens: int | None,
    ) -> None:
        """Add each row's gradient of ``module``: ``gradient`` is ``(rows, T, out)`` (any ``T``: a layer that sees some
        positions of every row, such as ``lm_head`` at the answer-predicting ones), or ``(rows · tokens, out)``, every
        token of every row flattened row by row (an MoE block's shared expert and its gate)."""
        count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        per_row = gradient.dim() >= 3 and gradient.shape[0] == count
        flattened = gradient.dim() == 2 and tokens is not None and gradient.shape[0] == count * tokens
        if not (per_row or flattened):
            raise RuntimeError(
                f"aimkp fast step: a Linear layer ({tuple(module.weight.shape)}) saw inputs of shape "
                f"{tuple(activations.shape)} in a pass of {count} rows of {tokens} tokens; only a layer that sees "
                "every row, or every token of every row flattened in order (as an MoE block's shared expert does), "
                "has per-row gradients here. Set aimkp_impl: reference for this model."
            )
        delta = gradient.reshape(count, -1, gradient.shape[-1])
        inputs = activations.reshape(count, -1, activations.shape[-1]).to(delta.dtype)
        if module.weight.requires_grad:
            self.add(module.weight, rows, torch.bmm(delta.transpose(1, 2), inputs))  # Σ_t δ[r, t] x[r, t]ᵀ
        if module.bias is not None and module.bias.requires_grad:
            self.add(module.bias, rows, delta.sum(dim=1))

    def add_through(
        self,
        shared: Sequence[torch.Tensor],
        parameters: Sequence[nn.Parameter],
        rows: torch.Tensor,
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
        for parameter, per_row in zip(parameters, per_parameter, strict=True):
            if per_row is not None:
                self.add(parameter, rows, per_row)

    # reading
    def gram(self) -> torch.Tensor:
        """``G[r, s] = <g_r, g_s>`` over all parameters."""
        return self.flat @ self.flat.T

    def add_combination_into_grad(self, weights: torch.Tensor) -> None:
        """``parameter.grad += Σ_r weights[r] g_r`` for every parameter (created when missing), one parameter's slice
        at a time, so that no whole combined gradient is held beside the buffer. An existing ``.grad`` is added to in
        place, as autograd does; a caller whose ``.grad`` belongs to someone else (DeepSpeed's engine) sets it aside
        first."""
        weights = weights.to(self.flat.dtype)
        for parameter in self.parameters:
            start, stop = self.offsets[id(parameter)]
            contribution = (weights @ self.flat[:, start:stop]).view_as(parameter).to(parameter.dtype)
            if parameter.grad is None:
                parameter.grad = contribution
            else:
                parameter.grad += contribution
