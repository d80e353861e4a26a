"""What the plugin knows about a model family, as one object: the base class every family module fills in.

A family answers these questions, and the rest of the plugin asks it instead of branching on ``model_type``:

1. **Image tokens and grids.** Which token id the image features replace, how many rows of ``pixel_values`` each
   image has, and the 2-D grid (or grids, one per tile) its tokens form. Image tokens outside every grid (a newline
   or separator the model inserts among them) stay visible in a masked copy; so do the special tokens around an
   image (``<|vision_start|>``, ``<img>``), which are not image tokens at all.
2. **Encoding images once** (the fast step): which modules produce the image features, how to run them, and how to
   call the language model with the features in place (:class:`~aimkp_plugin.method.fast_step.FastStepFamily`).
3. **Positions.** The original position ids of a sample: ``0..L-1`` for 1-D rope, the collator's rows for a
   multimodal rope. A dropped token's neighbours keep theirs.
4. **Attention and run checks.** The reference step's mask for a copy, where the model's attention is not plain
   causal (Gemma 3's bidirectional image blocks), and the settings of a run that AimKP cannot be exact with,
   refused before the model loads.
5. **Tiny models.** The offline tiny checkpoints the tests, benchmarks and demo use, and their LLaMA-Factory template.

A model type without a family gets :class:`GenericFamily` (the 1-D fallback and the reference step); a training run
stops before such a model loads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..method.family_interface import ImageFeatures, KeyHiding, TokenRemoval, base_model_of
from ..method.types import ImageSpan, SampleInputs, TokenGrid


if TYPE_CHECKING:
    from ..models.building import TinyModelSpec


class ImageLayoutError(ValueError):
    """An image's tokens do not form the layout its model family expects."""


@dataclass(frozen=True)
class FamilyDescription:
    """One row of the "Supported models" table (docs/families.md)."""

    grid: str  # what the image grid is
    masked: str  # which tokens an image copy masks, and which stay visible
    positions: str  # how positions are kept when tokens are dropped


