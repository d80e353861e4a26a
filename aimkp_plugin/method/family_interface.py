"""What the method core asks of a model family, and the types a family hands back.

- :class:`FastStepFamily`: the protocol of the fast step (how images are encoded, which parameters sit upstream of
  the image features, which positions a token has, how the language model is called with the kept tokens);
- :class:`ImageFeatures`: a micro-batch's image features as a family's ``encode_images`` returns them;
- :class:`TokenRemoval`: how a family whose tokens mix outside attention runs a copy with its hidden tokens removed
  (the reference step's pre-hook);
- :class:`KeyHiding`: how a family whose images are cross-attention keys (Mllama) hides a copy's vision keys (the
  reference step's pre-hook);
- :class:`FastStepUnsupportedError`: a model or a trained parameter outside what the fast step computes per row.

Families import this module, never the steps. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .types import SampleInputs


class FastStepUnsupportedError(ValueError):
    """The model or its trainable parameters are outside what the fast step computes per row."""


@dataclass
class ImageFeatures:
    """What the language model reads from the images of a micro-batch, one row per image token (samples and images in
    order): ``tokens`` replace the image tokens' embeddings; each of ``extras`` is fed to the language model beside
    them (Qwen3-VL's DeepStack features, one tensor per layer they are added to)."""

    tokens: torch.Tensor
    extras: tuple[torch.Tensor, ...] = ()
    # False: the images reach the language model through cross-attention (``cross_attention_images``); ``tokens``
    # then holds each image's keys (one row per image token) and is passed to ``language_logits`` with the extras
    replaces_tokens: bool = True

    @property
    def shared(self) -> list[torch.Tensor]:
        return [self.tokens, *self.extras]


class FastStepFamily(Protocol):
    """What the fast step asks of a model family."""

    name: str
    removes_hidden_tokens: bool  # token mixing outside attention: rows never share a packed prefix
    # images read through cross-attention layers (Mllama): an image copy hides vision keys, not tokens; the features
    # are not scattered into the embeddings, each row's hidden keys are passed beside them, no packed prefix
    cross_attention_images: bool

    def image_token_id(self, config: object) -> int | None:
        """The id of the tokens whose embeddings are replaced by image features."""

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter upstream of the image features (vision tower, projector, DeepStack mergers, LLaVA-NeXT's
        ``image_newline``)."""

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """The image features of every image of ``samples`` (None when none has an image)."""

    def position_ids(self, sample: SampleInputs) -> torch.Tensor:
        """The sample's original position ids, ``(1, L)`` or ``(rows, 1, L)`` for multimodal rope."""

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The language model's decoder layers, each called as ``layer(hidden_states, **keywords)`` through the
        gradient-checkpointing hook of Hugging Face's ``GradientCheckpointingLayer`` (for the shared prefix)."""

    def language_logits(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
        extras: Sequence[torch.Tensor],
        logits_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``(rows, len(logits_positions), vocabulary)`` at ``logits_positions`` (1-D, the same positions of
        every row) of padded rows whose image tokens (``image_mask``) already hold their features; ``extras`` are the
        kept rows of :attr:`ImageFeatures.extras`, in the order of ``image_mask``. With ``cross_attention_images``
        the image tokens keep their embeddings, and ``extras`` are the kept rows of every shared feature (the keys
        first) followed by each kept image token's hidden keys (bool, ``(image tokens, keys)``)."""


@dataclass(frozen=True)
class TokenRemoval:
    """How a copy runs with its hidden tokens removed: ``module`` is the decoder stack that receives
    ``inputs_embeds``, and ``keep_inputs(kwargs, keep)`` turns its keyword arguments for the whole sequence into
    those for the kept positions ``keep`` (each at its original position ids)."""

    module: nn.Module
    keep_inputs: Callable[[dict[str, Any], torch.Tensor], dict[str, Any]]

    @contextmanager
    def keeping(self, keep: torch.Tensor) -> Iterator[None]:
        """While active, every call of :attr:`module` sees only the positions ``keep``."""

        def gather(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if args:
                raise RuntimeError(f"aimkp: {type(module).__name__} was called with positional inputs")
            return args, self.keep_inputs(kwargs, keep)

        handle = self.module.register_forward_pre_hook(gather, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


@dataclass(frozen=True)
class KeyHiding:
    """How a copy hides cross-attention vision keys: ``module`` is the language model, and ``hide(kwargs, keys)``
    turns its keyword arguments into those with the vision keys ``keys`` (indices into the sample's keys) seen by no
    text token."""

    module: nn.Module
    hide: Callable[[dict[str, Any], list[int]], dict[str, Any]]

    @contextmanager
    def hiding(self, keys: list[int]) -> Iterator[None]:
        """While active, every call of :attr:`module` sees the vision keys ``keys`` hidden."""

        def hide(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if args:
                raise RuntimeError(f"aimkp: {type(module).__name__} was called with positional inputs")
            return args, self.hide(kwargs, keys)

        handle = self.module.register_forward_pre_hook(hide, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def base_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model below a PEFT wrapper (LoRA layers are injected into it, so calling it trains them)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model
