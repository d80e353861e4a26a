"""Gemma 4 (``gemma4``): an aspect-ratio-preserving grid per image, per-layer-type attention masks, 1-D positions.

- Grid: the image processor resizes each picture, keeping its aspect ratio, to at most ``max_soft_tokens · k²``
  patches of ``patch_size`` px with both sides divisible by ``k · patch_size`` (``k``: the vision config's
  ``pooling_kernel_size``, 3); the vision tower average-pools each ``k×k`` cell of patches into one ``<|image|>``
  token. An image of ``H×W`` patches therefore has a ``(H/k) × (W/k)`` grid of tokens, row-major (the pooled cell
  of patch ``(x, y)`` is ``x//k + (W/k)·(y//k)``), one contiguous block between ``<|image>`` and ``<image|>``, which
  stay visible. The count varies with the aspect ratio (a square picture at 280 soft tokens: 16×16 = 256); the
  batch's ``image_position_ids`` (one row per image: the ``(x, y)`` of each patch, ``-1`` for padding) give ``W``
  and ``H``. ``pixel_values`` has one row per image (its patches, padded to ``max_soft_tokens · k²``).
- Attention: ``use_bidirectional_attention: vision`` (the larger checkpoints) makes each image block bidirectional
  in the sliding-window layers only; the full-attention layers stay causal. Sliding layers see the last
  ``sliding_window`` positions (an image block sees itself whole). Without it (the E2B/E4B checkpoints) every layer
  is causal, the sliding ones within the window. A copy keeps exactly that pattern among the tokens it keeps: a
  hidden image token is seen by no token, also not by the image tokens before it. The model uses a mask it is given
  per layer type (a dict) as it is, so both steps build one mask per layer type themselves: the reference over the
  whole sequence with the hidden columns cleared, the fast step over the kept tokens with causality and the window
  counted in original positions.
- Everything else is per token: per-layer embeddings (PLE, E2B/E4B: a lookup of the token id, image tokens read as
  ``<pad>``, plus a projection of the token's own input embedding), KV shared between layers (attention over the
  same keys), mixture-of-experts (a per-token router). Nothing mixes tokens outside attention.
- Fast step: vision tower and ``embed_vision`` (the projector, trained as ``embed_vision.embedding_projection``) run
  once (``get_image_features``); 1-D positions; the text model runs layer by layer with the keyword calls of
  :meth:`Gemma4Family.language_logits`, ``lm_head`` and the final logit soft-capping only at the answer-predicting
  positions. Models with per-layer embeddings or KV sharing take the reference step (see
  :meth:`Gemma4Family.vision_parameters`).
- Templates: ``gemma4``. ``gemma4n`` (the same model type and image path, for the audio checkpoints) makes
  LLaMA-Factory's collator add a dummy audio clip (``input_features``) to every batch without audio, which a
  per-sample split cannot place; it is refused with ``gemma4`` as the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import FastStepUnsupportedError, ImageFeatures
from ..method.masking import as_attention_mask, hide_positions
from ..method.types import ImageSpan, SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, ModelFamily, attention_mask_dtype, stacked_pixel_values
from .gemma3 import gemma_allowed


class Gemma4Family(ModelFamily):
    name = "gemma4"
    model_types = ("gemma4",)
    templates = ("gemma4",)
    # embed_vision (a scale-free RMS norm and this Linear layer): PEFT's modules_to_save wrapper takes its input
    # positionally, and Gemma4Model calls embed_vision(inputs_embeds=...), so only the Linear layer can be trained
    projector = "embed_vision.embedding_projection"
    description = FamilyDescription(
        grid="(H/3)×(W/3) grid of the aspect-preserving patch grid, 3×3-pooled (from image_position_ids)",
        masked="grid cells by the 2-D rule; a hidden image token is invisible to the other image tokens both ways "
        "(the bidirectional image block of the sliding layers is kept among the kept tokens); `<\\|image>` and "
        "`<image\\|>` stay visible",  # pipes escaped: the README's table cells
        positions="1-D (0..L-1); causality and sliding windows counted in original positions",
    )
    per_image_keys = ("image_position_ids",)
    per_token_keys = ("mm_token_type_ids",)  # carried, not read: both steps take the image blocks from the spans
    custom_attention = True
    removes_hidden_tokens = False  # every token mixing is attention (see the module docstring)
    has_fast_step = True
    tiny_models = (
        # patch 4, 3×3 pooling, 70 soft tokens at most: a square picture → 96 px → 24×24 patches → 8×8 tokens
        TinyModelSpec(name="gemma4", family="gemma4", template="gemma4", image_size=96, patch_size=4),
    )

    # ------------------------------------------------------------------ image tokens and grids

    def image_token_id(self, config: Any) -> int | None:
        """``image_token_id`` (``<|image|>``)."""
        value = getattr(config, "image_token_id", None)
        return int(value) if value is not None else None

    def pixel_rows(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> int:
        """One row of ``pixel_values`` per image (its patches, padded)."""
        return 1

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        positions = image_inputs.get("image_position_ids")
        if positions is None:
            raise ImageLayoutError("the batch has no image_position_ids, which give a Gemma 4 image's patch grid")
        patches = positions.reshape(-1, 2)
        patches = patches[(patches >= 0).all(dim=-1)]
        pooling = int(config.vision_config.pooling_kernel_size)
        width, height = (int(patches[:, 0].max()) + 1, int(patches[:, 1].max()) + 1) if len(patches) else (0, 0)
        rows, cols = height // pooling, width // pooling
        if rows * pooling != height or cols * pooling != width or rows * cols != token_count or not token_count:
            raise ImageLayoutError(
                f"{token_count} image tokens, but a Gemma 4 image of {height}×{width} patches pooled {pooling}×"
                f"{pooling} has {rows}×{cols} = {rows * cols}"
            )
        return [TokenGrid(rows, cols, tuple(range(token_count)))]

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        (grid,) = self.image_grids(config, len(positions), image_inputs)
        return ImageSpan(positions, (TokenGrid(grid.height, grid.width, tuple(positions)),))

    # ------------------------------------------------------------------ attention and run checks

    def layer_masks(
        self,
        model: nn.Module,
        positions: torch.Tensor,
        is_image: torch.Tensor,
        valid: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """One mask per layer type of the text model: ``sliding_attention`` within the window, with bidirectional
        image blocks when the config says ``use_bidirectional_attention: vision``; ``full_attention`` causal."""
        text = model.config.get_text_config()
        vision_blocks = is_image if text.use_bidirectional_attention == "vision" else None
        masks = {}
        for layer_type in sorted(set(text.layer_types)):
            sliding = layer_type == "sliding_attention"
            allowed = gemma_allowed(
                positions, vision_blocks if sliding else None, text.sliding_window if sliding else None, valid
            )
            masks[layer_type] = as_attention_mask(allowed, dtype)
        return masks

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        input_ids = sample.model_inputs["input_ids"]
        is_image = input_ids == self.image_token_id(model.config)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self.layer_masks(model, positions, is_image, None, torch.bool)
        return {
            layer_type: as_attention_mask(hide_positions(allowed, hidden), dtype)
            for layer_type, allowed in masks.items()
        }

    def reference_mask_builder(self, model: nn.Module) -> Callable[[SampleInputs, list[int], torch.dtype], Any] | None:
        return functools.partial(self.reference_attention_mask, model)

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        problems = []
        template = setting("template")
        if template not in self.templates:  # gemma4n: refused with the other templates (families/templates.py)
            problems.append(
                f"template: {template} does not lay out Gemma 4's image tokens (<|image> + soft tokens + <image|>). "
                "Set template: gemma4."
            )
        text = model_config.get("text_config") or {}
        if text.get("use_bidirectional_attention") == "all":
            problems.append(
                "use_bidirectional_attention: all (every token sees every other, the answer included) is not a "
                "causal language model that AimKP can fine-tune; use a checkpoint with causal text attention."
            )
        return problems

    # ------------------------------------------------------------------ the fast step

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The vision tower's and ``embed_vision``'s parameters.

        Raises :class:`FastStepUnsupportedError` (the reference step runs instead) for a text model with per-layer
        embeddings or with KV shared between layers. Per-layer embeddings look up each row's token ids, which the
        fast step does not pass, and feed every layer a tensor computed from ``inputs_embeds``; KV sharing feeds a
        later layer the keys and values of an earlier one. A packed shared prefix differentiates each layer with
        respect to its hidden states only, so both side inputs would lose their gradients there (measured on a tiny
        variant: 14 % and 65 % relative error in ``.grad``); with the rows apart both are exact."""
        text = model.config.get_text_config()
        if text.hidden_size_per_layer_input:
            raise FastStepUnsupportedError(
                "Gemma 4's per-layer embeddings (hidden_size_per_layer_input) look up each row's token ids, which "
                "the fast step does not pass to the family"
            )
        if text.num_kv_shared_layers:
            raise FastStepUnsupportedError(
                "Gemma 4's KV sharing between layers (num_kv_shared_layers) cannot run with a shared prefix"
            )
        return [*model.model.vision_tower.parameters(), *model.model.embed_vision.parameters()]

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """``get_image_features`` on every image's patches and patch positions: one feature row per image token,
        images in order (the vision tower drops each image's padding)."""
        stacked = stacked_pixel_values(samples, "image_position_ids")
        if stacked is None:
            return None
        features = model.model.get_image_features(stacked[0], stacked[1], return_dict=True).pooler_output
        return ImageFeatures(features.reshape(-1, features.shape[-1]))

    def position_ids(self, sample: SampleInputs) -> torch.Tensor:
        """``0..L-1`` as ``(1, L)``: 1-D rope."""
        return torch.arange(sample.model_inputs["input_ids"].shape[1])[None]

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        language_model = model.model.language_model
        return list(language_model.layers[: language_model.config.num_hidden_layers])

    def language_logits(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
        extras: Sequence[torch.Tensor],
        logits_positions: torch.Tensor,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The text model over the kept tokens of padded rows, as ``Gemma4TextModel.forward`` computes it, then
        ``lm_head`` and the final soft-capping ``c · tanh(logits / c)`` at ``logits_positions`` only.

        Each decoder layer is called with keyword arguments only (``per_layer_input`` included), so that the shared
        prefix's checkpointing hook receives the hidden states as the one positional argument. The masks: one per
        layer type (:meth:`layer_masks`) over the kept tokens, image blocks being the runs of kept image tokens
        (``<|image>`` / ``<image|>`` are never hidden, so two images never touch). ``input_ids`` (the rows' token
        ids) serve the per-layer embeddings only: their token part looks up each id, image tokens reading
        ``<pad>``, as ``Gemma4Model.forward`` does."""
        language_model = model.model.language_model
        text = language_model.config
        per_layer_inputs = None
        if text.hidden_size_per_layer_input:
            if input_ids is None:
                raise FastStepUnsupportedError("Gemma 4's per-layer embeddings need the rows' input_ids")
            token_ids = input_ids.masked_fill(image_mask, text.pad_token_id)
            per_layer_inputs = language_model.project_per_layer_inputs(
                inputs_embeds, language_model.get_per_layer_inputs(token_ids, None)
            )
        dtype = attention_mask_dtype(model, inputs_embeds.dtype)
        masks = self.layer_masks(model, position_ids, image_mask, attention_mask.bool(), dtype)
        rotary = {
            layer_type: language_model.rotary_emb(inputs_embeds, position_ids, layer_type)
            for layer_type in sorted(set(text.layer_types))
        }
        hidden = inputs_embeds
        shared_kv_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            layer_type = text.layer_types[index]
            hidden = layer(
                hidden,
                per_layer_input=per_layer_inputs[:, :, index] if per_layer_inputs is not None else None,
                shared_kv_states=shared_kv_states,
                position_embeddings=rotary[layer_type],
                attention_mask=masks[layer_type],
                position_ids=position_ids,
                past_key_values=None,
            )
        hidden = language_model.norm(hidden)
        logits = model.lm_head(hidden[:, logits_positions])
        cap = text.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    # ------------------------------------------------------------------ tiny models

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_gemma4 import build_gemma4

        build_gemma4(spec, out)
