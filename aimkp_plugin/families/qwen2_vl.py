"""Qwen2-VL (``qwen2_vl``) and Qwen2.5-VL (``qwen2_5_vl``): one merged grid per image, 3-D m-rope positions.

- Grid: ``(grid_h / merge) × (grid_w / merge)`` ``<|image_pad|>`` tokens per image, from its ``image_grid_thw`` row
  (merge = ``spatial_merge_size``, 2); any other count (a video frame stack, a mismatch) is an error.
- Masked: the grid cells by the 2-D rule; ``<|vision_start|>`` and ``<|vision_end|>`` around the image stay visible.
- Fast step: ``visual`` (vision tower and ``merger``) runs once per micro-batch; a kept token keeps its column of the
  collator's ``position_ids`` (text row and t/h/w m-rope rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import is_true
from ..method.family_interface import ImageFeatures
from ..method.types import SampleInputs, TokenGrid
from ..models.building import QWEN_CHAT_TEMPLATE, TinyModelSpec, qwen_tokenizer, save_tiny
from .base import FamilyDescription, ImageLayoutError, ModelFamily, stacked_pixel_values


class QwenVLFamily(ModelFamily):
    """Qwen2-VL; Qwen2.5-VL differs only in its vision tower's config (see :meth:`build_tiny`)."""

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    templates = ("qwen2_vl",)
    projector = "visual.merger"
    description = FamilyDescription(
        grid="(grid_h/2)×(grid_w/2) merged grid from image_grid_thw",
        masked="grid cells by the 2-D rule; the vision start and end tokens stay visible",
        positions="3-D m-rope: the collator's position_ids columns",
    )
    per_image_keys = ("image_grid_thw",)
    tiny_models = (TinyModelSpec(name="qwen2_vl", family="qwen2_vl", template="qwen2_vl", vision_hidden_size=64),)

    def merge_size(self, config: Any) -> int:
        return int(getattr(config.vision_config, "spatial_merge_size", 2) or 2)

    def pixel_rows(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> int:
        return int(image_inputs["image_grid_thw"][0].prod())

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        time, height, width = (int(value) for value in image_inputs["image_grid_thw"][0])
        merge = self.merge_size(config)
        rows, cols = height // merge, width // merge
        if time != 1 or rows * cols != token_count:
            raise ImageLayoutError(
                f"{token_count} image tokens, but image_grid_thw ({time}, {height}, {width}) with merge {merge} gives "
                f"{time}×{rows}×{cols} = {time * rows * cols}"
            )
        return [TokenGrid(rows, cols, tuple(range(token_count)))]

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.model.visual.parameters())

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        stacked = stacked_pixel_values(samples, "image_grid_thw")
        if stacked is None:
            return None
        output = model.model.get_image_features(pixel_values=stacked[0], image_grid_thw=stacked[1])
        return ImageFeatures(torch.cat(list(output.pooler_output)))

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        """Generation during training: LLaMA-Factory 0.9.5 then builds the training collator without the model, so
        training batches carry no m-rope position_ids, which the AimKP step needs."""
        if is_true(setting("do_train")) and is_true(setting("predict_with_generate")):
            return [
                "predict_with_generate: true in a training run makes LLaMA-Factory build the training collator "
                "without the model, so the batches carry no m-rope positions. Train without predict_with_generate "
                "(evaluate by loss, or score checkpoints afterwards with recipes/predict_*.yaml)."
            ]
        return []

    def position_ids(self, sample: SampleInputs) -> torch.Tensor:
        positions = sample.model_inputs.get("position_ids")
        if positions is None:
            raise ValueError(
                f"aimkp: a {self.name} training batch came without position_ids (LLaMA-Factory's collator computes "
                "them with the model); the fast step needs the m-rope positions."
            )
        return positions

    def tiny_classes(self, spec: TinyModelSpec) -> tuple[type, type, dict[str, Any]]:
        """The config class, the model class and the vision config of a tiny model of this family."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = {
            "depth": spec.vision_layers,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,  # the merger projects into the LLM width
            "num_heads": 2,
            "mlp_ratio": 2,
        }
        return Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        ConfigClass, ModelClass, vision = self.tiny_classes(spec)  # noqa: N806 - classes
        tokenizer = qwen_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        head_dim = spec.hidden_size // spec.num_heads
        section = head_dim // 2 // 4  # mrope_section must sum to head_dim / 2
        text = {
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [head_dim // 2 - 2 * section, section, section],
            },
            "bos_token_id": vocab["<|endoftext|>"],
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        }
        config = ConfigClass(
            text_config=text,
            vision_config=vision,
            image_token_id=vocab["<|image_pad|>"],
            video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"],
            vision_end_token_id=vocab["<|vision_end|>"],
        )
        model = ModelClass(config)
        model.generation_config.pad_token_id = vocab["<|endoftext|>"]
        model.generation_config.eos_token_id = vocab["<|im_end|>"]
        # Small images stay small (LLaMA-Factory resizes them first, within image_min_pixels..image_max_pixels); the
        # high ceiling lets a run ask for the real 24x24 grid with image_min_pixels: 451584 (672 x 672).
        pixels = {"min_pixels": 56 * 56, "max_pixels": 672 * 672}
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixels),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**pixels),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
        save_tiny(out, model, processor, tokenizer, QWEN_CHAT_TEMPLATE)


class Qwen25VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    tiny_models = (TinyModelSpec(name="qwen2_5_vl", family="qwen2_5_vl", template="qwen2_vl", vision_hidden_size=64),)

    def tiny_classes(self, spec: TinyModelSpec) -> tuple[type, type, dict[str, Any]]:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = {
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_hidden_size * 2,
            "out_hidden_size": spec.hidden_size,
            "num_heads": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        }
        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision
