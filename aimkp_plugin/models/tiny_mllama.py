"""The tiny offline Mllama (``mllama``, Llama 3.2 Vision): its image path through cross-attention at toy widths.

- Vision: ``MllamaVisionModel`` with one local and one global layer, tiles of ``image_size`` px cut into
  ``patch_size`` patches (28 / 7: a 4×4 patch grid plus the class token, 17 vision tokens per tile), up to
  ``TINY_MAX_TILES`` tiles per image, one intermediate layer concatenated to the output (``vision_output_dim`` twice
  the vision width), as the real model concatenates several.
- Text: ``MllamaTextModel`` with ``spec.num_layers`` layers, the middle one a cross-attention layer. The gates of the
  cross-attention layers and of the vision model's tile and position embeddings, which transformers initialises to
  0 (cross attention switched off), are set to ``TINY_GATE``, so that images reach the logits.
- Tokenizer: a byte-level BPE trained on the bundled posts, with Llama 3's special tokens for the ``mllama``
  template (``<|begin_of_text|>``, the header and ``<|eot_id|>`` tokens, ``<|python_tag|>``, which MllamaProcessor
  reads) and ``<|image|>``, one token per image.
- Processor: ``MllamaImageProcessor`` (tiles of ``image_size``, at most ``TINY_MAX_TILES``) and ``MllamaProcessor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .building import TinyModelSpec, fill_zero_weights, local_tokenizer, save_tiny


TINY_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
TINY_MAX_TILES = 4
TINY_GATE = 0.5
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def mllama_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )


def mllama_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    from transformers import MllamaConfig

    vocab = tokenizer.get_vocab()
    vision = {
        "hidden_size": spec.vision_hidden_size,
        "num_hidden_layers": spec.vision_layers,
        "num_global_layers": 1,
        "attention_heads": 2,
        "intermediate_size": spec.vision_hidden_size * 2,
        "vision_output_dim": spec.vision_hidden_size * 2,  # the last layer and one intermediate layer
        "intermediate_layers_indices": [0],
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "max_num_tiles": TINY_MAX_TILES,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads // 2,
        "cross_attention_layers": [spec.num_layers // 2],
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "bos_token_id": vocab["<|begin_of_text|>"],
        "eos_token_id": vocab["<|eot_id|>"],
        "pad_token_id": vocab["<|finetune_right_pad_id|>"],
    }
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<|image|>"])


def build_mllama(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny Mllama of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    import torch
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tokenizer = mllama_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    model = MllamaForConditionalGeneration(mllama_config(spec, tokenizer))
    fill_zero_weights(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate"):
                parameter.fill_(TINY_GATE)
    model.generation_config.pad_token_id = vocab["<|finetune_right_pad_id|>"]
    model.generation_config.eos_token_id = [vocab["<|eot_id|>"], vocab["<|eom_id|>"]]
    image_processor = MllamaImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}, max_image_tiles=TINY_MAX_TILES
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE)
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
