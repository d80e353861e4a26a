"""Pixtral-12B (``llava`` with a ``pixtral`` vision tower, template ``pixtral``): one grid per image, each row of
``[IMG]`` tokens ended by a visible ``[IMG_BREAK]``. Mistral 3 (``mistral3.py``) adds a patch merger to this layout.

- Grid: the image processor resizes a picture to at most ``longest_edge`` a side, both sides a multiple of the patch
  size p; ``image_sizes`` holds the result (H, W) per image. The vision tower reads its (H/p)×(W/p) patches, and a
  patch merger of size m (Mistral 3's ``spatial_merge_size``; none here, m = 1) turns each m×m block into one token
  (``unfold``: a last odd row or column of patches is dropped). So an image is ``rows = H // (p·m)`` rows of
  ``cols = W // (p·m)`` ``[IMG]`` tokens, each row followed by ``[IMG_BREAK]``, the last row's replaced by
  ``[IMG_END]`` (LLaMA-Factory's ``PixtralPlugin``, transformers' ``PixtralProcessor``). The ``[IMG]`` tokens in
  order are the grid, row-major. Their count must be rows·cols and each row must follow the one before after exactly
  one token, else :class:`ImageLayoutError`.
- Masked: grid cells by the 2-D rule. ``[IMG_BREAK]`` and ``[IMG_END]`` are not grid cells: the image features
  replace only the ``[IMG]`` tokens, so they are text tokens with their own embeddings. They stay visible, like
  LLaVA-NeXT's newlines, and they tell the model where each row ends in every copy.
- Positions: 1-D (0..L-1) over the whole sequence, breaks included; every kept token keeps its position.
- Attention: plain causal in the language model (a sliding window shorter than ``cutoff_len`` is refused, since the
  fast step's dropped rows would count the window in their own positions). The vision tower (2-D rope over each
  image's patch grid, block-diagonal attention: a patch sees only its own image's patches) runs before any masking; a
  hidden cell's features exist, but no token reads them.
- Fast step: every image of the micro-batch encoded at once by ``get_image_features`` with ``image_sizes`` (the
  block-diagonal attention makes that equal to one image at a time); the vision tower and ``multi_modal_projector``
  (with Mistral 3's patch merger) are the vision side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..method.types import ImageSpan, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily, config_value


LLAMAFACTORY_DEFAULT_CUTOFF = 2048  # LLaMA-Factory's cutoff_len when a run sets none


class PixtralFamily(LlavaStyleFamily):
    name = "pixtral"
    model_types = ("llava",)
    vision_model_types = ("pixtral",)
    templates = ("pixtral",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="(H/patch)×(W/patch) grid per image from image_sizes: rows of [IMG] tokens, each row ended by "
        "[IMG_BREAK], the last by [IMG_END]",
        masked="grid cells by the 2-D rule; [IMG_BREAK] and [IMG_END] stay visible",
        positions="1-D (0..L-1)",
    )
    per_image_keys = ("image_sizes",)
    image_break_tokens = ("[IMG_BREAK]",)
    tiny_models = (
        # patch 16, longest edge 96 px: a 64 px square gives 4×4 tokens, the 224×96 picture 3×6
        TinyModelSpec(name="pixtral", family="pixtral", template="pixtral", image_size=96, patch_size=16),
    )

    def merge_size(self, config: Any) -> int:
        """How many patches a side one image token covers (no patch merger: 1)."""
        return 1

    def grid_shape(self, config: Any, image_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """``(rows, cols)`` of one image's grid from its ``image_sizes`` row (H, W)."""
        height, width = (int(value) for value in image_inputs["image_sizes"][0].tolist())
        step = int(config.vision_config.patch_size) * self.merge_size(config)
        return height // step, width // step

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        rows, cols = self.grid_shape(config, image_inputs)
        if rows * cols != token_count:
            size = "×".join(str(int(value)) for value in image_inputs["image_sizes"][0].tolist())
            raise ImageLayoutError(
                f"{token_count} image tokens, but a {self.name} image of size {size} has a {rows}×{cols} grid "
                f"({rows * cols} [IMG] tokens)"
            )
        return [TokenGrid(rows, cols, tuple(range(token_count)))]

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        """The grid of one image's ``[IMG]`` tokens, checked against where they sit: each row contiguous, the next
        row after exactly one token (its ``[IMG_BREAK]``)."""
        grids = self.image_grids(config, len(positions), image_inputs)
        rows, cols = grids[0].height, grids[0].width
        gaps = [index for index in range(1, len(positions)) if positions[index] != positions[index - 1] + 1]
        if gaps != [row * cols for row in range(1, rows)] or any(
            positions[index] - positions[index - 1] != 2 for index in gaps
        ):
            raise ImageLayoutError(
                f"the {len(positions)} [IMG] tokens of a {rows}×{cols} grid are not {rows} rows of {cols}, each "
                "followed by one break token"
            )
        return super().image_span(config, positions, image_inputs)

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        window = config_value(config_value(model_config, "text_config") or {}, "sliding_window")
        cutoff = int(setting("cutoff_len") or LLAMAFACTORY_DEFAULT_CUTOFF)
        if window is not None and int(window) < cutoff:
            return [
                f"the language model's sliding_window is {window}, shorter than cutoff_len {cutoff}: a copy whose "
                "hidden tokens are dropped would count the window in its own positions, not the original ones. Set "
                f"cutoff_len: {window} or less."
            ]
        return []

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_mistral3 import build_tiny_pixtral

        build_tiny_pixtral(spec, out)
