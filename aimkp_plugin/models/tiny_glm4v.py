"""The tiny GLM-4.1V (``glm4v``): a random-init ``Glm4vForConditionalGeneration`` that LLaMA-Factory trains offline
with template ``glm4v`` (or ``glm4_5v``).

- Tokenizer: the shared byte-level BPE trained on the bundled CMKP posts, with GLM-4V's special tokens (the chat
  roles ``<|user|>``/``<|assistant|>``/``<|system|>``/``<|observation|>``, the prefix ``[gMASK]<sop>``, the image and
  video tokens and their begin/end markers, ``<think>``/``</think>`` of the reasoning template and ``</answer>``,
  one of the template's stop words: the template adds none, so the vocabulary never grows). ``<|endoftext|>`` is
  the eos and pad token, as in GLM-4.1V.
- Language model: GLM-4's decoder (fused ``gate_up_proj``, extra post-attention and post-MLP norms), grouped-query
  attention, partial rotary (half of each head) with the 3-D m-rope sections ``[2, 1, 1]`` of the 4 rotary
  frequencies (GLM-4.1V: ``[8, 12, 12]`` of 32).
- Vision: patch 14, 2×2 spatial merge, temporal patch 2; a ``(image_size / patch)²`` learned position table
  interpolated to every image's grid; ``downsample`` (a 2×2 convolution) and ``merger`` project into the language
  width. The merger (the projector, LLaMA-Factory's ``visual.merger``) is re-drawn at random so that none of its
  weights is zero (its LayerNorm would start at weight 1 and bias 0), and so are the vision side's zero biases.
- Processor: ``Glm4vImageProcessor`` sizing by ``t·h·w`` pixels with ``t = 2``, between 112² (the real minimum: a
  64×64 picture becomes 84×84, a 3×3 merged grid) and 2·672² (a 672×672 picture keeps GLM's 24×24 merged grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import CLIP_MEAN, CLIP_STD, TinyModelSpec, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import Glm4vConfig


GLM4V_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
)
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif item['type'] == 'video' %}"
    "<|begin_of_video|><|video|><|end_of_video|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_MIN_PIXELS = 112 * 112  # t·h·w with t = 2: a 64×64 picture becomes 84×84 (3×3 merged tokens)
TINY_MAX_PIXELS = 2 * 672 * 672  # a 672×672 picture keeps GLM-4.1V's 24×24 merged grid


def glm4v_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(spec, GLM4V_SPECIAL_TOKENS, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_nonzero_(module: Any, std: float = 0.02) -> None:
    """Every parameter of ``module`` drawn again: norm weights around 1, everything else around 0 (std ``std``), so
    that no weight is zero."""
    import torch

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            parameter.normal_(mean=1.0 if is_norm_weight else 0.0, std=std)


def glm4v_config(spec: TinyModelSpec, tokenizer: Any) -> Glm4vConfig:
    """The tiny GLM-4.1V's config: text and vision config of ``spec``, token ids from ``tokenizer``."""
    from transformers import Glm4vConfig

    vocab = tokenizer.get_vocab()
    head_dim = spec.hidden_size // spec.num_heads  # 16; partial rotary 0.5 -> 8 rotary dims, 4 frequencies
    frequencies = head_dim // 4
    section = max(1, frequencies // 4)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": max(1, spec.num_heads // 2),
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [frequencies - 2 * section, section, section],  # t, h, w: sums to the frequencies
        },
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden_size,
        "num_heads": 2,
        "image_size": spec.image_size,  # the learned position table: (image_size / patch)² entries
        "patch_size": spec.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": spec.hidden_size,  # downsample and merger project into the language width
        "intermediate_size": spec.intermediate_size,
    }
    return Glm4vConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab["<|image|>"],
        video_token_id=vocab["<|video|>"],
        image_start_token_id=vocab["<|begin_of_image|>"],
        image_end_token_id=vocab["<|end_of_image|>"],
        video_start_token_id=vocab["<|begin_of_video|>"],
        video_end_token_id=vocab["<|end_of_video|>"],
        tie_word_embeddings=False,
    )


def build_glm4v(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny GLM-4.1V of ``spec`` to ``out`` (weights, config, tokenizer, processor, chat template)."""
    import torch
    from transformers import (
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    tokenizer = glm4v_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    config = glm4v_config(spec, tokenizer)
    model = Glm4vForConditionalGeneration(config)
    visual = model.model.visual
    random_nonzero_(visual.merger)
    with torch.no_grad():
        for name, parameter in visual.named_parameters():
            if name.endswith("bias") and not parameter.count_nonzero():
                parameter.normal_(std=0.02)
    if any(int(parameter.count_nonzero()) != parameter.numel() for parameter in visual.merger.parameters()):
        raise RuntimeError("the tiny GLM-4V projector has a zero weight")
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.generation_config.eos_token_id = [vocab["<|endoftext|>"], vocab["<|user|>"], vocab["<|observation|>"]]

    common = {"patch_size": spec.patch_size, "temporal_patch_size": 2, "merge_size": 2}
    common |= {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    size = {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **common),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(size=size, **common),
        chat_template=GLM4V_CHAT_TEMPLATE,
    )
    save_tiny(out, model, processor, tokenizer, GLM4V_CHAT_TEMPLATE)
