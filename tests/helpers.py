"""What the tests know about the model families, derived from the package's family table: adding a family to
``aimkp_plugin.families.FAMILIES`` puts it into every per-family test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MethodType

import torch

from aimkp_plugin.families import FAMILIES, ModelFamily


FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)  # also each family's first tiny model
FAMILY_BY_NAME: dict[str, ModelFamily] = {family.name: family for family in FAMILIES}
# families whose tests read wide pictures: non-square merged grids (Qwen3 generation, GLM-4V), tiles (InternVL),
# unpadded anyres areas (LLaVA-NeXT)
WIDE_PICTURES = {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "glm4v", "internvl", "llava_next"}


def template_of(family: str) -> str:
    """The LLaMA-Factory template the family's tiny model trains with."""
    return FAMILY_BY_NAME[family].tiny_models[0].template


def images_of(family: str) -> str:
    """The workspace's image folder for the family's tests."""
    return "images_wide" if family in WIDE_PICTURES else "images"


@contextmanager
def deleting(model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """While active, ``model``'s language model runs on the positions ``keep`` only: the sequence with every other
    token deleted (after the model has put the image features in place), each kept token at its original position
    ids, the model's own masks (causal, Gemma 3's image blocks and sliding windows, built over the whole sequence in
    original positions) restricted to the kept tokens (a 2-D mask of ones where the model passes none), and
    Qwen3-VL's DeepStack features of the kept image tokens. Written apart from the plugin's own removal
    (``aimkp_plugin.method.step.TokenRemoval``)."""

    def restrict(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        return mask[..., keep] if mask.dim() == 2 else mask[..., keep, :][..., keep]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert not args, "the language model is called with keyword arguments"
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, keep]
        assert kwargs.get("position_ids") is not None, "pass the original position ids: deleting would renumber them"
        kwargs["position_ids"] = kwargs["position_ids"][..., keep]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            kwargs["attention_mask"] = {name: restrict(value) for name, value in mask.items()}
        elif mask is None:  # ones, or without a cache transformers reads the position jumps as packed sequences
            kwargs["attention_mask"] = torch.ones(1, len(keep), dtype=torch.long)
        else:
            kwargs["attention_mask"] = restrict(mask)
        visual = kwargs.get("visual_pos_masks")
        if visual is not None:  # DeepStack: one feature row per image token, in order
            ranks = visual[0].cumsum(0) - 1
            kept_images = ranks[keep][visual[0, keep]]
            kwargs["visual_pos_masks"] = visual[:, keep]
            kwargs["deepstack_visual_embeds"] = [rows[kept_images] for rows in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def kept_positions(length: int, hidden: list[int]) -> torch.Tensor:
    keep = torch.ones(length, dtype=torch.bool)
    keep[hidden] = False
    return keep.nonzero().squeeze(1)


def norms_in_input_dtype(model: torch.nn.Module) -> torch.nn.Module:
    """Gemma's RMSNorms compute in float32 whatever the model's dtype; for float64 comparisons of two computations
    that differ in rounding (a deleted sequence against a masked one), compute them in the input's dtype instead,
    by the same formula (Gemma 3: ``x̂ · (1 + w)``; Gemma 4: ``x̂ · w``, or ``x̂`` without a scale)."""

    def gemma3(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * (1.0 + self.weight)

    def gemma4(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * self.weight if self.with_scale else self._norm(x)

    rules = {"Gemma3RMSNorm": gemma3, "Gemma4RMSNorm": gemma4}
    for module in model.modules():
        rule = rules.get(type(module).__name__)
        if rule is not None:
            module.forward = MethodType(rule, module)
    return model


def qwen3_5_moe_model(tiny_qwen3_5: Path, out: Path) -> Path:
    """A tiny Qwen3.5-MoE (``qwen3_5_moe``) next to the tiny Qwen3.5: the same tokenizer, processor, vision tower and
    layer pattern, every MLP a sparse block of 4 experts (top 2) with a shared expert, routers random."""
    import shutil

    from transformers import AutoConfig, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    if (out / "model.safetensors").is_file():
        return out
    shutil.copytree(tiny_qwen3_5, out, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    dense = AutoConfig.from_pretrained(tiny_qwen3_5).to_dict()
    text = {
        key: value for key, value in dense["text_config"].items() if key not in ("model_type", "intermediate_size")
    }
    text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    text |= {"shared_expert_intermediate_size": 64}
    tokens = {key: dense[key] for key in ("image_token_id", "video_token_id", "vision_start_token_id")}
    config = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=dense["vision_config"],
        vision_end_token_id=dense["vision_end_token_id"],
        tie_word_embeddings=False,
        **tokens,
    )
    torch.manual_seed(5)
    model = Qwen3_5MoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return out