class ModelFamily:
    """What every model family answers. The defaults hold for any Hugging Face image-text model: the config's image
    token id, one ``pixel_values`` row per image, 1-D positions, ``get_decoder().layers``, and the whole model called
    with ``inputs_embeds``. What differs from model to model has no default: the image grids, the parameters that
    produce the image features and how the images are encoded (:class:`LlavaStyleFamily` answers those two for
    LLaVA-like models)."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    # non-empty: the family takes its model_types only with one of these vision towers (vision_config.model_type;
    # Pixtral-12B is a ``llava`` with a ``pixtral`` tower); the family without takes the rest of its model_types
    vision_model_types: ClassVar[tuple[str, ...]] = ()
    templates: ClassVar[tuple[str, ...]] = ()  # LLaMA-Factory templates that fit
    projector: ClassVar[str] = ""  # the projector's module name, for ``additional_target`` in recipes
    description: ClassVar[FamilyDescription] = FamilyDescription(
        "none (1-D fallback)", "every γ-th image token", "1-D"
    )
    per_image_keys: ClassVar[tuple[str, ...]] = ()  # batch keys with one row per image (e.g. image_grid_thw)
    per_token_keys: ClassVar[tuple[str, ...]] = ()  # batch keys shaped like input_ids (e.g. token_type_ids)
    # tokens that sit between one image's image tokens (Pixtral's row break): never image tokens, never masked
    image_break_tokens: ClassVar[tuple[str, ...]] = ()
    # chat-turn headers that a template puts between the image and the post text (the image before the turn)
    text_headers: ClassVar[tuple[str, ...]] = ()
    custom_attention: ClassVar[bool] = False  # True: attention is not plain causal (reference_attention_mask)
    # True: the model mixes tokens outside attention (linear attention, convolutions), where a masked token still
    # moves the state; a copy then runs with its hidden tokens removed from the sequence (language_inputs_kept)
    removes_hidden_tokens: ClassVar[bool] = False
    # True: images reach the language model as cross-attention keys (Mllama); image grids are of keys, an image copy
    # hides keys (key_hiding), and the fast step passes the keys beside the embeddings
    cross_attention_images: ClassVar[bool] = False
    has_fast_step: ClassVar[bool] = True
    tiny_models: ClassVar[tuple[TinyModelSpec, ...]] = ()

    # ------------------------------------------------------------------ image tokens and grids

    def accepts(self, model_config: Any) -> bool:
        """Whether a model of one of :attr:`model_types` belongs here: always, unless the family names its vision
        towers (:attr:`vision_model_types`)."""
        return not self.vision_model_types or vision_model_type(model_config) in self.vision_model_types

    def image_token_id(self, config: Any) -> int | None:
        """The image placeholder token id of a model config (``image_token_index`` or ``image_token_id``)."""
        for name in ("image_token_index", "image_token_id"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        return None

    def pixel_rows(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> int:
        """How many rows of the batch's ``pixel_values`` one image takes (one by default)."""
        return 1

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        """The grids of one image's ``token_count`` tokens, positions counted from the image's first token.

        Raises :class:`ImageLayoutError` when the count does not fit the family's layout."""
        raise NotImplementedError

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        """The :class:`ImageSpan` of one image whose tokens sit at ``positions``."""
        grids = self.image_grids(config, len(positions), image_inputs)
        shifted = tuple(
            TokenGrid(grid.height, grid.width, tuple(positions[offset] for offset in grid.positions)) for grid in grids
        )
        return ImageSpan(positions, shifted)

    # ------------------------------------------------------------------ attention and run checks

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The reference step's mask for a copy hiding ``hidden``, for a family with ``custom_attention``."""
        raise NotImplementedError

    def reference_mask_builder(self, model: nn.Module) -> Callable[[SampleInputs, list[int], torch.dtype], Any] | None:
        """The reference step's ``attention_mask`` argument: :meth:`reference_attention_mask` bound to ``model`` for a
        family with ``custom_attention``; None (the method core's causal mask) otherwise."""
        return functools.partial(self.reference_attention_mask, model) if self.custom_attention else None

    def token_removal(self, model: nn.Module) -> TokenRemoval | None:
        """How the reference step removes a copy's hidden tokens, for a family with ``removes_hidden_tokens``; None
        (hidden by the attention mask) otherwise."""
        if not self.removes_hidden_tokens:
            return None
        return TokenRemoval(self.language_model(model), self.language_inputs_kept)

    def key_hiding(self, model: nn.Module) -> KeyHiding | None:
        """How the reference step hides an image copy's vision keys, for a family with ``cross_attention_images``;
        None otherwise."""
        return None

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        """Settings of a run that AimKP cannot be exact with for this family, each naming the setting and the fix;
        checked before the model loads. ``setting(name)`` reads the run's config."""
        return []

    # ------------------------------------------------------------------ the fast step

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Every parameter upstream of the image features (vision tower, projector, and whatever else feeds them)."""
        raise NotImplementedError(f"the {self.name} family does not say which parameters produce its image features")

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """The image features of every image of ``samples``, one row per image token, images in order (None when
        no sample has an image)."""
        raise NotImplementedError(f"the {self.name} family does not say how its images are encoded")

    def position_ids(self, sample: SampleInputs) -> torch.Tensor:
        """``0..L-1`` as ``(1, L)``: 1-D rope."""
        return torch.arange(sample.model_inputs["input_ids"].shape[1])[None]

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The language model's decoder layers (``get_decoder().layers``)."""
        return list(model.get_decoder().layers)

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
        """The whole model from ``inputs_embeds`` (the image features already in place), ``lm_head`` only at
        ``logits_positions``."""
        return model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_positions,
        ).logits

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack that receives ``inputs_embeds`` (``model.model.language_model``): where the reference
        step removes a copy's hidden tokens for a family with ``removes_hidden_tokens`` (below a PEFT wrapper)."""
        return base_model_of(model).model.language_model

    def language_inputs_kept(self, inputs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The language model's keyword arguments for the kept positions ``keep`` only (:func:`keep_positions`)."""
        return keep_positions(inputs, keep)

    # ------------------------------------------------------------------ tiny models

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        raise NotImplementedError(f"the {self.name} family has no tiny-model builder")


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``name`` of a model config given as a transformers config or as the dict of its ``config.json``."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def vision_model_type(model_config: Any) -> str | None:
    """The ``model_type`` of a model config's ``vision_config`` (None without one)."""
    vision = config_value(model_config, "vision_config")
    return None if vision is None else config_value(vision, "model_type")


SUPPORTED_ATTENTION = ("sdpa", "eager")


def attention_mask_dtype(model: nn.Module, compute_dtype: torch.dtype) -> torch.dtype:
    """Boolean masks for SDPA, additive float masks for eager attention; other kernels cannot take the mask."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"aimkp: true needs attention that takes a custom mask ({', '.join(SUPPORTED_ATTENTION)}); the model "
            f"runs {implementation}. Set flash_attn: sdpa."
        )
    return torch.bool if implementation == "sdpa" else compute_dtype


def stacked_pixel_values(samples: Sequence[SampleInputs], *keys: str) -> tuple[torch.Tensor, ...] | None:
    """``pixel_values`` (and ``keys``) of every sample that has images, concatenated in order; None without images."""
    with_images = [sample.model_inputs for sample in samples if "pixel_values" in sample.model_inputs]
    if not with_images:
        return None
    return tuple(torch.cat([inputs[key] for inputs in with_images]) for key in ("pixel_values", *keys))


def keep_positions(inputs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """``inputs`` (a language model's keyword arguments for one sequence) at the positions ``keep``:
    ``inputs_embeds`` ``(1, L, D)`` and ``position_ids`` ``(..., 1, L)`` gathered along the sequence, and a 2-D
    attention mask of ones (every kept token visible, causally). The mask must be given: without one and without a
    cache, transformers reads a jump in the position ids as the start of another packed sequence and masks across it.
    """
    embeds = inputs["inputs_embeds"]
    kept = dict(inputs)
    kept["inputs_embeds"] = embeds[:, keep.to(embeds.device)]
    positions = inputs.get("position_ids")
    if positions is None:  # the language model would number the kept tokens 0..K-1
        raise ValueError(
            "aimkp: a copy with its hidden tokens removed needs the sample's original position ids, and the language "
            "model was called without them (LLaMA-Factory's collator provides them for this model's template)."
        )
    kept["position_ids"] = positions[..., keep.to(positions.device)]
    kept["attention_mask"] = torch.ones(1, len(keep), dtype=torch.long, device=embeds.device)
    return kept


class LlavaStyleFamily(ModelFamily):
    """LLaVA-like models: a ``vision_tower`` and a ``multi_modal_projector`` under ``model.model``, images encoded by
    ``get_image_features`` with the config's feature layer and selection strategy."""

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The vision tower's and the projector's parameters."""
        return [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """``get_image_features`` with the config's feature layer and selection strategy (and the per-image keys),
        one feature row per image token, images in order."""
        stacked = stacked_pixel_values(samples, *self.per_image_keys)
        if stacked is None:
            return None
        output = model.model.get_image_features(
            pixel_values=stacked[0],
            **dict(zip(self.per_image_keys, stacked[1:], strict=True)),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        return ImageFeatures(
            torch.cat([features.reshape(-1, features.shape[-1]) for features in output.pooler_output])
        )


class GenericFamily(ModelFamily):
    """A model type no family module describes: images masked with the 1-D fallback, the reference step only. A run
    of ``llamafactory-cli`` stops before loading such a model (``integration.args.check_family_is_known``); this serves
    code that builds the trainer or calls the steps itself."""

    has_fast_step = False

    def __init__(self, model_type: str) -> None:
        self.name = model_type

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        return ImageSpan(positions, None)
