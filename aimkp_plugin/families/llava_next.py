"""LLaVA-NeXT (``llava_next``): "anyres" images, a base grid plus the unpadded high-resolution area with newlines.

- Grids, in the order of an image's ``<image>`` tokens (``LlavaNextModel.pack_image_features``):
  1. the base image, the whole picture squashed to one tile: ``g × g`` tokens (g = tile size / patch);
  2. the high-resolution area: the tiles of the best grid pinpoint stitched into one ``(tiles_h·g) × (tiles_w·g)``
     map, then cut to the image's aspect ratio (``unpad_image``): ``rows × cols`` tokens, each row followed by one
     ``image_newline`` token. The cut runs through tile boundaries, so the area is one grid, not one per tile.
  The layout comes from the image's ``image_sizes`` row and the config (pinpoints, tile and patch size).
- Masked: both grids by the 2-D rule at the sample's one image stride, each keeping its last cell when the rule keeps
  none; the newline tokens are not image content and stay visible.
- Fast step: vision tower, projector and packing (with ``image_newline``) run once (``get_image_features``); 1-D
  positions. ``image_newline`` is a parameter of the model itself, upstream of the image features.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


PINPOINT_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # llava-v1.6's pinpoints, in tiles (rows, cols)


def _select_best_resolution(original_hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution (re-stated)."""
    original_height, original_width = original_hw
    best, best_effective, best_waste = None, 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        effective = min(int(original_width * scale) * int(original_height * scale), original_width * original_height)
        waste = width * height - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (height, width), effective, waste
    return best


def _unpadded_shape(original_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """modeling_llava_next.unpad_image on a (height, width) feature map: (rows, cols, first row, first col) kept."""
    original_height, original_width = original_hw
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        padding = (height - new_height) // 2
        return height - 2 * padding, width, padding, 0
    new_width = int(round(original_width * (height / original_height), 7))
    padding = (width - new_width) // 2
    return height, width - 2 * padding, 0, padding


def anyres_grids(image_size: tuple[int, int], config: Any) -> tuple[list[TokenGrid], list[int]]:
    """The grids of one image's ``<image>`` tokens (offsets within its block) and the offsets of its newlines.

    ``image_size``: the image's ``image_sizes`` row (height, width). Total tokens: ``g² + rows·(cols + 1)``.
    """
    tile, patch = int(config.vision_config.image_size), int(config.vision_config.patch_size)
    g = tile // patch
    base = g * g
    best_height, best_width = _select_best_resolution(image_size, config.image_grid_pinpoints)
    rows, cols, _, _ = _unpadded_shape(image_size, best_height // tile * g, best_width // tile * g)
    high_res = tuple(base + row * (cols + 1) + col for row in range(rows) for col in range(cols))
    newlines = [base + row * (cols + 1) + cols for row in range(rows)]
    return [TokenGrid(g, g, tuple(range(base))), TokenGrid(rows, cols, high_res)], newlines


class LlavaNextFamily(LlavaStyleFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    templates = ("llava_next", "llava_next_mistral", "llava_next_llama3", "llava_next_qwen", "llava_next_yi")
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="anyres: the base g×g grid, then the unpadded high-resolution area as one grid (from image_sizes)",
        masked="both grids by the 2-D rule, each keeping its last token when the rule keeps none; the newline "
        "after each high-resolution row stays visible",
        positions="1-D (0..L-1)",
    )
    per_image_keys = ("image_sizes",)
    tiny_models = (
        # 56 px tiles / patch 14: a 4x4 base grid, the high-resolution area up to 8x8 (or 4x12, 12x4)
        TinyModelSpec(name="llava_next", family="llava_next", template="llava_next", image_size=56),
    )

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        size = tuple(int(value) for value in image_inputs["image_sizes"][0].tolist())
        grids, newlines = anyres_grids(size, config)
        expected = sum(len(grid.positions) for grid in grids) + len(newlines)
        if token_count != expected:
            raise ImageLayoutError(
                f"{token_count} image tokens, but a LLaVA-NeXT image of size {size[0]}×{size[1]} has {expected} "
                f"(a base grid of {len(grids[0].positions)}, a {grids[1].height}×{grids[1].width} high-resolution "
                f"area and {len(newlines)} newlines)"
            )
        return grids

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        strategy = model_config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            return [
                f"the model's vision_feature_select_strategy is {strategy!r}: LLaVA-NeXT's anyres packing needs "
                "'default' (the CLS feature dropped) to lay its tiles out as grids. Use a checkpoint with 'default'."
            ]
        return []

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [*super().vision_parameters(model), model.model.image_newline]  # image_newline: upstream of features

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        """Write a tiny random LLaVA-NeXT (weights, config, processor, tokenizer) into ``out``."""
        from transformers import (
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessor,
            LlavaNextProcessor,
        )

        tokenizer = llava_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        text_config = llama_text_config(spec, tokenizer, tie_word_embeddings=False)
        vision_config = clip_vision_config(spec)  # one tile
        tile = spec.image_size
        pinpoints = [[rows * tile, cols * tile] for rows, cols in PINPOINT_TILES]
        grid = tile // spec.patch_size
        config = LlavaNextConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_index=vocab["<image>"],
            image_grid_pinpoints=pinpoints,
            image_seq_length=grid * grid,  # the base grid (not used by the model or by LLaMA-Factory)
            vision_feature_select_strategy="default",  # drop CLS: a tile gives grid x grid features
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=pinpoints,
            do_center_crop=True,
            do_pad=True,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        save_llava_style(
            out, model, tokenizer, image_processor, LlavaNextProcessor, spec.patch_size, image_token="<image>"
        )
