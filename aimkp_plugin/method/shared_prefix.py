"""The text copy's shared prefix, computed once per decoder layer, with each copy's gradient kept apart.

A sample's text copy equals its original up to the first hidden text token (the system prompt, the image tokens, the
post text before it): its *prefix*, ``p`` tokens. Causal attention makes every prefix token's hidden state the same
in both rows, in every layer. Per decoder layer, the rows of a pass are therefore *packed*: the original row and the
text row's suffix (its kept tokens from ``p`` on) become one packed row ``[prefix | original suffix | text suffix]``,
with a tree-shaped mask (the prefix sees the prefix; each suffix sees the prefix and itself, by its own row's mask;
every position keeps its own position ids and rotary embeddings). The layer runs once on the packed rows, and its
output is unpacked into the two rows (the prefix's output into both).

Exact per-row gradients need each copy's output gradient pushed back through the prefix on its own (the cosines
compare the two copies' whole gradients, prefix tokens included). :class:`_SharedPrefixLayer` therefore runs, in its
backward, two vector-Jacobian products through the packed layer: one with the original's output gradients (the
prefix and the original's suffix), one with the text copy's (the prefix and the text's suffix). The per-row Linear
hooks of :class:`~aimkp_plugin.method.row_gradients.RowGradients` attribute each product's ``δ`` to the right row
(:attr:`RowGradients.fire_rows`). With gradient checkpointing the layer's forward runs without a graph and is
recomputed once in the backward (under the forward's autocast state); without, the forward keeps its graph for the
two products. The layers must be deterministic: with dropout the two copies would share the prefix's dropout masks
(kept apart, each forward pass draws its own), so the caller shares prefixes only without dropout
(:func:`~aimkp_plugin.method.fast_step.resolve_share_prefix`), and the recomputation needs no random state.

Per pair and layer this computes the forward (and its recomputation) of ``L_o + L_t - p`` tokens instead of
``L_o + L_t``, and the backward twice over the packed row instead of once over each row.

A decoder layer is reached through the hook that gradient checkpointing uses (``layer.gradient_checkpointing`` and
``layer._gradient_checkpointing_func``, as in Hugging Face's ``GradientCheckpointingLayer``), so that the layer's own
code runs unchanged; the hook receives the layer call with its keyword arguments bound. Every keyword tensor with the
pass's ``(rows, length)`` axes (rotary embeddings, position ids) is packed like the hidden states; the attention mask
(4-D, boolean or additive, or None for plain causal) is packed as described above.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .row_gradients import RowGradients


@dataclass(frozen=True)
class PrefixPair:
    """An original row and its text copy's row (indices in the pass), their lengths, and their shared prefix."""

    original: int
    text: int
    prefix: int
    original_length: int
    text_length: int

    @property
    def packed_length(self) -> int:
        return self.original_length + self.text_length - self.prefix


