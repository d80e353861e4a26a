"""The tiny offline PaliGemma (``paligemma``): PaliGemma 2's image path and attention pattern at toy widths.

- Vision: a one-layer SigLIP tower without its pooling head (patch 14 on 56×56 px: a 4×4 patch grid, 16 image
  tokens, as PaliGemma's 224 px / patch 14 give 16×16 = 256), projected by ``multi_modal_projector`` (one Linear
  layer) to the text width.
- Text: Gemma 2's decoder (PaliGemma 2) with one sliding-window layer (window ``TINY_SLIDING_WINDOW``, longer than
  any tiny sequence) and one full-attention layer, hidden 64, head size 16; untied ``lm_head``.
- Tokenizer: a byte-level BPE trained on the bundled posts, with Gemma's special tokens (``<pad>``, ``<eos>``,
  ``<bos>``, ``<unk>`` at ids 0–3), ``<image>``, and ``<start_of_turn>`` / ``<end_of_turn>`` for the
  ``paligemma_chat`` template; ``PaliGemmaProcessor`` adds PaliGemma's 1024 ``<locXXXX>`` and 128 ``<segXXX>``
  tokens, as in the real tokenizer.
- Processor: ``SiglipImageProcessor`` resizing to the tower's square input (mean and std 0.5), with
  ``image_seq_length`` (LLaMA-Factory's ``paligemma`` plugin puts that many ``<image>`` tokens before ``<bos>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .building import TinyModelSpec, local_tokenizer, save_tiny


if TYPE_CHECKING:
    from transformers import PaliGemmaConfig


TINY_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>", "<start_of_turn>", "<end_of_turn>")
TINY_SLIDING_WINDOW = 512  # longer than any tiny sequence (PaliGemma 2 uses 4096)
# PaliGemma's prompt layout: the processor (and LLaMA-Factory's plugin) puts the image tokens before <bos>
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %}\n{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def paligemma_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        TINY_SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",  # LLaMA-Factory's paligemma_chat template (replace_eos) switches it to <end_of_turn>
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},  # PaliGemmaProcessor reads tokenizer.image_token(_id)
    )


def paligemma_config(spec: TinyModelSpec, tokenizer: Any) -> PaliGemmaConfig:
    """The tiny PaliGemma 2's config: text and vision config of ``spec``, token ids from ``tokenizer`` (with the
    processor's added tokens)."""
    from transformers import Gemma2Config, PaliGemmaConfig, SiglipVisionConfig

    vocab = tokenizer.get_vocab()
    head_dim = spec.hidden_size // spec.num_heads  # 16 (Gemma2Config defaults to 256)
    text_config = Gemma2Config(
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
        layer_types=["sliding_attention", "full_attention"][: spec.num_layers]
        + ["full_attention"] * max(0, spec.num_layers - 2),
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
        tie_word_embeddings=False,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,  # as in PaliGemma's SigLIP: only last_hidden_state is used
    )
    return PaliGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=vocab["<image>"],
        vocab_size=len(tokenizer),
        projection_dim=spec.hidden_size,
        hidden_size=spec.hidden_size,
        tie_word_embeddings=False,
    )


def build_paligemma(spec: TinyModelSpec, out: Path) -> None:
    """Write the tiny PaliGemma of ``spec`` (weights, config, tokenizer, processor, chat template) into ``out``."""
    from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    tokenizer = paligemma_tokenizer(spec)
    grid = spec.image_size // spec.patch_size
    image_processor = SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        image_seq_length=grid * grid,
    )
    # the processor adds PaliGemma's <loc>/<seg> tokens to the tokenizer: the model's vocabulary counts them
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE
    )
    vocab = tokenizer.get_vocab()
    model = PaliGemmaForConditionalGeneration(paligemma_config(spec, tokenizer))
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = [vocab["<eos>"], vocab["<end_of_turn>"]]
    save_tiny(out, model, processor, tokenizer, TINY_CHAT_TEMPLATE)
