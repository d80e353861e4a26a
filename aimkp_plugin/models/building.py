"""The parts every tiny-model builder shares: the spec that keys the build cache, a byte-level BPE tokenizer trained
locally on the bundled CMKP posts, and the chat templates of the tiny checkpoints.

The builders themselves live in ``tiny_<family>.py`` modules here (the shortest ones in their family's module); every
family's ``build_tiny`` calls its builder, and ``aimkp_plugin.models.tiny`` builds and caches them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.cmkp import DEFAULT_INSTRUCTION, bundled_cmkp_posts


BUILDER_VERSION = 4  # bump when a builder changes what it writes

LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """What a tiny model looks like; its hash keys the build cache."""

    name: str
    family: str  # the name of the family that builds it (aimkp_plugin.families)
    template: str  # the LLaMA-Factory template to train it with
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    image_size: int = 56  # the vision tower's square input (one tile) in pixels
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_layers: int = 1
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "builder_version": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenizer_corpus() -> list[str]:
    """Deterministic training text for the tokenizers: the bundled CMKP posts, answers and the instruction."""
    lines = [DEFAULT_INSTRUCTION, "A chat between a curious user and an artificial intelligence assistant."]
    for post in bundled_cmkp_posts():
        lines.append(post.text)
        lines.append(", ".join(post.keyphrases))
    return lines


def train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


def local_tokenizer(spec: TinyModelSpec, special_tokens: tuple[str, ...], **roles: Any) -> Any:
    """A fast tokenizer trained here on the bundled posts, with ``special_tokens`` and their ``roles``
    (``eos_token="..."``, ``extra_special_tokens={...}``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(spec.vocab_size, special_tokens),
        **roles,
        model_max_length=4096,
        padding_side="right",
    )


def llava_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(
        spec,
        LLAVA_SPECIAL_TOKENS,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def qwen_tokenizer(spec: TinyModelSpec) -> Any:
    return local_tokenizer(spec, QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def llama_text_config(spec: TinyModelSpec, tokenizer: Any, **extra: Any) -> Any:
    """The tiny Llama language model of the LLaVA-style checkpoints (``<s>``, ``</s>``, ``<pad>``)."""
    from transformers import LlamaConfig

    vocab = tokenizer.get_vocab()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=4096,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        **extra,
    )


def clip_vision_config(spec: TinyModelSpec) -> Any:
    """A tiny CLIP tower of one tile; LLaVA-style models read its second-to-last layer, so it has one layer more."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers + 1,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )


def fill_zero_weights(module: Any, std: float = 0.02) -> None:
    """Give every all-zero weight matrix of ``module`` random values (normal, ``std``): transformers initialises some
    projectors to zero (Gemma 3's ``mm_input_projection_weight``), which in a random tiny model makes every image
    feature 0, so that no test could see where image content lands."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, std)


def save_tiny(out: Path, model: Any, processor: Any, tokenizer: Any, chat_template: str) -> None:
    """Write a tiny checkpoint: weights and config, processor, and the tokenizer with its chat template."""
    tokenizer.chat_template = chat_template
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


def save_llava_style(
    out: Path, model: Any, tokenizer: Any, image_processor: Any, processor_class: type, patch_size: int, **extra: Any
) -> None:
    """Save a LLaVA-style checkpoint (LLaVA-1.5, LLaVA-NeXT): ``<pad>`` and ``</s>`` for generation, the processor
    with CLIP's extra CLS token and the default feature selection, and the LLaVA chat template."""
    vocab = tokenizer.get_vocab()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS; LLaMA-Factory's plugin subtracts it again for "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
        **extra,
    )
    save_tiny(out, model, processor, tokenizer, LLAVA_CHAT_TEMPLATE)
