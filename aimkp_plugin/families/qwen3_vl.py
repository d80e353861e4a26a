"""Qwen3-VL (``qwen3_vl``): Qwen2-VL's merged grid, DeepStack features, interleaved m-rope.

- Grid: as Qwen2-VL, ``(grid_h / 2) × (grid_w / 2)`` ``<|image_pad|>`` tokens per image from ``image_grid_thw``
  (patch 16, 2×2 merge); ``<|vision_start|>`` and ``<|vision_end|>`` stay visible.
- DeepStack: the vision tower also emits one feature per image token for each of its ``deepstack_visual_indexes``
  layers, through its own mergers; the language model adds them to the image tokens' hidden states after its first
  layers. The fast step computes them once with the image features and gives each row the rows of its kept image
  tokens, in the order of its image tokens, exactly as the model's own forward gives them to a full sequence.
- Positions: the collator's ``position_ids`` (text row and the t/h/w rows of the interleaved m-rope); a kept token
  keeps its column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..method.family_interface import ImageFeatures
from ..method.types import SampleInputs
from ..models.building import TinyModelSpec
from ..models.tiny_qwen3 import build_qwen3_vl
from .base import FamilyDescription, stacked_pixel_values
from .qwen2_vl import QwenVLFamily


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    templates = ("qwen3_vl_nothink", "qwen3_vl")
    description = FamilyDescription(
        grid="(grid_h/2)×(grid_w/2) merged grid from image_grid_thw (patch 16)",
        masked="grid cells by the 2-D rule; the vision start and end tokens stay visible; a hidden token's "
        "DeepStack features reach nobody either",
        positions="interleaved m-rope: the collator's position_ids columns",
    )
    tiny_models = (
        TinyModelSpec(name="qwen3_vl", family="qwen3_vl", template="qwen3_vl_nothink", patch_size=16, vision_layers=2),
    )

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        stacked = stacked_pixel_values(samples, "image_grid_thw")
        if stacked is None:
            return None
        output = model.model.get_image_features(pixel_values=stacked[0], image_grid_thw=stacked[1], return_dict=True)
        return ImageFeatures(torch.cat(list(output.pooler_output)), tuple(output.deepstack_features or ()))

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
        """The language model with the DeepStack features of the kept image tokens, then ``lm_head`` at
        ``logits_positions``."""
        hidden = model.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            visual_pos_masks=image_mask if extras else None,
            deepstack_visual_embeds=list(extras) if extras else None,
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden[:, logits_positions])

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        build_qwen3_vl(spec, out)