class PackedPass:
    """Index maps between a pass's rows (``rows`` × ``length``, padded) and its packed rows.

    Packed row ``j < len(pairs)`` is pair ``j``; the pass's other rows follow, one packed row each. Each packed
    position has a *view*: 0 for an original (or unpaired) row's tokens and the prefix, 1 for a text suffix.
    """

    def __init__(
        self, pairs: Sequence[PrefixPair], lengths: Sequence[int], length: int, buffer_rows: Sequence[int]
    ) -> None:
        paired = {index for pair in pairs for index in (pair.original, pair.text)}
        singles = [index for index in range(len(lengths)) if index not in paired]
        self.rows, self.length = len(lengths), length
        self.packed_rows = len(pairs) + len(singles)
        self.packed_length = max([pair.packed_length for pair in pairs] + [lengths[index] for index in singles])
        shape = (self.packed_rows, self.packed_length)
        # source of each packed position in the rows layout, per view (-1: none), and the view queries use
        self.source = torch.full((2, *shape), -1, dtype=torch.long)
        self.query_view = torch.zeros(shape, dtype=torch.long)
        self.view_row = torch.zeros(2, self.packed_rows, dtype=torch.long)  # the pass row each view reads
        # where each position of the rows layout reads the packed outputs (flat index), and from which view's product
        self.target = torch.zeros(self.rows, length, dtype=torch.long)
        self.target_view = torch.zeros(self.rows, dtype=torch.long)
        buffer = list(buffer_rows)
        self.buffer_rows = [torch.tensor([0] * self.packed_rows), torch.tensor([0] * self.packed_rows)]
        for j, pair in enumerate(pairs):
            o, t, p = pair.original, pair.text, pair.prefix
            suffix = pair.text_length - p
            self.view_row[:, j] = torch.tensor([o, t])
            original_positions = torch.arange(pair.original_length)
            self.source[0, j, : pair.original_length] = o * length + original_positions
            self.source[1, j, :p] = t * length + original_positions[:p]
            text_positions = torch.arange(p, pair.text_length)
            self.source[1, j, pair.original_length : pair.packed_length] = t * length + text_positions
            self.query_view[j, pair.original_length : pair.packed_length] = 1
            self.target[o] = j * self.packed_length + torch.arange(length).clamp(max=pair.original_length - 1)
            text_target = torch.cat([torch.arange(p), pair.original_length + torch.arange(suffix)])
            self.target[t] = j * self.packed_length + text_target[torch.arange(length).clamp(max=pair.text_length - 1)]
            self.target_view[t] = 1
            self.buffer_rows[0][j], self.buffer_rows[1][j] = buffer[o], buffer[t]
        for j, index in enumerate(singles, start=len(pairs)):
            self.view_row[:, j] = index
            self.source[0, j, : lengths[index]] = index * length + torch.arange(lengths[index])
            self.target[index] = j * self.packed_length + torch.arange(length).clamp(max=lengths[index] - 1)
            self.buffer_rows[0][j] = self.buffer_rows[1][j] = buffer[index]
        # the rows layout's real positions (pads read a real packed position, for finite values, and get no gradient)
        self.real = torch.zeros(self.rows, length, dtype=torch.bool)
        for index, count in enumerate(lengths):
            self.real[index, :count] = True
        # the rows-layout position each packed position reads its input from (view 0's source where it has one,
        # else view 1's; -1: padding)
        self.read_from = torch.where(self.source[0] >= 0, self.source[0], self.source[1])
        self._packed: dict[int, tuple[Any, Any]] = {}  # id of a layer argument -> (it, its packed form)

    def to(self, device: torch.device) -> PackedPass:
        for name in ("source", "read_from", "query_view", "view_row", "target", "target_view", "real"):
            setattr(self, name, getattr(self, name).to(device))
        self.buffer_rows = [rows.to(device) for rows in self.buffer_rows]
        return self

    # values ---------------------------------------------------------------------------------------------------
    def pack(self, tensor: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """``tensor``'s ``(rows, length)`` axes at ``axis`` gathered into the packed layout (:attr:`read_from`;
        padding reads position 0)."""
        source = self.read_from.clamp(min=0)
        flat = tensor.flatten(axis, axis + 1)
        packed = flat.index_select(axis, source.flatten())
        return packed.unflatten(axis, source.shape)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The packed layer outputs ``(packed rows, packed length, ...)`` in the rows layout."""
        return packed.flatten(0, 1).index_select(0, self.target.flatten()).unflatten(0, self.target.shape)

    def cotangent(self, gradient: torch.Tensor, view: int) -> torch.Tensor:
        """The rows layout's output gradient as the packed output gradient of ``view``'s product (0: the originals,
        the unpaired rows and the prefix as the originals read it; 1: the text copies), zero elsewhere. Only real
        positions of the rows layout send a gradient."""
        source = self.source[view]
        real = self.real.flatten()[source.clamp(min=0)] & (source >= 0)
        flat = gradient.flatten(0, 1).index_select(0, source.clamp(min=0).flatten()).unflatten(0, source.shape)
        return flat * real.to(flat.dtype)[..., None]

    def input_gradient(self, products: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rows layout's input gradient from the two products' packed input gradients: a text row reads view 1's,
        every other row view 0's; padding gets none."""
        rows = [self.unpack(product) for product in products]
        chosen = torch.where(self.target_view[:, None, None] == 1, rows[1], rows[0])
        return chosen * self.real.to(chosen.dtype)[..., None]

    # the attention mask ---------------------------------------------------------------------------------------
    def pack_mask(self, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The packed rows' 4-D mask (boolean, or additive in ``mask``'s float dtype) from the rows' 4-D mask (None:
        plain causal over real tokens). A query reads its view's row: keys of its own row at their positions in that
        row; the other suffix is invisible; padding sees only itself."""
        if mask is None:
            allowed = torch.ones(self.length, self.length, dtype=torch.bool, device=device).tril()
            allowed = (allowed & self.real[:, None, :])[:, None]
        else:
            allowed = mask if mask.dtype == torch.bool else mask == 0
        heads = allowed.shape[1]
        allowed = allowed.expand(self.rows, heads, self.length, self.length)
        packed = torch.zeros(self.packed_rows, heads, self.packed_length, self.packed_length, dtype=torch.bool)
        packed = packed.to(device)
        for view in (0, 1):
            positions = self.source[view] - self.view_row[view][:, None] * self.length  # position in the view's row
            key_valid = self.source[view] >= 0
            query_positions = self.read_from.clamp(min=0) - self.view_row[view][:, None] * self.length
            rows = allowed[self.view_row[view]]  # (packed rows, heads, length, length)
            index = query_positions.clamp(0, self.length - 1)[:, None, :, None].expand(-1, heads, -1, self.length)
            by_query = rows.gather(2, index)
            index = positions.clamp(0, self.length - 1)[:, None, None, :].expand(-1, heads, self.packed_length, -1)
            seen = by_query.gather(3, index) & key_valid[:, None, None, :]
            packed |= seen & (self.query_view == view)[:, None, :, None]
        valid = (self.read_from >= 0)[:, None, :, None]  # packed positions that hold a token
        packed &= valid
        packed |= torch.eye(self.packed_length, dtype=torch.bool, device=device) & ~valid
        if mask is None or mask.dtype == torch.bool:
            return packed
        blocked = torch.finfo(mask.dtype).min
        return torch.zeros(packed.shape, dtype=mask.dtype, device=device).masked_fill(~packed, blocked)

    def pack_argument(self, name: str, value: Any, device: torch.device) -> Any:
        """A decoder layer's keyword argument in the packed layout: the mask by :meth:`pack_mask`, every tensor with
        the ``(rows, length)`` axes (tuples of them too) gathered, anything else as it is. Every layer of a pass gets
        the same arguments, so each is packed once per pass."""
        if value is None and name != "attention_mask" or isinstance(value, (bool, int, float, str)):
            return value
        key = id(value) if value is not None else 0
        if key not in self._packed:
            self._packed[key] = (value, self._pack_argument(name, value, device))
        return self._packed[key][1]

    def _pack_argument(self, name: str, value: Any, device: torch.device) -> Any:
        if name == "attention_mask":
            return self.pack_mask(value, device)
        if isinstance(value, tuple):
            return tuple(self._pack_argument("", item, device) for item in value)
        if torch.is_tensor(value):
            for axis in range(value.dim() - 1):
                if value.shape[axis] == self.rows and value.shape[axis + 1] == self.length:
                    return self.pack(value, axis)
        return value


@dataclass
class _LayerCall:
    """One decoder layer's call in the packed layout."""

    run: Callable[[torch.Tensor], torch.Tensor]
    plan: PackedPass
    gradients: RowGradients
    recompute: bool
    device: torch.device


