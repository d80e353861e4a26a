"""InternVL 2.5 / 3, transformers-native "-hf" checkpoints (``internvl``): tiled images, one square grid per tile.

- Grid: dynamic tiling cuts an image into up to ``max_patches`` tiles plus a thumbnail (when it made more than one
  tile), each one row of ``pixel_values``; after the pixel shuffle each tile is a square grid of
  ``image_seq_length`` ``<IMG_CONTEXT>`` tokens (16×16 = 256 at 448 px), tiles one after the other in one block
  wrapped in ``<img>`` … ``</img>``. The number of tiles of an image is its token count over the tokens per tile.
- Masked: the 2-D rule per tile, all tiles and the thumbnail at the sample's one image stride; a tile whose rule keeps
  nothing keeps its own last token. ``<img>`` and ``</img>`` stay visible.
- Fast step: vision tower, pixel shuffle and ``multi_modal_projector`` run once (``get_image_features``); 1-D
  positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..method.types import TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily


class InternVLFamily(LlavaStyleFamily):
    name = "internvl"
    model_types = ("internvl",)
    templates = ("intern_vl",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="one square grid per tile (16×16 at 448 px); tiles + thumbnail share the image's stride",
        masked="each tile's cells by the 2-D rule, each keeping its last token when the rule keeps none; "
        "`<img>` and `</img>` stay visible",
        positions="1-D (0..L-1)",
    )
    tiny_models = (
        # 112 px tiles / patch 14 -> 8x8 patches -> 4x4 = 16 tokens per tile after the pixel shuffle; up to 6 tiles
        TinyModelSpec(name="internvl", family="internvl", template="intern_vl", image_size=112),
        # InternVL's own 448 px tiles: 32x32 patches -> 16x16 = 256 tokens per tile (for the step-cost benchmark)
        TinyModelSpec(name="internvl-448", family="internvl", template="intern_vl", image_size=448),
    )

    def tokens_per_tile(self, config: Any) -> int:
        return int(config.image_seq_length)

    def pixel_rows(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> int:
        return token_count // self.tokens_per_tile(config)

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        per_tile = self.tokens_per_tile(config)
        side = math.isqrt(per_tile)
        if token_count % per_tile or side * side != per_tile:
            raise ImageLayoutError(
                f"{token_count} image tokens are not a whole number of tiles of {per_tile} tokens "
                "(image_seq_length in the model config, which must be a square grid)"
            )
        return [
            TokenGrid(side, side, tuple(range(start, start + per_tile))) for start in range(0, token_count, per_tile)
        ]

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_internvl import build_internvl

        build_internvl(spec, out)
