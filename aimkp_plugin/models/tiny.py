"""Tiny, random-init multimodal models that LLaMA-Factory loads offline.

Each builder writes a complete model folder (weights, config, tokenizer trained locally with ``tokenizers``,
processor and chat template) with ``save_pretrained``, so ``llamafactory-cli`` loads it with ``HF_HUB_OFFLINE=1``.
Builds are deterministic (fixed seeds, a fixed training corpus) and cached: a folder whose ``aimkp_build.json``
matches the requested spec is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.cmkp import DEFAULT_INSTRUCTION, bundled_cmkp_posts


BUILD_MARKER = "aimkp_build.json"
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
    family: str  # "llava" | "qwen2_vl" | "qwen2_5_vl"
    template: str  # the LLaMA-Factory template to train it with
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    image_size: int = 56  # LLaVA: square input side in pixels
    patch_size: int = 14
    vision_hidden_size: int = 32
    vision_layers: int = 1
    seed: int = 0

    def fingerprint(self) -> str:
        payload = json.dumps({**asdict(self), "builder_version": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


TINY_MODELS: dict[str, TinyModelSpec] = {
    spec.name: spec
    for spec in (
        # 56 px / patch 14 -> a 4x4 grid of 16 image tokens.
        TinyModelSpec(name="llava", family="llava", template="llava"),
        # 336 px / patch 14 -> the real LLaVA-1.5 24x24 grid (576 image tokens); small everywhere else.
        TinyModelSpec(name="llava-576", family="llava", template="llava", image_size=336),
        TinyModelSpec(name="qwen2vl", family="qwen2_vl", template="qwen2_vl", vision_hidden_size=64),
        TinyModelSpec(name="qwen2_5vl", family="qwen2_5_vl", template="qwen2_vl", vision_hidden_size=64),
    )
}


def tokenizer_corpus() -> list[str]:
    """Deterministic training text for the tokenizers: the bundled CMKP posts, answers and the instruction."""
    lines = [DEFAULT_INSTRUCTION, "A chat between a curious user and an artificial intelligence assistant."]
    for post in bundled_cmkp_posts():
        lines.append(post.text)
        lines.append(", ".join(post.keyphrases))
    return lines


def _train_tokenizer(vocab_size: int, special_tokens: tuple[str, ...]) -> Any:
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


def _llava_tokenizer(spec: TinyModelSpec) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec.vocab_size, LLAVA_SPECIAL_TOKENS),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
        padding_side="right",
    )


def _qwen_tokenizer(spec: TinyModelSpec) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(spec.vocab_size, QWEN_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="right",
    )


def _build_llava(spec: TinyModelSpec, out: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    text_config = LlamaConfig(
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
    )
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_hidden_size * 2,
        num_hidden_layers=spec.vision_layers + 1,  # LLaVA reads the second-to-last layer
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    grid = spec.image_size // spec.patch_size
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=vocab["<image>"],
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_qwen_vl(spec: TinyModelSpec, out: Path) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    if spec.family == "qwen2_vl":
        from transformers import Qwen2VLConfig as ConfigClass
        from transformers import Qwen2VLForConditionalGeneration as ModelClass

        vision = {
            "depth": spec.vision_layers,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,  # the merger projects into the LLM width
            "num_heads": 2,
            "mlp_ratio": 2,
        }
    else:
        from transformers import Qwen2_5_VLConfig as ConfigClass
        from transformers import Qwen2_5_VLForConditionalGeneration as ModelClass

        vision = {
            "depth": spec.vision_layers,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_hidden_size * 2,
            "out_hidden_size": spec.hidden_size,
            "num_heads": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        }

    tokenizer = _qwen_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    head_dim = spec.hidden_size // spec.num_heads
    section = head_dim // 2 // 4  # mrope_section must sum to head_dim / 2
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * section, section, section],
        },
        "bos_token_id": vocab["<|endoftext|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    config = ConfigClass(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    model = ModelClass(config)
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    # Small images stay small (LLaMA-Factory resizes them first, within image_min_pixels..image_max_pixels); the
    # high ceiling lets a run ask for the real 24x24 grid with image_min_pixels: 451584 (672 x 672).
    pixels = {"min_pixels": 56 * 56, "max_pixels": 672 * 672}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Callable[[TinyModelSpec, Path], None]] = {
    "llava": _build_llava,
    "qwen2_vl": _build_qwen_vl,
    "qwen2_5_vl": _build_qwen_vl,
}


def is_built(spec: TinyModelSpec, out: Path) -> bool:
    marker = out / BUILD_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == spec.fingerprint()
    except (OSError, ValueError):
        return False


def build_tiny_model(name: str, out: str | os.PathLike[str], force: bool = False) -> Path:
    """Build the tiny model ``name`` (one of ``TINY_MODELS``) into ``out``; reuse a matching earlier build."""
    if name not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of: {', '.join(TINY_MODELS)}.")
    spec = TINY_MODELS[name]
    out = Path(out)
    if not force and is_built(spec, out):
        return out

    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).unlink(missing_ok=True)
    torch.manual_seed(spec.seed)
    BUILDERS[spec.family](spec, out)
    marker = {"fingerprint": spec.fingerprint(), "spec": asdict(spec), "template": spec.template}
    (out / BUILD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def build_tiny_models(out_root: str | os.PathLike[str], names: list[str] | None = None, force: bool = False) -> dict:
    """Build several tiny models under ``out_root/<name>``; returns ``{name: path}``."""
    return {name: build_tiny_model(name, Path(out_root) / name, force=force) for name in names or list(TINY_MODELS)}
