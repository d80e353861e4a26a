"""PaliGemma and PaliGemma 2 (``paligemma``): one square grid per image before ``<bos>``, a bidirectional prefix.

- Layout (LLaMA-Factory's ``paligemma`` plugin, as ``PaliGemmaProcessor``): every image's ``image_seq_length``
  ``<image>`` tokens come first, before ``<bos>`` and the prompt: ``[<image>·N][<bos>] post text \\n instruction
  \\n answer`` (``paligemma_chat`` wraps the prompt in ``<start_of_turn>user\\n`` … ``<start_of_turn>model\\n``, so
  that header sits between the image and the post text: the text span skips it, :attr:`text_headers`). Nothing sits
  between or around the image tokens, so every image token is a grid cell.
- Grid: ``image_seq_length`` = (image_size / patch)² tokens per image, the SigLIP patch grid row-major (16×16 = 256 at
  224 px / patch 14, 32×32 at 448 px, 64×64 at 896 px), projected one by one (no pooling, no merge). Several images
  form one contiguous block, cut into one grid per image.
- Attention: a prefix-LM. PaliGemma's mask (``create_causal_mask_mapping``) is causal, or'ed with "query and key in
  the same run of ``token_type_ids == 0``", in every layer (Gemma 2's sliding-window layers too). LLaMA-Factory's
  collator marks the image tokens 0 and everything else 1 (``_get_paligemma_token_type_ids``; the processor would also
  mark the prompt), so the bidirectional prefix of a training sequence is exactly its image block and the prompt is
  causal. A copy keeps that pattern among the tokens it keeps: the kept image tokens see each other both ways, the rest
  is causal (within the window, counted in original positions), and a hidden token is seen by no token, neither by
  the image tokens before it nor by those after it; what it sees itself reaches nobody. Both steps build the masks
  themselves, from the image tokens, and check that the batch's ``token_type_ids`` mark exactly those as the prefix.
  PaliGemma 2 (Gemma 2 text model, ``layer_types``) takes one mask per layer type, PaliGemma (Gemma) one mask for all.
- Positions: 1-D, ``0..L-1`` as for every 1-D family (PaliGemma numbers from 1 when it gets none; rotary attention
  depends only on position differences, and nothing else reads positions, so the shift changes no output).
- Fast step: vision tower and ``multi_modal_projector`` run once (``get_image_features``); the text model runs on the
  kept tokens with the masks above (called directly: PaliGemma's own forward wants ``token_type_ids`` in training),
  ``lm_head`` only at the answer-predicting positions (PaliGemma applies no final soft-capping).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import ImageFeatures
from ..method.masking import as_attention_mask, hide_positions
from ..method.types import SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily, attention_mask_dtype, stacked_pixel_values
from .gemma3 import gemma_allowed


class PrefixLayoutError(ValueError):
    """A sample's ``token_type_ids`` mark another prefix than its image tokens."""


def check_prefix(sample: SampleInputs, image_token_id: int) -> None:
    """The sample's ``token_type_ids`` mark exactly its image tokens as the bidirectional prefix (0), as
    LLaMA-Factory's ``paligemma`` plugin does; another prefix (the processor's, with the prompt in it) is an error."""
    inputs = sample.model_inputs
    token_types = inputs.get("token_type_ids")
    is_image = inputs["input_ids"] == image_token_id
    if token_types is None or not torch.equal(token_types.to(is_image.device) == 0, is_image):
        raise PrefixLayoutError(
            f"aimkp: training sample {sample.index}: PaliGemma's bidirectional prefix (token_type_ids 0) must be "
            "exactly the image tokens, as LLaMA-Factory's paligemma templates mark it; this batch "
            f"{'has no token_type_ids' if token_types is None else 'marks other tokens'}."
        )


