"""LLaVA-1.5 (``llava``): one square grid of image tokens per image.

- Grid: the vision tower's patch grid, ``(image_size / patch)²`` tokens (24×24 = 576 at 336 px), one contiguous
  block of ``<image>`` tokens per image; a count that is not a square is an error.
- Masked: the cells of the 2-D rule; LLaVA-1.5 puts no special token around the image, so nothing else is involved.
- Fast step: the vision tower and ``multi_modal_projector`` run once (``get_image_features``); 1-D positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.fast_step import ImageFeatures
from ..method.types import SampleInputs, TokenGrid
from ..models.building import LLAVA_CHAT_TEMPLATE, TinyModelSpec, llava_tokenizer
from .base import FamilyDescription, ImageLayoutError, ModelFamily, stacked_pixel_values


class LlavaFamily(ModelFamily):
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

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        stacked = stacked_pixel_values(samples)
        if stacked is None:
            return None
        output = model.model.get_image_features(
            pixel_values=stacked[0],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        return ImageFeatures(torch.cat(list(output.pooler_output)))

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from transformers import (
            CLIPImageProcessor,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tokenizer = llava_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        text_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=4096,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
        )
        vision_config = CLIPVisionConfig(
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_hidden_layers=spec.vision_layers + 1,  # LLaVA reads the second-to-last layer
            num_attention_heads=2,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            projection_dim=spec.vision_hidden_size,
        )
        grid = spec.image_size // spec.patch_size
        config = LlavaConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_index=vocab["<image>"],
            image_seq_length=grid * grid,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        model = LlavaForConditionalGeneration(config)
        model.generation_config.pad_token_id = vocab["<pad>"]
        model.generation_config.eos_token_id = vocab["</s>"]
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": spec.image_size},
            crop_size={"height": spec.image_size, "width": spec.image_size},
            do_center_crop=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
        model.save_pretrained(out)
        processor.save_pretrained(out)
        tokenizer.save_pretrained(out)
