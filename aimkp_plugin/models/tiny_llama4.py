"""The tiny offline Llama 4 (``llama4``): ``Llama4ForConditionalGeneration`` at toy widths, every text-model trait of
Scout and Maverick kept.

- Vision: a one-layer Llama 4 vision encoder on square tiles of ``spec.image_size`` px (32) with patch 4: 8×8 patches
  plus a CLS token; the pixel-shuffle MLP (ratio 0.5) turns a tile into a 4×4 grid of 16 features, and
  ``multi_modal_projector`` maps them into the text width.
- Tiling: ``Llama4ImageProcessor`` with up to ``TINY_MAX_TILES`` tiles of 32 px; a 64×64 picture becomes 2×2 tiles plus
  the global view (the whole picture resized to one tile), a 224×96 one 1×3 tiles plus the global view.
- Text: two decoder layers, hidden 64, 4 heads of 16 (2 key-value heads). Layer 0 is a chunked-attention RoPE layer
  with QK-norm (``attention_chunk_size`` ``TINY_CHUNK``, shorter than every sample, so that chunk borders fall inside
  images and texts) and a dense MLP; layer 1 is a NoPE global layer with attention temperature tuning and a sparse MoE
  block (4 experts, top 1, sigmoid router, a shared expert), as Scout's and Maverick's layers.
- Tokenizer: a byte-level BPE trained on the bundled posts with Llama 4's special tokens (``<|begin_of_text|>``,
  ``<|header_start|>``, ``<|eot|>``, ``<|image_start|>``, ``<|image|>``, ``<|patch|>``, the tile separators, ...);
  ``<|eot|>`` is the eos token, ``<|finetune_right_pad|>`` the pad token; a reduced Llama 4 chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import TinyModelSpec, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import Llama4Config


TINY_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eot|>",
    "<|eom|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image|>",
    "<|patch|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
)
TINY_MAX_TILES = 4  # tiles of the canvas; the global view is added whenever there are more than one
TINY_CHUNK = 32  # attention_chunk_size of the chunked layers (Scout and Maverick: 8192)
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}<|header_end|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


def llama4_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
    )


def llama4_config(spec: TinyModelSpec, tokenizer: Any) -> Llama4Config:
    """The tiny Llama 4's config: the text and vision config of ``spec``, token ids from ``tokenizer``."""
    from transformers import Llama4Config, Llama4TextConfig, Llama4VisionConfig

    vocab = tokenizer.get_vocab()
    text_config = Llama4TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size // 2,  # each expert's width
        intermediate_size_mlp=spec.intermediate_size,  # the dense layers' MLP
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads // 2,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        no_rope_layers=[1, 0],  # layer 0: RoPE, chunked; layer 1: NoPE, global (its layer type follows)
        attention_chunk_size=TINY_CHUNK,
        attn_temperature_tuning=True,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,  # moe_layers = [1]: layer 0 dense, layer 1 sparse (as Maverick interleaves)
        use_qk_norm=True,
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=vocab["<|eot|>"],
        pad_token_id=vocab["<|finetune_right_pad|>"],
        tie_word_embeddings=False,
    )
    shuffled = spec.vision_hidden_size * 4  # the pixel shuffle (ratio 0.5) stacks 2×2 patches' features
    vision_config = Llama4VisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        intermediate_size=shuffled,  # also the pixel-shuffle MLP's input width
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        pixel_shuffle_ratio=0.5,
        projector_input_dim=spec.hidden_size,
        projector_output_dim=spec.hidden_size,
        vision_output_dim=spec.hidden_size,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return Llama4Config(
        text_config=text_config,
        vision_config=vision_config,
        boi_token_index=vocab["<|image_start|>"],
        eoi_token_index=vocab["<|image_end|>"],
        image_token_index=vocab["<|patch|>"],  # the features replace <|patch|>; <|image|> only marks the global view
        tie_word_embeddings=False,
    )


def build_llama4(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny Llama 4 of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    from transformers import Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    tokenizer = llama4_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    model = Llama4ForConditionalGeneration(llama4_config(spec, tokenizer))
    model.generation_config.pad_token_id = vocab["<|finetune_right_pad|>"]
    model.generation_config.eos_token_id = [vocab["<|eot|>"], vocab["<|eom|>"]]
    # pixels rescaled to [0, 1], not normalised: with both on, Llama 4's image processor computes in bfloat16 (for
    # the bfloat16 checkpoints), which the float32 tiny model cannot take
    image_processor = Llama4ImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}, max_patches=TINY_MAX_TILES, do_normalize=False
    )
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        pixel_shuffle_ratio=0.5,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
