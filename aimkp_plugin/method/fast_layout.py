"""What the fast step needs to know about a model before its first step, and the settings it derives from it.

- :func:`fast_step_layout`: which trainable parameters are hooked Linear layers of the language side, which sit
  upstream of the image features, and whether any is outside what the fast step computes per row (then a
  :class:`~aimkp_plugin.method.family_interface.FastStepUnsupportedError` names it);
- :func:`active_dropout` and :func:`resolve_share_prefix`: whether the text copies' shared prefix may be packed;
- :func:`checkpointing_paused`: gradient checkpointing off on the vision side while trained vision parameters are
  encoded.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .family_interface import FastStepFamily, FastStepUnsupportedError, base_model_of
from .pass_planning import AUTO_SHARE_FROM


@dataclass
class FastStepLayout:
    """Where a model's trainable parameters sit, as the fast step needs to know it."""

    model: nn.Module  # the Hugging Face model (below any PEFT wrapper)
    family: FastStepFamily
    parameters: list[nn.Parameter]  # every trainable parameter, in the buffer's order
    linear_modules: list[nn.Linear]  # language-side Linear layers that own trainable parameters (hooked)
    vision_parameters: list[nn.Parameter] = field(default_factory=list)  # trainable, upstream of the image features
    dropout: str | None = None  # the first active dropout in the decoder layers (see active_dropout), or None
    # vision-side modules with a gradient-checkpointing switch: checkpointing pauses there while trained vision
    # parameters are encoded (a reentrant checkpoint cannot take the vmapped autograd.grad through the features)
    vision_modules: list[nn.Module] = field(default_factory=list)


def fast_step_layout(model: nn.Module, family: FastStepFamily) -> FastStepLayout:
    """Classify the trainable parameters of ``model``; :class:`FastStepUnsupportedError` says what is not covered."""
    hf_model = base_model_of(model)
    if family.image_token_id(hf_model.config) is None:
        raise FastStepUnsupportedError(f"the {family.name} model has no image token id")
    vision_ids = {id(p) for p in family.vision_parameters(hf_model)}
    parameters, linear_modules, vision_parameters, uncovered = [], [], [], []
    for name, module in hf_model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if all(id(p) in vision_ids for p in own):
            vision_parameters += own
        elif type(module) is nn.Linear and ".experts." in f".{name}.":
            uncovered.append(f"{name} (a Linear layer of a routed MoE expert, which sees only its routed tokens)")
            continue
        elif type(module) is nn.Linear:
            linear_modules.append(module)
        else:
            uncovered.append(f"{name} ({type(module).__name__})")
            continue
        parameters += own
    if uncovered:
        raise FastStepUnsupportedError(
            "trained parameters without a per-row gradient rule in the fast step: " + ", ".join(uncovered[:5])
        )
    dropout = active_dropout(family.decoder_layers(hf_model))
    switchable = [
        module
        for module in hf_model.modules()
        if hasattr(module, "gradient_checkpointing") and all(id(p) in vision_ids for p in module.parameters())
    ]
    return FastStepLayout(hf_model, family, parameters, linear_modules, vision_parameters, dropout, switchable)


@contextmanager
def checkpointing_paused(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Gradient checkpointing off in ``modules`` while active (their activations are kept instead)."""
    paused = [module for module in modules if getattr(module, "gradient_checkpointing", False)]
    for module in paused:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in paused:
            module.gradient_checkpointing = True


def default_share_prefix(device: torch.device) -> bool:
    """``aimkp_fast_share_prefix: auto`` without dropout: on a CPU, where a step's time follows the tokens it
    computes; not on an accelerator, where the extra passes it takes (pairs and other rows apart) have not been
    measured yet."""
    return device.type == "cpu"


def active_dropout(layers: Sequence[nn.Module]) -> str | None:
    """The first dropout with a rate above 0 in ``layers`` (a ``Dropout`` module such as LoRA's, or an attention
    module's ``attention_dropout``), named; None when there is none."""
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            rate = module.p if isinstance(module, nn.Dropout) else getattr(module, "attention_dropout", 0.0)
            if isinstance(rate, (int, float)) and rate > 0:
                return f"layer {index} {name or type(layer).__name__}: {type(module).__name__} {rate:g}"
    return None


def resolve_share_prefix(layout: FastStepLayout, requested: bool | None, device: torch.device) -> float | None:
    """From which share of a pair's tokens its prefix is shared (:func:`plan_passes`), or None for never:
    ``requested`` True shares every pair (0), None (auto) those over :data:`AUTO_SHARE_FROM` where
    :func:`default_share_prefix` says so. Never with dropout in the decoder layers, where the original and its text
    copy would share the prefix's dropout masks (kept apart, each forward pass draws its own, as in the reference
    step): with ``requested`` True that is a :class:`FastStepUnsupportedError`. Never for a family that removes hidden
    tokens (linear attention and convolutions read the sequence in order, so a tree mask cannot separate the copies);
    with ``requested`` True that is an error too; nor for a family whose images are cross-attention keys (the
    cross-attention inputs are not packed)."""
    if layout.family.cross_attention_images:
        if requested:
            raise FastStepUnsupportedError(
                f"aimkp_fast_share_prefix: true packs the decoder layers' per-token inputs, and the "
                f"{layout.family.name} model's cross-attention layers take per-row vision keys and masks that the "
                "packed prefix does not carry. Set aimkp_fast_share_prefix: auto or false."
            )
        return None
    if layout.family.removes_hidden_tokens:
        if requested:
            raise FastStepUnsupportedError(
                f"aimkp_fast_share_prefix: true needs a model whose tokens mix only through attention, and the "
                f"{layout.family.name} model mixes them outside attention too (linear attention or convolutions), "
                "where a packed prefix cannot be shared. Set aimkp_fast_share_prefix: auto or false."
            )
        return None
    if layout.dropout is None:
        if requested is None:
            return AUTO_SHARE_FROM if default_share_prefix(device) else None
        return 0.0 if requested else None
    if requested:
        raise FastStepUnsupportedError(
            f"aimkp_fast_share_prefix: true needs decoder layers without dropout, and this model has "
            f"{layout.dropout}: the original and its text copy would share the prefix's dropout masks. Set "
            "lora_dropout: 0 (and no attention dropout), or aimkp_fast_share_prefix: auto or false."
        )
    return None
