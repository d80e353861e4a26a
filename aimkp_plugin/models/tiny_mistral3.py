"""The tiny Mistral 3 (``mistral3``) and Pixtral (``pixtral``): random-init checkpoints with a Pixtral vision tower
that LLaMA-Factory trains offline with templates ``mistral_small`` (or ``ministral3``) and ``pixtral``.

- Tokenizer: the shared byte-level BPE trained on the bundled CMKP posts, with Mistral's control tokens (``<s>``,
  ``</s>``, ``[INST]``/``[/INST]``, ``[SYSTEM_PROMPT]``/``[/SYSTEM_PROMPT]``, ``<pad>``) and the image tokens
  ``[IMG]``, ``[IMG_BREAK]`` and ``[IMG_END]``, all special (so that the post text after ``[IMG_END]`` is
  tokenized on its own, as with the real tokenizer).
- Vision: a ``PixtralVisionModel`` (2-D rope over each image's patch grid, block-diagonal attention between images)
  of one layer; its ``image_size`` is the longest edge, which sizes the rope's grid.
- ``mistral3``: ``Mistral3ForConditionalGeneration`` with patch 8 and a 2×2 patch merger; the language model is
  Ministral-3's (``ministral3``: YaRN rope and queries scaled by ``1 + β·log(1 + ⌊position / 64⌋)``, so that the
  scale varies within a tiny sequence; the real models use 16384).
- ``pixtral``: ``LlavaForConditionalGeneration`` (``model_type: llava``, as Pixtral-12B) with patch 16, no merger,
  the full feature selection and a Mistral language model.
- Processor: ``PixtralProcessor`` around a ``PixtralImageProcessor`` with the spec's longest edge and patch size,
  CLIP's mean and std, as LLaMA-Factory's ``PixtralPlugin`` reads it (``patch_size``, ``spatial_merge_size``,
  ``image_break_token``, ``image_end_token``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .building import CLIP_MEAN, CLIP_STD, TinyModelSpec, fill_zero_weights, local_tokenizer, save_tiny


MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
SCALING_WINDOW = 64  # Ministral-3's original_max_position_embeddings, shrunk so that the query scale moves


def mistral_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec, MISTRAL_SPECIAL_TOKENS, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def text_config_values(spec: TinyModelSpec, tokenizer: Any) -> dict[str, Any]:
    """What the tiny Mistral and Ministral-3 language models share: widths, grouped-query heads, no sliding window."""
    vocab = tokenizer.get_vocab()
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads // 2,
        "head_dim": spec.hidden_size // spec.num_heads,
        "max_position_embeddings": 4096,
        "sliding_window": None,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        "pad_token_id": vocab["<pad>"],
        "tie_word_embeddings": False,
    }


def pixtral_vision_config(spec: TinyModelSpec) -> Any:
    from transformers import PixtralVisionConfig

    return PixtralVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="silu",
    )


def save_pixtral_style(out: Path, model: Any, tokenizer: Any, spec: TinyModelSpec, merge: int) -> None:
    """Save a model with the Pixtral processor (longest edge and patch of ``spec``, patch merger ``merge``)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    fill_zero_weights(model.model.multi_modal_projector)
    vocab = tokenizer.get_vocab()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    image_processor = PixtralImageProcessor(
        size={"longest_edge": spec.image_size},
        patch_size={"height": spec.patch_size, "width": spec.patch_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        spatial_merge_size=merge,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    save_tiny(out, model, processor, tokenizer, MISTRAL_CHAT_TEMPLATE)


def build_tiny_mistral3(spec: TinyModelSpec, out: Path) -> None:
    """Write a tiny random Mistral 3 with Ministral-3's language model (weights, config, processor, tokenizer)."""
    from transformers import Ministral3Config, Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = mistral_tokenizer(spec)
    rope = {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4096 / SCALING_WINDOW,  # max_position_embeddings over the original window, as 262144 / 16384
        "original_max_position_embeddings": SCALING_WINDOW,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    }
    config = Mistral3Config(
        text_config=Ministral3Config(**text_config_values(spec, tokenizer), rope_parameters=rope),
        vision_config=pixtral_vision_config(spec),
        image_token_index=tokenizer.get_vocab()["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    save_pixtral_style(out, Mistral3ForConditionalGeneration(config), tokenizer, spec, merge=2)


def build_tiny_pixtral(spec: TinyModelSpec, out: Path) -> None:
    """Write a tiny random Pixtral (a LLaVA with a Pixtral tower and a Mistral language model)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    tokenizer = mistral_tokenizer(spec)
    config = LlavaConfig(
        text_config=MistralConfig(**text_config_values(spec, tokenizer)),
        vision_config=pixtral_vision_config(spec),
        image_token_index=tokenizer.get_vocab()["[IMG]"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    save_pixtral_style(out, LlavaForConditionalGeneration(config), tokenizer, spec, merge=1)
