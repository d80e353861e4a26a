"""The tiny offline LFM2-VL (``lfm2_vl``): a transformers-native LFM2-VL at toy widths.

- Vision: a one-layer SigLIP2 NaFlex tower (patch 8, a learned 4×4 position grid interpolated to each image's patch
  grid); the projector's pixel unshuffle (``downsample_factor`` 2) turns each 2×2 block of patches into one token, so
  an image of H×W pixels (both multiples of 16 after the processor's resize) gives an (H/16)×(W/16) token grid: the
  64 px demo pictures 4×4 = 16 tokens, the wide 224×96 pictures 5×12 = 60 (resized within ``max_image_tokens`` 64).
- Text: an LFM2 decoder of three layers, short convolution, full attention, short convolution (the real checkpoints
  interleave them the same way), hidden 32, untied ``lm_head``.
- Tokenizer: a byte-level BPE trained on the bundled posts, with LFM2-VL's special tokens (``<|im_start|>``,
  ``<|im_end|>``, ``<image>``, ``<|image_start|>``, ``<|image_end|>``, ``<|img_thumbnail|>``); ``<|im_end|>`` is the
  eos token and ``<|pad|>`` the pad token.
- Processor: ``Lfm2VlImageProcessor`` without tiling (``do_image_splitting: false``): LLaMA-Factory's ``lfm2_vl``
  plugin writes one image's tokens from its first ``spatial_shapes`` row, which a tiled image does not fit (see
  :mod:`aimkp_plugin.families.lfm2_vl`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .building import TinyModelSpec, local_tokenizer, save_tiny


TINY_SPECIAL_TOKENS = (
    "<|pad|>",
    "<|startoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<|image_start|>",
    "<|image_end|>",
    "<|img_thumbnail|>",
)
TINY_LAYER_TYPES = ("conv", "full_attention", "conv")
TINY_MIN_IMAGE_TOKENS = 4  # 2 x 2 tokens: small images stay small
TINY_MAX_IMAGE_TOKENS = 64  # the wide 224 x 96 pictures: 5 x 12 tokens
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def lfm2_vl_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_lfm2_vl(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny LFM2-VL of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    from transformers import (
        Lfm2Config,
        Lfm2VlConfig,
        Lfm2VlForConditionalGeneration,
        Lfm2VlImageProcessor,
        Lfm2VlProcessor,
        Siglip2VisionConfig,
    )

    tokenizer = lfm2_vl_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    text_config = Lfm2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        block_auto_adjust_ff_dim=False,  # keep intermediate_size as given
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=4096,
        layer_types=list(TINY_LAYER_TYPES[: spec.num_layers]),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|pad|>"],
        tie_word_embeddings=False,
    )
    vision_config = Siglip2VisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        patch_size=spec.patch_size,
        num_patches=16,  # a 4 x 4 learned position grid, interpolated to each image's patch grid
        vision_use_head=False,  # as the real checkpoints: LFM2-VL reads the last hidden state, not a pooled head
    )
    config = Lfm2VlConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=vocab["<image>"],
        projector_hidden_size=spec.hidden_size,
        downsample_factor=2,
        tie_word_embeddings=False,
    )
    model = Lfm2VlForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<|pad|>"]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    image_processor = Lfm2VlImageProcessor(
        encoder_patch_size=spec.patch_size,
        downsample_factor=2,
        min_image_tokens=TINY_MIN_IMAGE_TOKENS,
        max_image_tokens=TINY_MAX_IMAGE_TOKENS,
        do_image_splitting=False,
    )
    processor = Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
