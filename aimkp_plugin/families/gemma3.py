"""Gemma 3 (``gemma3``): a fixed square grid per image, and image tokens that attend to each other both ways.

- Grid: ``mm_tokens_per_image`` ``<image_soft_token>`` tokens per image (256 = 16×16: the vision tower's 64×64 patch
  grid average-pooled 4×4), one contiguous block between ``<start_of_image>`` and ``<end_of_image>``, which stay
  visible.
- Attention: Gemma 3 makes each image block bidirectional (its ``token_type_ids``), on top of causal attention, and
  its sliding-window layers see only the last ``sliding_window`` positions (an image block sees itself whole). A copy
  keeps exactly that pattern among the tokens it keeps: a hidden image token is seen by no token, also not by the
  image tokens before it. The model uses a 4-D mask it is given as it is for every layer, so both steps build one
  mask per layer type (full and sliding) themselves: the reference over the whole sequence with the hidden columns
  cleared, the fast step over the kept tokens with causality and the window counted in original positions.
- Fast step: vision tower and ``multi_modal_projector`` run once (``get_image_features``); 1-D positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import is_true
from ..method.fast_step import ImageFeatures
from ..method.masking import as_attention_mask, hide_positions
from ..method.types import SampleInputs, TokenGrid
from ..models.building import TinyModelSpec, fill_zero_weights, local_tokenizer, save_tiny
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily, attention_mask_dtype, stacked_pixel_values


# pad/eos/bos/unk get ids 0/1/2/3, as in the real Gemma tokenizer (and Gemma3TextConfig's defaults)
TINY_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
TINY_TOKENS_PER_IMAGE = 16  # 4 x 4 pooled grid
TINY_SLIDING_WINDOW = 512  # longer than any tiny sequence (gemma-3-1b uses 512, 4b+ use 1024)
# Gemma 3's own template, reduced: the processor expands <start_of_image> into the full image sequence
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def gemma3_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",  # LLaMA-Factory's gemma3 template (replace_eos) switches it to <end_of_turn>
        pad_token="<pad>",
        unk_token="<unk>",
        # Gemma3Processor reads tokenizer.{boi,eoi,image}_token and tokenizer.image_token_id
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def image_groups(is_image: torch.Tensor) -> torch.Tensor:
    """Per position of ``is_image`` (``(..., L)`` bool): the index of its run of image tokens, -1 for other tokens (as
    Gemma 3 and Gemma 4 number their image blocks)."""
    previous = torch.cat([torch.zeros_like(is_image[..., :1]), is_image[..., :-1]], dim=-1)
    groups = torch.cumsum((is_image & ~previous).long(), dim=-1) - 1
    return torch.where(is_image, groups, -1)


def gemma_allowed(
    positions: torch.Tensor, is_image: torch.Tensor | None, window: int | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, 1, L, L)`` bool, True = attend: causal in ``positions`` (within ``window`` when given) or the same image
    block (when ``is_image`` is given; Gemma 4's full-attention layers have none); keys outside ``valid`` are masked,
    and every query keeps its own key so no row is empty."""
    distance = positions[:, :, None] - positions[:, None, :]  # [row, query, key]
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    if is_image is not None:
        groups = image_groups(is_image)
        allowed |= (groups[:, :, None] == groups[:, None, :]) & (groups[:, :, None] >= 0)
    if valid is not None:
        allowed &= valid[:, None, :]
    allowed |= torch.eye(positions.shape[-1], dtype=torch.bool, device=positions.device)
    return allowed[:, None]