class PaliGemmaFamily(LlavaStyleFamily):
    name = "paligemma"
    model_types = ("paligemma",)
    templates = ("paligemma", "paligemma_chat")
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="(image_size/patch)² square grid per image, 16×16 = 256 at 224 px; the image tokens come before `<bos>`",
        masked="grid cells by the 2-D rule; the image block is the bidirectional prefix (token_type_ids 0): a hidden "
        "image token is invisible to the other image tokens both ways, the kept ones still see each other",
        positions="1-D (0..L-1); causality and sliding windows counted in original positions",
    )
    per_token_keys = ("token_type_ids",)  # read only to check that the prefix is the image block
    text_headers = ("user\n",)  # paligemma_chat: <bos><start_of_turn>user\n after the image, before the post text
    custom_attention = True
    tiny_models = (
        # 56 px / patch 14 -> a 4x4 grid of 16 image tokens; a Gemma 2 text model (PaliGemma 2)
        TinyModelSpec(name="paligemma", family="paligemma", template="paligemma"),
    )

    # ------------------------------------------------------------------ image tokens and grids

    def tokens_per_image(self, config: Any) -> int:
        """``image_seq_length``: (image_size / patch)², which ``PaliGemmaConfig`` keeps as the text config's
        ``num_image_tokens``."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def pixel_rows(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> int:
        """One row of ``pixel_values`` per image; images put one after the other form one block of tokens."""
        return max(1, token_count // self.tokens_per_image(config))

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        per_image = self.tokens_per_image(config)
        side = math.isqrt(per_image)
        if token_count % per_image or token_count == 0:
            raise ImageLayoutError(
                f"{token_count} image tokens, but a PaliGemma image has (image_size / patch)² = {per_image} tokens"
            )
        return [
            TokenGrid(side, side, tuple(range(start, start + per_image))) for start in range(0, token_count, per_image)
        ]

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        template = setting("template")
        if template not in self.templates:
            return [
                f"template: {template} does not lay out PaliGemma's images (before <bos>) nor mark its bidirectional "
                "prefix (token_type_ids), which PaliGemma needs in training. Set template: paligemma (or "
                "paligemma_chat)."
            ]
        return []

    # ------------------------------------------------------------------ attention

    def layer_masks(
        self, model: nn.Module, positions: torch.Tensor, is_image: torch.Tensor, valid, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """PaliGemma's masks over ``positions``: causal or the same image block; one per layer type of a text model
        with ``layer_types`` (Gemma 2: ``sliding_attention`` within the window), one for every layer otherwise."""
        text = model.config.get_text_config()
        layer_types = getattr(text, "layer_types", None)
        masks = {
            layer_type: as_attention_mask(
                gemma_allowed(
                    positions, is_image, text.sliding_window if layer_type == "sliding_attention" else None, valid
                ),
                dtype,
            )
            for layer_type in sorted(set(layer_types or ["full_attention"]))
        }
        return masks if layer_types else masks["full_attention"]

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        image_token_id = self.image_token_id(model.config)
        check_prefix(sample, image_token_id)
        input_ids = sample.model_inputs["input_ids"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self.layer_masks(model, positions, input_ids == image_token_id, None, torch.bool)
        if isinstance(masks, torch.Tensor):
            return as_attention_mask(hide_positions(masks, hidden), dtype)
        return {name: as_attention_mask(hide_positions(allowed, hidden), dtype) for name, allowed in masks.items()}

    # ------------------------------------------------------------------ the fast step

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        image_token_id = self.image_token_id(model.config)
        for sample in samples:
            check_prefix(sample, image_token_id)
        stacked = stacked_pixel_values(samples)
        if stacked is None:
            return None
        features = model.model.get_image_features(pixel_values=stacked[0]).pooler_output
        return ImageFeatures(features.reshape(-1, features.shape[-1]))

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
        """The text model over the kept tokens of padded rows with PaliGemma's masks (the image block: the run of kept
        image tokens at the start of each row), then ``lm_head`` at ``logits_positions``."""
        dtype = attention_mask_dtype(model, inputs_embeds.dtype)
        masks = self.layer_masks(model, position_ids, image_mask, attention_mask.bool(), dtype)
        hidden = model.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return model.lm_head(hidden[:, logits_positions])

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_paligemma import build_paligemma

        build_paligemma(spec, out)
