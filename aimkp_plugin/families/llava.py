"""LLaVA-1.5 (``llava``): one square grid of image tokens per image.

- Grid: the vision tower's patch grid, ``(image_size / patch)²`` tokens (24×24 = 576 at 336 px), one contiguous
  block of ``<image>`` tokens per image; a count that is not a square is an error.
- Masked: the cells of the 2-D rule; LLaVA-1.5 puts no special token around the image, so nothing else is involved.
- Fast step: the vision tower and ``multi_modal_projector`` run once (``get_image_features``); 1-D positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..method.types import TokenGrid
from ..models.building import (
    CLIP_MEAN,
    CLIP_STD,
    TinyModelSpec,
    clip_vision_config,
    llama_text_config,
    llava_tokenizer,
    save_llava_style,
)
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily


class LlavaFamily(LlavaStyleFamily):
    name = "llava"
    model_types = ("llava",)
    templates = ("llava",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="(image_size/patch)² square grid, 24×24 at 336 px; a count that is not a square is an error",
        masked="grid cells by the 2-D rule",
        positions="1-D (0..L-1)",
    )
    tiny_models = (
        # 56 px / patch 14 -> a 4x4 grid of 16 image tokens.
        TinyModelSpec(name="llava", family="llava", template="llava"),
        # 336 px / patch 14 -> the real LLaVA-1.5 24x24 grid (576 image tokens); small everywhere else.
        TinyModelSpec(name="llava-576", family="llava", template="llava", image_size=336),
    )

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        side = math.isqrt(token_count)
        if side * side != token_count:
            raise ImageLayoutError(f"{token_count} image tokens do not form the square grid of a LLaVA-1.5 image")
        return [TokenGrid(side, side, tuple(range(token_count)))]

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        tokenizer = llava_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        grid = spec.image_size // spec.patch_size
        config = LlavaConfig(
            text_config=llama_text_config(spec, tokenizer),
            vision_config=clip_vision_config(spec),
            image_token_index=vocab["<image>"],
            image_seq_length=grid * grid,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        save_llava(out, LlavaForConditionalGeneration(config), tokenizer, spec.image_size, spec.patch_size)


def save_llava(out: Path, model: Any, tokenizer: Any, image_size: int, patch_size: int) -> None:
    """Save a LLaVA-1.5 model with its CLIP image processor (square, centre-cropped, CLIP's mean and std), the
    processor and the chat template, as LLaMA-Factory loads a LLaVA checkpoint."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    save_llava_style(out, model, tokenizer, image_processor, LlavaProcessor, patch_size)
