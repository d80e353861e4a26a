"""The parts every tiny-model builder shares: the spec that keys the build cache, a byte-level BPE tokenizer trained
locally on the bundled CMKP posts, and the chat templates of the tiny checkpoints.

The builders themselves live in the family modules (``aimkp_plugin.families``); ``aimkp_plugin.models.tiny`` builds
and caches them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from ..data.cmkp import DEFAULT_INSTRUCTION, bundled_cmkp_posts


BUILDER_VERSION = 2  # bump when a builder changes what it writes

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
    family: str  # the model_type of the family that builds it (aimkp_plugin.families)
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


def llava_tokenizer(spec: TinyModelSpec) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(spec.vocab_size, LLAVA_SPECIAL_TOKENS),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
        padding_side="right",
    )


def qwen_tokenizer(spec: TinyModelSpec) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(spec.vocab_size, QWEN_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="right",
    )
