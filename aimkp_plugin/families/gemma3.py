"""Gemma 3 (``gemma3``): a fixed square grid per image, and image tokens that attend to each other both ways.

- Grid: ``mm_tokens_per_image`` ``<image_soft_token>`` tokens per image (256 = 16×16: the vision tower's 64×64 patch
  grid average-pooled 4×4), one contiguous block between ``<start_of_image>`` and ``<end_of_image>``, which stay
  visible.
- Attention: Gemma 3 makes each image block bidirectional (its ``token_type_ids``), on top of causal attention, and
  its sliding-window layers see only the last ``sliding_window`` positions (an image block sees itself whole). A copy
  keeps exactly that pattern among the tokens it keeps: a hidden image token is seen by no token, also not by the
  image tokens before it. The model uses a 4-D mask it is given as it is for every layer, so both steps build one
  mask per layer type (full and sliding) themselves: the reference over the whole sequence with the hidden columns
  cleared, the fast step over the kept tokens with causality and the window counted in original positions.
- Fast step: vision tower and ``multi_modal_projector`` run once (``get_image_features``); 1-D positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import is_true
from ..method.family_interface import ImageFeatures
from ..method.masking import as_attention_mask, hide_positions
from ..method.types import SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily, attention_mask_dtype, stacked_pixel_values


def image_groups(is_image: torch.Tensor) -> torch.Tensor:
    """Per position of ``is_image`` (``(..., L)`` bool): the index of its run of image tokens, -1 for other tokens (as
    Gemma 3 and Gemma 4 number their image blocks)."""
    previous = torch.cat([torch.zeros_like(is_image[..., :1]), is_image[..., :-1]], dim=-1)
    groups = torch.cumsum((is_image & ~previous).long(), dim=-1) - 1
    return torch.where(is_image, groups, -1)


def gemma_allowed(
    positions: torch.Tensor, is_image: torch.Tensor | None, window: int | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, 1, L, L)`` bool, True = attend: causal in ``positions`` (within ``window`` when given) or the same image
    block (when ``is_image`` is given; Gemma 4's full-attention layers have none); keys outside ``valid`` are masked,
    and every query keeps its own key so no row is empty."""
    distance = positions[:, :, None] - positions[:, None, :]  # [row, query, key]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    if is_image is not None:
        groups = image_groups(is_image)
        allowed |= (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    if valid is not None:
        allowed &= valid[:, None, :]
    allowed |= torch.eye(positions.shape[-1], dtype=torch.bool, device=positions.device)
    return allowed[:, None]


class Gemma3Family(LlavaStyleFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    templates = ("gemma3",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="mm_tokens_per_image square grid, 16×16 = 256 (4×4-pooled vision patches)",
        masked="grid cells by the 2-D rule; a hidden image token is invisible to the other image tokens both ways "
        "(the bidirectional image block is kept among the kept tokens); `<start_of_image>` and `<end_of_image>` "
        "stay visible",
        positions="1-D (0..L-1); causality and sliding windows counted in original positions",
    )
    per_token_keys = ("token_type_ids",)  # carried, not read: both steps take the image blocks from the spans
    custom_attention = True
    tiny_models = (
        # 64 px / patch 4 -> 16x16 patches, pooled 4x4 as in Gemma 3 -> a 4x4 grid of 16 image tokens
        TinyModelSpec(name="gemma3", family="gemma3", template="gemma3", image_size=64, patch_size=4),
    )

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        expected = int(config.mm_tokens_per_image)
        side = int(expected**0.5)
        if token_count != expected or side * side != expected:
            raise ImageLayoutError(
                f"{token_count} image tokens, but a Gemma 3 image has mm_tokens_per_image = {expected} tokens, "
                "which must form a square grid"
            )
        return [TokenGrid(side, side, tuple(range(token_count)))]

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        problems = []
        template = setting("template")
        if template not in self.templates:
            problems.append(
                f"template: {template} does not mark Gemma 3's image tokens (token_type_ids), so its image blocks "
                "would not be bidirectional as the model was trained. Set template: gemma3."
            )
        if is_true(setting("image_do_pan_and_scan")):
            problems.append(
                "image_do_pan_and_scan: true adds crops that LLaMA-Factory 0.9.5 cannot lay out for Gemma 3. Set "
                "image_do_pan_and_scan: false."
            )
        return problems

    def layer_masks(self, model: nn.Module, positions, is_image, valid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One mask per layer type of the text model (``sliding_attention`` within the window)."""
        text = model.config.get_text_config()
        return {
            layer_type: as_attention_mask(
                gemma_allowed(
                    positions, is_image, text.sliding_window if layer_type == "sliding_attention" else None, valid
                ),
                dtype,
            )
            for layer_type in sorted(set(text.layer_types))
        }

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        input_ids = sample.model_inputs["input_ids"]
        is_image = torch.zeros_like(input_ids, dtype=torch.bool)
        is_image[0, sample.spans.image_positions] = True
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self.layer_masks(model, positions, is_image, None, torch.bool)
        return {
            layer_type: as_attention_mask(hide_positions(allowed, hidden), dtype)
            for layer_type, allowed in masks.items()
        }

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
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
        """The model with one mask per layer type over the kept tokens: image blocks are the runs of kept image tokens
        (``<start_of_image>`` / ``<end_of_image>`` are never hidden, so two images never touch)."""
        dtype = attention_mask_dtype(model, inputs_embeds.dtype)
        masks = self.layer_masks(model, position_ids, image_mask, attention_mask.bool(), dtype)
        return model(
            inputs_embeds=inputs_embeds,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_positions,
        ).logits

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_gemma3 import build_gemma3

        build_gemma3(spec, out)
