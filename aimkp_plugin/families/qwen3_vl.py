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

from ..method.fast_step import ImageFeatures
from ..method.types import SampleInputs
from ..models.building import QWEN_CHAT_TEMPLATE, TinyModelSpec, qwen_tokenizer, save_tiny
from .base import FamilyDescription, stacked_pixel_values
from .qwen2_vl import QwenVLFamily


TINY_MAX_PIXELS = 768 * 768  # 24 x 24 merged tokens (factor 32 = patch 16 * merge 2), as LLaVA-1.5's grid
TINY_MIN_PIXELS = 64 * 64  # 2 x 2 merged tokens: small images stay small


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
        TinyModelSpec(name="qwen3vl", family="qwen3_vl", template="qwen3_vl_nothink", patch_size=16, vision_layers=2),
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
        from transformers import (
            Qwen2VLImageProcessor,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        tokenizer = qwen_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        head_dim = spec.hidden_size // spec.num_heads  # 16 -> rotary half-dim 8
        half = head_dim // 2
        section = max(1, half // 4)
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                # interleaved T/H/W frequencies ([THWTHW..TT]); the sections must sum to head_dim / 2: [4, 2, 2]
                "mrope_section": [half - 2 * section, section, section],
                "mrope_interleaved": True,
            },
            "pad_token_id": vocab["<|endoftext|>"],
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
        }
        vision = {
            "depth": spec.vision_layers,  # 2 blocks; DeepStack taps block 0
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_hidden_size * 2,
            "num_heads": 2,
            "patch_size": spec.patch_size,  # 16
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": spec.hidden_size,  # merger and deepstack mergers project into the LLM width
            "num_position_embeddings": 144,  # a 12 x 12 learned grid, bilinearly interpolated to any image grid
            "deepstack_visual_indexes": [0],
        }
        config = Qwen3VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
            tie_word_embeddings=False,
        )
        model = Qwen3VLForConditionalGeneration(config)
        model.generation_config.pad_token_id = vocab["<|endoftext|>"]
        model.generation_config.eos_token_id = vocab["<|im_end|>"]
        common = {"patch_size": spec.patch_size, "temporal_patch_size": 2, "merge_size": 2}
        common |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        image_processor = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, **common)
        video_processor = Qwen3VLVideoProcessor(
            size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}, **common
        )
        processor = Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=QWEN_CHAT_TEMPLATE,
        )
        save_tiny(out, model, processor, tokenizer, QWEN_CHAT_TEMPLATE)
