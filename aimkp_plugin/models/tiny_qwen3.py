"""Tiny Qwen3-generation checkpoints: Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 (hybrid linear attention).

All three share the Qwen3-VL vision tower (patch 16, 2×2 merge, a learned 12×12 position grid interpolated to any
image), the interleaved m-rope and ``Qwen3VLProcessor`` around ``Qwen2VLImageProcessor``; they differ in the language
model:

- Qwen3-VL: dense decoder layers, DeepStack features from vision block 0;
- Qwen3-VL-MoE: sparse MoE layers (4 experts, top 2, fused 3-D expert weights and a router), DeepStack as Qwen3-VL;
- Qwen3.5: Gated DeltaNet (linear attention with a causal convolution) layers followed by one full-attention layer,
  no DeepStack, rotary embedding on half of each head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .building import QWEN_CHAT_TEMPLATE, TinyModelSpec, qwen_tokenizer, save_tiny


TINY_MAX_PIXELS = 768 * 768  # 24 x 24 merged tokens (factor 32 = patch 16 * merge 2), as LLaVA-1.5's grid
TINY_MIN_PIXELS = 64 * 64  # 2 x 2 merged tokens: small images stay small


def qwen3_text_config(spec: TinyModelSpec, vocab: dict[str, int], size: int, rotary_dim: int) -> dict[str, Any]:
    """The language model's config: ``rotary_dim`` of each head rotates, split into interleaved T/H/W sections."""
    half = rotary_dim // 2
    section = max(1, half // 4)
    return {
        "vocab_size": size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            # interleaved T/H/W frequencies ([THWTHW..TT]); the sections sum to rotary_dim / 2
            "mrope_section": [half - 2 * section, section, section],
            "mrope_interleaved": True,
        },
        "pad_token_id": vocab["<|endoftext|>"],
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
    }


def qwen3_vision_config(spec: TinyModelSpec, **extra: Any) -> dict[str, Any]:
    return {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_hidden_size * 2,
        "num_heads": 2,
        "patch_size": spec.patch_size,  # 16
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": spec.hidden_size,  # the merger projects into the LLM width
        "num_position_embeddings": 144,  # a 12 x 12 learned grid, bilinearly interpolated to any image grid
        **extra,
    }


def special_token_ids(vocab: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": vocab["<|image_pad|>"],
        "video_token_id": vocab["<|video_pad|>"],
        "vision_start_token_id": vocab["<|vision_start|>"],
        "vision_end_token_id": vocab["<|vision_end|>"],
    }


def save_qwen3(out: Path, model: Any, tokenizer: Any, spec: TinyModelSpec) -> None:
    """Save a Qwen3-generation checkpoint with ``Qwen3VLProcessor`` (small images stay small) and the Qwen chat
    template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    vocab = tokenizer.get_vocab()
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


def build_qwen3_vl(spec: TinyModelSpec, out: Path) -> None:
    """Qwen3-VL: dense layers, DeepStack from vision block 0."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = qwen_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    config = Qwen3VLConfig(
        text_config=qwen3_text_config(spec, vocab, len(tokenizer), spec.hidden_size // spec.num_heads),
        vision_config=qwen3_vision_config(spec, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False,
        **special_token_ids(vocab),
    )
    save_qwen3(out, Qwen3VLForConditionalGeneration(config), tokenizer, spec)


def build_qwen3_vl_moe(spec: TinyModelSpec, out: Path) -> None:
    """Qwen3-VL-MoE: every decoder layer a sparse MoE block of 4 experts (top 2), DeepStack from vision block 0."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    tokenizer = qwen_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    text = qwen3_text_config(spec, vocab, len(tokenizer), spec.hidden_size // spec.num_heads)
    text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": spec.intermediate_size // 2}
    text["tie_word_embeddings"] = False  # the text config's own default is True; lm_head stays its own
    config = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=qwen3_vision_config(spec, deepstack_visual_indexes=[0]),
        tie_word_embeddings=False,
        **special_token_ids(vocab),
    )
    model = Qwen3VLMoeForConditionalGeneration(config)
    randomize_routers(model)
    save_qwen3(out, model, tokenizer, spec)


def build_qwen3_5(spec: TinyModelSpec, out: Path) -> None:
    """Qwen3.5: ``num_layers - 1`` Gated DeltaNet layers, then one full-attention layer; half of each head rotates."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    tokenizer = qwen_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    head_dim = spec.hidden_size // spec.num_heads
    text = qwen3_text_config(spec, vocab, len(tokenizer), head_dim // 2)
    text["rope_parameters"]["partial_rotary_factor"] = 0.5
    text |= {
        "num_key_value_heads": max(1, spec.num_heads // 2),
        "layer_types": ["linear_attention"] * (spec.num_layers - 1) + ["full_attention"],
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": head_dim // 2,
        "linear_value_head_dim": head_dim // 2,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
    }
    config = Qwen3_5Config(
        text_config=text,
        vision_config=qwen3_vision_config(spec),
        tie_word_embeddings=False,
        **special_token_ids(vocab),
    )
    save_qwen3(out, Qwen3_5ForConditionalGeneration(config), tokenizer, spec)


def randomize_routers(model: Any) -> None:
    """MoE routers start at zero in transformers (every expert scores the same, and top-k picks by index); give them
    random weights, so that different tokens take different experts."""
    import torch

    for name, parameter in model.named_parameters():
        if name.endswith("mlp.gate.weight") and parameter.dim() == 2:
            with torch.no_grad():
                parameter.normal_(0.0, 0.5)