class Gemma3Family(LlavaStyleFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    templates = ("gemma3",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="mm_tokens_per_image square grid, 16×16 = 256 (4×4-pooled vision patches)",
        masked="grid cells by the 2-D rule; a hidden image token is invisible to the other image tokens both ways "
        "(the bidirectional image block is kept among the kept tokens); `<start_of_image>` and `<end_of_image>` "
        "stay visible",
        positions="1-D (0..L-1); causality and sliding windows counted in original positions",
    )
    per_token_keys = ("token_type_ids",)  # carried, not read: both steps take the image blocks from the spans
    custom_attention = True
    tiny_models = (
        # 64 px / patch 4 -> 16x16 patches, pooled 4x4 as in Gemma 3 -> a 4x4 grid of 16 image tokens
        TinyModelSpec(name="gemma3", family="gemma3", template="gemma3", image_size=64, patch_size=4),
    )

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        expected = int(config.mm_tokens_per_image)
        side = int(expected**0.5)
        if token_count != expected or side * side != expected:
            raise ImageLayoutError(
                f"{token_count} image tokens, but a Gemma 3 image has mm_tokens_per_image = {expected} tokens, "
                "which must form a square grid"
            )
        return [TokenGrid(side, side, tuple(range(token_count)))]

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        problems = []
        template = setting("template")
        if template not in self.templates:
            problems.append(
                f"template: {template} does not mark Gemma 3's image tokens (token_type_ids), so its image blocks "
                "would not be bidirectional as the model was trained. Set template: gemma3."
            )
        if is_true(setting("image_do_pan_and_scan")):
            problems.append(
                "image_do_pan_and_scan: true adds crops that LLaMA-Factory 0.9.5 cannot lay out for Gemma 3. Set "
                "image_do_pan_and_scan: false."
            )
        return problems

    def layer_masks(self, model: nn.Module, positions, is_image, valid, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One mask per layer type of the text model (``sliding_attention`` within the window)."""
        text = model.config.get_text_config()
        return {
            layer_type: as_attention_mask(
                gemma_allowed(
                    positions, is_image, text.sliding_window if layer_type == "sliding_attention" else None, valid
                ),
                dtype,
            )
            for layer_type in sorted(set(text.layer_types))
        }

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        input_ids = sample.model_inputs["input_ids"]
        is_image = torch.zeros_like(input_ids, dtype=torch.bool)
        is_image[0, sample.spans.image_positions] = True
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self.layer_masks(model, positions, is_image, None, torch.bool)
        return {
            layer_type: as_attention_mask(hide_positions(allowed, hidden), dtype)
            for layer_type, allowed in masks.items()
        }

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        stacked = stacked_pixel_values(samples)
        if stacked is None:
            return None
        features = model.model.get_image_features(pixel_values=stacked[0]).pooler_output
        return ImageFeatures(features.reshape(-1, features.shape[-1]))

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
        """The model with one mask per layer type over the kept tokens: image blocks are the runs of kept image tokens
        (``<start_of_image>`` / ``<end_of_image>`` are never hidden, so two images never touch)."""
        dtype = attention_mask_dtype(model, inputs_embeds.dtype)
        masks = self.layer_masks(model, position_ids, image_mask, attention_mask.bool(), dtype)
        return model(
            inputs_embeds=inputs_embeds,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_positions,
        ).logits

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3ImageProcessor,
            Gemma3Processor,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )

        tokenizer = gemma3_tokenizer(spec)
        vocab = tokenizer.get_vocab()
        head_dim = spec.hidden_size // spec.num_heads  # 16 (Gemma3TextConfig defaults to 256)
        text_config = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            max_position_embeddings=4096,
            sliding_window=TINY_SLIDING_WINDOW,
            # one local and one global layer (the real 5:1 pattern would make both of 2 layers sliding)
            layer_types=["sliding_attention", "full_attention"][: spec.num_layers]
            + ["full_attention"] * max(0, spec.num_layers - 2),
            pad_token_id=vocab["<pad>"],
            eos_token_id=vocab["<eos>"],
            bos_token_id=vocab["<bos>"],
            tie_word_embeddings=False,
        )
        patches = spec.image_size // spec.patch_size  # 16
        side = int(TINY_TOKENS_PER_IMAGE**0.5)  # 4
        if patches % side:
            raise ValueError(f"a {patches}x{patches} patch grid does not pool into {side}x{side} tokens")
        vision_config = SiglipVisionConfig(
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_hidden_size * 2,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=2,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            vision_use_head=False,  # as in Gemma 3's SigLIP: only last_hidden_state is used
        )
        config = Gemma3Config(
            text_config=text_config,
            vision_config=vision_config,
            mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
            boi_token_index=vocab["<start_of_image>"],
            eoi_token_index=vocab["<end_of_image>"],
            image_token_index=vocab["<image_soft_token>"],
            tie_word_embeddings=False,
        )
        model = Gemma3ForConditionalGeneration(config)
        fill_zero_weights(model.model.multi_modal_projector)
        model.generation_config.pad_token_id = vocab["<pad>"]
        model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
        image_processor = Gemma3ImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
        )
        processor = Gemma3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_length=TINY_TOKENS_PER_IMAGE,
            chat_template=TINY_CHAT_TEMPLATE,
        )
        save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
