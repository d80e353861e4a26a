"""Mistral 3 (``mistral3``: Mistral-Small-3.1/3.2, Ministral-3; templates ``mistral_small`` and ``ministral3``):
Pixtral's row layout (``pixtral.py``) after a 2×2 patch merger.

- Grid: ``image_sizes`` (H, W) per image, patch p (14 in the checkpoints) and ``spatial_merge_size`` m (2): the
  projector's patch merger folds each m×m block of the (H/p)×(W/p) patch grid into one token (``unfold``, so an odd
  last row or column of patches is dropped), giving ``H // (p·m)`` rows of ``W // (p·m)`` ``[IMG]`` tokens, each row
  followed by ``[IMG_BREAK]``, the last by ``[IMG_END]``; the count and the rows are checked as for Pixtral.
- Masked: grid cells by the 2-D rule at the merged grid; ``[IMG_BREAK]`` and ``[IMG_END]`` stay visible.
- Positions: 1-D (0..L-1). Ministral-3's language model also scales each query by its position
  (``llama_4_scaling_beta``); it reads the position ids, so a kept token keeps its scale.
- Fast step: every image encoded once by ``get_image_features`` (vision tower, then the projector's norm, patch
  merger and MLP), with ``image_sizes`` and the config's feature layer; Mistral 3 has no feature selection strategy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import ImageFeatures
from ..method.types import SampleInputs
from ..models.building import TinyModelSpec
from .base import FamilyDescription, stacked_pixel_values
from .pixtral import PixtralFamily


class Mistral3Family(PixtralFamily):
    name = "mistral3"
    model_types = ("mistral3",)
    vision_model_types = ()
    templates = ("mistral_small", "ministral3")
    description = FamilyDescription(
        grid="(H/patch/2)×(W/patch/2) merged grid per image from image_sizes: rows of [IMG] tokens, each row ended "
        "by [IMG_BREAK], the last by [IMG_END]",
        masked="grid cells by the 2-D rule; [IMG_BREAK] and [IMG_END] stay visible",
        positions="1-D (0..L-1)",
    )
    tiny_models = (
        # patch 8, 2×2 merge, longest edge 128 px: a 64 px square gives 4×4 tokens, the 224×96 picture 3×8 (its 7
        # patch rows merged into 3); Ministral-3's language model (position-scaled queries)
        TinyModelSpec(name="mistral3", family="mistral3", template="mistral_small", image_size=128, patch_size=8),
    )

    def merge_size(self, config: Any) -> int:
        return int(config.spatial_merge_size)

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        stacked = stacked_pixel_values(samples, "image_sizes")
        if stacked is None:
            return None
        pixel_values, image_sizes = stacked
        output = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, vision_feature_layer=model.config.vision_feature_layer
        )
        return ImageFeatures(torch.cat(list(output.pooler_output)))

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_mistral3 import build_tiny_mistral3

        build_tiny_mistral3(spec, out)
