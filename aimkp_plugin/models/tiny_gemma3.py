"""The tiny offline Gemma 3 (``gemma3``): Gemma 3's image path and attention pattern at toy widths.

- Vision: a one-layer SigLIP tower without its pooling head (patch 4 on 64×64 px: 16×16 patches) whose patch grid
  ``multi_modal_projector`` average-pools 4×4 into a 4×4 grid of ``TINY_TOKENS_PER_IMAGE`` = 16 image tokens. The
  projector's ``mm_input_projection_weight``, which transformers initialises to zero, is drawn at random.
- Text: Gemma 3's decoder with one sliding-window layer (window ``TINY_SLIDING_WINDOW``, longer than any tiny
  sequence) and one full-attention layer, hidden 64, head size 16.
- Tokenizer: a byte-level BPE trained on the bundled posts, with Gemma 3's special tokens (``<pad>``, ``<eos>``,
  ``<bos>``, ``<unk>`` at ids 0–3, ``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``, ``<end_of_image>``,
  ``<image_soft_token>``), so LLaMA-Factory's ``gemma3`` template adds none.
- Processor: ``Gemma3ImageProcessor`` resizing to the tower's square input, without pan and scan, and a reduced
  Gemma 3 chat template.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import TinyModelSpec, fill_zero_weights, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import Gemma3Config


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


def gemma3_config(spec: TinyModelSpec, tokenizer: Any) -> Gemma3Config:
    """The tiny Gemma 3's config: text and vision config of ``spec``, token ids from ``tokenizer``."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

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
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
        tie_word_embeddings=False,
    )


def build_gemma3(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny Gemma 3 of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = gemma3_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    config = gemma3_config(spec, tokenizer)
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
