"""The tiny offline Gemma 4 (``gemma4``): Gemma 4's image path and attention pattern at toy widths.

- Vision: a one-layer Gemma 4 vision encoder (patch 4, hidden 32) whose patch grid is average-pooled 3×3; the image
  processor resizes each picture, keeping its aspect ratio, to at most ``TINY_MAX_SOFT_TOKENS × 9`` patches with sides
  divisible by 12 px, so a square picture gives 96×96 px → 24×24 patches → an 8×8 grid of 64 image tokens, and a
  224×96 (width × height) picture 144×60 px → 36×15 patches → 5 rows × 12 columns of tokens. ``embed_vision`` (the
  projector: a scale-free RMS norm and one Linear layer) and the patch-position table are drawn at random, every
  weight at least 0.02 away from zero.
- Text: two decoder layers (one sliding-window, one full-attention), hidden 64, final logits soft-capped at 30, image
  blocks bidirectional in the sliding layer (``use_bidirectional_attention: vision``) and keys equal to values in the
  full layer (``attention_k_eq_v``), as in the larger Gemma 4 checkpoints; no per-layer embeddings and no KV sharing.
- Tokenizer: a byte-level BPE trained on the bundled posts, with Gemma 4's special tokens (``<|turn>``, ``<turn|>``,
  ``<|image>``, ``<|image|>``, ``<image|>``, ...), so LLaMA-Factory's ``gemma4`` template adds none.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import TinyModelSpec, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import Gemma4Config


# pad/eos/bos/unk get ids 0/1/2/3, as in the real Gemma tokenizer (and Gemma4TextConfig's defaults)
TINY_SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
    "<|image>",
    "<|image|>",
    "<image|>",
    "<|video|>",
    "<|audio>",
    "<|audio|>",
    "<audio|>",
)
TINY_POOLING = 3  # Gemma 4's 3×3 average pooling of the patch grid
TINY_MAX_SOFT_TOKENS = 70  # the smallest budget Gemma4ImageProcessor accepts (70, 140, 280, 560, 1120)
TINY_SLIDING_WINDOW = 512  # longer than any tiny sequence (the real checkpoints use 512 or 1024)
# Gemma 4's own template, reduced: the processor expands <|image|> into <|image> + soft tokens + <image|>
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}<|turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def gemma4_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",  # LLaMA-Factory's gemma4 template (replace_eos) switches it to <turn|>
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        # Gemma4Processor reads tokenizer.{boi,eoi,image}_token (and the audio ones when present)
        extra_special_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "video_token": "<|video|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
    )


def gemma4_text_config(spec: TinyModelSpec, tokenizer: Any) -> dict[str, Any]:
    """The language model's config: ``num_layers - 1`` sliding-window layers, then one full-attention layer; token
    ids from ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    head_dim = spec.hidden_size // spec.num_heads  # 16 (Gemma4TextConfig defaults to 256, and 512 for global)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "head_dim": head_dim,
        "global_head_dim": head_dim,
        "num_global_key_value_heads": spec.num_heads // 2,
        "attention_k_eq_v": True,
        "max_position_embeddings": 4096,
        "sliding_window": TINY_SLIDING_WINDOW,
        # one local and one global layer (the real 5:1 pattern would make the first of 2 layers sliding anyway)
        "layer_types": ["sliding_attention"] * (spec.num_layers - 1) + ["full_attention"],
        "use_bidirectional_attention": "vision",
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,  # no per-layer embeddings (as the 31B and 26B-A4B checkpoints)
        "vocab_size_per_layer_input": len(tokenizer),
        "num_kv_shared_layers": 0,
        "pad_token_id": vocab["<pad>"],
        "eos_token_id": vocab["<eos>"],
        "bos_token_id": vocab["<bos>"],
        "tie_word_embeddings": False,
    }


def gemma4_config(spec: TinyModelSpec, tokenizer: Any) -> Gemma4Config:
    """The tiny Gemma 4's config: text and vision config of ``spec``, no audio, token ids from ``tokenizer``."""
    from transformers import Gemma4Config

    text_config = gemma4_text_config(spec, tokenizer)
    vocab = tokenizer.get_vocab()
    vision_config = {
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_hidden_size * 2,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": spec.vision_hidden_size // 2,
        "patch_size": spec.patch_size,
        "pooling_kernel_size": TINY_POOLING,
        # one learned row per patch coordinate: the longest side has at most max_soft_tokens * pooling patches
        "position_embedding_size": TINY_MAX_SOFT_TOKENS * TINY_POOLING + 46,
    }
    return Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=None,
        image_token_id=vocab["<|image|>"],
        boi_token_id=vocab["<|image>"],
        eoi_token_id=vocab["<image|>"],
        video_token_id=vocab["<|video|>"],
        audio_token_id=vocab["<|audio|>"],
        boa_token_id=vocab["<|audio>"],
        eoa_token_index=vocab["<audio|>"],
        tie_word_embeddings=False,
    )


def build_gemma4(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny Gemma 4 of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    import torch
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    tokenizer = gemma4_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    config = gemma4_config(spec, tokenizer)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():  # a random projector (and random patch positions), every weight away from zero
        for parameter in (
            *model.model.embed_vision.parameters(),
            model.model.vision_tower.patch_embedder.position_embedding_table,
        ):
            sign = torch.where(torch.rand(parameter.shape) < 0.5, -1.0, 1.0)
            parameter.copy_(sign * (0.02 + 0.1 * torch.rand(parameter.shape)))
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<turn|>"]]
    common = {
        "patch_size": spec.patch_size,
        "pooling_kernel_size": TINY_POOLING,
        "max_soft_tokens": TINY_MAX_SOFT_TOKENS,
    }
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(**common),
        chat_template=TINY_CHAT_TEMPLATE,
        image_seq_length=TINY_MAX_SOFT_TOKENS,
    )
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
