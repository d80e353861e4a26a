"""The tiny offline InternVL (``internvl``, ``internvl-448``): a transformers-native "-hf" InternVL at toy widths.

- Vision: a one-layer InternVL vision tower (patch 14, mean pooling) on square tiles of ``spec.image_size`` px; the
  pixel shuffle (``downsample_ratio`` 0.5) and ``multi_modal_projector`` turn a tile's patch grid into a square grid
  of ``image_seq_length`` tokens: 8×8 patches → 4×4 = 16 tokens at 112 px, 32×32 patches → 16×16 = 256 tokens at
  448 px (InternVL's own tile size).
- Text: a Qwen2 decoder, two layers, hidden 64.
- Tokenizer: a byte-level BPE trained on the bundled posts, with InternVL's special tokens (``<|im_start|>``,
  ``<|im_end|>``, ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``); ``<|im_end|>`` is the eos token and
  ``<|endoftext|>`` the pad token.
- Processor: ``GotOcr2ImageProcessor`` with dynamic tiling on by default (up to ``TINY_MAX_TILES`` tiles, plus a
  thumbnail whenever there is more than one), ImageNet mean and std, ``InternVLVideoProcessor`` and a reduced
  InternVL chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import TinyModelSpec, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import InternVLConfig


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


def internvl_config(spec: TinyModelSpec, tokenizer: Any) -> InternVLConfig:
    """The tiny InternVL's config: text and vision config of ``spec``, token ids from ``tokenizer``."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

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
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=vocab["<IMG_CONTEXT>"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_internvl(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny InternVL of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = internvl_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    config = internvl_config(spec, tokenizer)
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
    image_processor = GotOcr2ImageProcessor(crop_to_patches=True, min_patches=1, max_patches=TINY_MAX_TILES, **pixels)
    video_processor = InternVLVideoProcessor(**pixels)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=config.image_seq_length,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