class _SharedPrefixLayer(torch.autograd.Function):
    """The layer on the packed rows; backward: one vector-Jacobian product per view (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, call: _LayerCall, hidden: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        ctx.autocast = _autocast_state(call.device)
        if call.recompute:
            ctx.save_for_backward(hidden)
            with torch.no_grad():
                packed = call.run(call.plan.pack(hidden))
        else:
            with torch.enable_grad():
                leaf = call.plan.pack(hidden.detach()).requires_grad_(True)
                packed = call.run(leaf)
            ctx.graph = (leaf, packed)
            packed = packed.detach()
        return call.plan.unpack(packed)

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> tuple[None, torch.Tensor]:
        call: _LayerCall = ctx.call
        if call.recompute:
            (hidden,) = ctx.saved_tensors
            with torch.enable_grad(), _autocast(call.device, ctx.autocast):
                leaf = call.plan.pack(hidden.detach()).requires_grad_(True)
                packed = call.run(leaf)
        else:
            leaf, packed = ctx.graph
            del ctx.graph
        products = []
        try:
            for view in (0, 1):
                call.gradients.fire_rows = call.plan.buffer_rows[view]
                call.gradients.fire_tokens = call.plan.packed_length
                cotangent = call.plan.cotangent(gradient, view).to(packed.dtype)
                (product,) = torch.autograd.grad(packed, leaf, cotangent, retain_graph=view == 0)
                products.append(product)
        finally:
            call.gradients.fire_rows = call.gradients.fire_tokens = None
        return None, call.plan.input_gradient(products).to(gradient.dtype)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


@contextmanager
def _autocast(device: torch.device, state: tuple[bool, torch.dtype]) -> Iterator[None]:
    with torch.autocast(device.type, enabled=state[0], dtype=state[1]):
        yield


def _packed_layer_call(
    plan: PackedPass, gradients: RowGradients, recompute: bool, function: partial, hidden: torch.Tensor
) -> torch.Tensor:
    """What a decoder layer's checkpointing hook runs instead: ``function`` is the layer's call with its keyword
    arguments bound (Hugging Face's ``GradientCheckpointingLayer``), ``hidden`` the pass's hidden states."""
    device = hidden.device
    arguments = {name: plan.pack_argument(name, value, device) for name, value in function.keywords.items()}

    def run(packed: torch.Tensor) -> torch.Tensor:
        output = function.func(packed, **arguments)
        return output[0] if isinstance(output, tuple) else output

    return _SharedPrefixLayer.apply(_LayerCall(run, plan, gradients, recompute, device), hidden)


@contextmanager
def sharing_prefixes(layers: Sequence[nn.Module], plan: PackedPass, gradients: RowGradients) -> Iterator[None]:
    """Run ``layers`` (decoder layers called as ``layer(hidden_states, **keywords)``) on ``plan``'s packed rows while
    inside. A layer that checkpoints keeps checkpointing (recomputed once in the backward); one that does not keeps
    its graph. The layers' own checkpointing settings are put back on exit."""
    saved = [(layer.gradient_checkpointing, layer.__dict__.get("_gradient_checkpointing_func")) for layer in layers]
    try:
        for layer, (checkpointing, _) in zip(layers, saved, strict=True):
            recompute = bool(checkpointing) and layer.training
            layer._gradient_checkpointing_func = partial(_packed_layer_call, plan, gradients, recompute)
            layer.gradient_checkpointing = True
        yield
    finally:
        for layer, (checkpointing, function) in zip(layers, saved, strict=True):
            layer.gradient_checkpointing = checkpointing
            if function is None:
                layer.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                layer._gradient_checkpointing_func = function
