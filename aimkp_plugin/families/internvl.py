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
from ..models.building import TinyModelSpec, local_tokenizer, save_tiny
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily


TINY_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
)
TINY_MAX_TILES = 6  # tiles of the dynamic-resolution grid; a thumbnail tile is added whenever there are >1
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif item['type'] == 'video' %}<video>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def internvl_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # InternVLProcessor reads tokenizer.{start_image,end_image,context_image,video}_token(_id)
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )


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
        from transformers import (
            GotOcr2ImageProcessor,
            InternVLConfig,
            InternVLForConditionalGeneration,
            InternVLProcessor,
            InternVLVideoProcessor,
            InternVLVisionConfig,
            Qwen2Config,
        )

        tokenizer = internvl_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        text_config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=vocab["<|endoftext|>"],
            eos_token_id=vocab["<|im_end|>"],
            pad_token_id=vocab["<|endoftext|>"],
            tie_word_embeddings=False,
        )
        vision_config = InternVLVisionConfig(
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=2,
            image_size=spec.image_size,  # 112 px tile / patch 14 -> 8 x 8 patches
            patch_size=spec.patch_size,
            use_mean_pooling=True,
        )
        grid = spec.image_size // spec.patch_size
        tokens_per_tile = (grid // 2) ** 2  # pixel shuffle with downsample_ratio 0.5: 8 x 8 -> 4 x 4 = 16
        config = InternVLConfig(
            vision_config=vision_config,
            text_config=text_config,
            image_token_id=vocab["<IMG_CONTEXT>"],
            image_seq_length=tokens_per_tile,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        model = InternVLForConditionalGeneration(config)
        model.generation_config.pad_token_id = vocab["<|endoftext|>"]
        model.generation_config.eos_token_id = vocab["<|im_end|>"]
        pixels = {
            "size": {"height": spec.image_size, "width": spec.image_size},
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        }
        # Dynamic tiling is ON through the image processor's own defaults: LLaMA-Factory's InternVLPlugin passes
        # crop_to_patches/max_patches=12 only when the run sets `crop_to_patches: true`; by default it calls the image
        # processor without kwargs, so these saved defaults (max 6 tiles) apply.
        image_processor = GotOcr2ImageProcessor(
            crop_to_patches=True, min_patches=1, max_patches=TINY_MAX_TILES, **pixels
        )
        video_processor = InternVLVideoProcessor(**pixels)
        processor = InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            image_seq_length=tokens_per_tile,
            chat_template=TINY_CHAT_TEMPLATE,
        )
        save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
