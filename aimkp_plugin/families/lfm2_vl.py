"""LFM2-VL and LFM2.5-VL (``lfm2_vl``): a SigLIP2 NaFlex grid per image, and a language model with short convolutions.

- Grid: SigLIP2 NaFlex keeps the picture's aspect ratio: the processor resizes it to ``h × w`` patches (its
  ``spatial_shapes`` row; both sides multiples of ``downsample_factor``, within ``min_image_tokens`` ..
  ``max_image_tokens`` tokens), pads the patch list to a fixed length (``pixel_attention_mask`` marks the real ones),
  and the projector's pixel unshuffle turns each ``f × f`` block of patches into one token: an
  ``(h / f) × (w / f)`` grid, row-major (``Lfm2VlMultiModalProjector.pixel_unshuffle``), f = ``downsample_factor``.
- Tokens: LLaMA-Factory's ``lfm2_vl`` plugin (0.9.5 and main) writes an image as ``(h / f)·(w / f)`` ``<image>``
  tokens and nothing else: no ``<|image_start|>`` / ``<|image_end|>``, no tile markers (those come only from
  transformers' own ``Lfm2VlProcessor``, which LLaMA-Factory does not call for the text). So an image is one
  contiguous block, one grid; the masked cells follow the 2-D rule and no other token is involved.
- Tiles: the plugin counts each image's tokens from the ``spatial_shapes`` row of the same number, one row per image.
  An image the processor splits into tiles (``do_image_splitting``, an image over about twice the processor's
  ``max_image_tokens`` budget) has one row per tile plus a thumbnail, gets its first tile's token count, and stops
  plain training too (the model finds more features than tokens). :meth:`Lfm2VlFamily.run_problems` therefore
  refuses a run whose ``image_max_pixels`` lets an image tile, naming the budget to set: an untiled image is shrunk
  to that budget by the processor anyway.
- Short convolutions: most LFM2 decoder layers (``text_config.layer_types`` ``conv``) are a gated causal
  convolution over the last ``conv_L_cache`` (3) tokens, not attention. transformers passes them the 2-D mask only
  to zero padded inputs, and only in batches of more than one row (``apply_mask_to_padding_states``); a hidden token
  would still fill a slot of its neighbours' window. Both steps therefore run a copy with its hidden tokens
  **removed**, as for Qwen3.5: the reference step through a pre-hook on the language model that keeps the kept
  positions of ``inputs_embeds`` and of the position ids ``0..L-1`` (the batch carries none: 1-D rope), the fast step
  by its rows of kept tokens at their original positions, right-padded (padding after the last kept token reaches
  no kept token: the convolution is causal and attention is causal). The text copies' shared prefix is never packed.
- Fast step: ``vision_tower`` (SigLIP2 over the padded patch lists) and ``multi_modal_projector`` run once
  (``get_image_features``). Under ``lora_target: all`` LLaMA-Factory 0.9.5 also adapts the vision tower's and the
  projector's Linear layers (it has no vision keys for ``lfm2_vl``); those sit upstream of the image features and
  get their per-copy gradients through them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import ImageFeatures
from ..method.types import SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, LlavaStyleFamily, keep_positions, stacked_pixel_values


LLAMAFACTORY_IMAGE_MAX_PIXELS = 768 * 768  # ModelArguments.image_max_pixels's default (0.9.5 and main)
PROCESSOR_DEFAULTS = {  # Lfm2VlImageProcessor's defaults in transformers 5.6.0
    "do_image_splitting": True,
    "min_tiles": 2,
    "max_tiles": 10,
    "max_image_tokens": 256,
    "encoder_patch_size": 16,
    "downsample_factor": 2,
}


def image_processor_settings(model_name_or_path: str) -> dict[str, Any]:
    """The image processor's settings of a checkpoint (``processor_config.json``'s ``image_processor`` or
    ``preprocessor_config.json``, local or through the Hub cache), over transformers' defaults."""
    settings = dict(PROCESSOR_DEFAULTS)
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model_name_or_path) / name
        if not path.is_file():
            from transformers.utils import cached_file

            try:
                found = cached_file(model_name_or_path, name, _raise_exceptions_for_missing_entries=False)
            except (OSError, ValueError):  # not on the Hub, offline without a cache, not a repository id
                found = None
            path = Path(found) if found else None
        if path is None:
            continue
        loaded = json.loads(path.read_text(encoding="utf-8"))
        image_processor = loaded.get("image_processor") if name == "processor_config.json" else loaded
        if image_processor is not None:
            settings.update(image_processor)
            break
    return settings


def tiling_problem(model_name_or_path: str, image_max_pixels: Any) -> str | None:
    """Why images of this run could be split into tiles, which LLaMA-Factory's plugin cannot expand; None if none."""
    settings = image_processor_settings(model_name_or_path)
    if not settings["do_image_splitting"] or settings["min_tiles"] == settings["max_tiles"] == 1:
        return None
    patch, factor = int(settings["encoder_patch_size"]), int(settings["downsample_factor"])
    budget = int(settings["max_image_tokens"]) * (patch * factor) ** 2
    limit = int(image_max_pixels) if image_max_pixels is not None else LLAMAFACTORY_IMAGE_MAX_PIXELS
    if limit <= budget:
        return None
    return (
        f"image_max_pixels {limit} lets the image processor of {model_name_or_path} (do_image_splitting on) split "
        "a large image into tiles, and LLaMA-Factory's lfm2_vl plugin then writes the tokens of the image's first "
        "tile only, which stops training with or without AimKP (more image features than image tokens). Set "
        f"image_max_pixels: {budget} (max_image_tokens × (encoder_patch_size × downsample_factor)², the size the "
        "processor shrinks an untiled image to anyway), or turn do_image_splitting off in the processor config."
    )


class Lfm2VlFamily(LlavaStyleFamily):
    name = "lfm2_vl"
    model_types = ("lfm2_vl",)
    templates = ("lfm2_vl",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="(h/2)×(w/2): the aspect-preserving SigLIP2 patch grid (spatial_shapes), 2×2 pixel-unshuffled",
        masked="grid cells by the 2-D rule, **removed** from the sequence (short-convolution layers mix tokens "
        "outside attention); images that the processor would tile are refused (image_max_pixels)",
        positions="1-D (0..L-1), kept tokens at their original positions",
    )
    per_image_keys = ("spatial_shapes", "pixel_attention_mask")
    removes_hidden_tokens = True
    tiny_models = (
        # patch 8, unshuffle 2: the 64 px demo pictures 4x4 tokens, the wide ones 5x12; conv, attention, conv layers
        TinyModelSpec(
            name="lfm2_vl",
            family="lfm2_vl",
            template="lfm2_vl",
            hidden_size=32,
            intermediate_size=64,
            num_layers=3,
            patch_size=8,
        ),
    )

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        height, width = (int(value) for value in image_inputs["spatial_shapes"][0])
        patches = int(image_inputs["pixel_attention_mask"][0].sum())
        factor = int(config.downsample_factor)
        rows, cols = height // factor, width // factor
        if height % factor or width % factor or patches != height * width or rows * cols != token_count:
            raise ImageLayoutError(
                f"{token_count} image tokens, but spatial_shapes ({height}, {width}) with downsample_factor {factor} "
                f"and {patches} real patches give a {rows}×{cols} grid (an image split into tiles does not fit "
                "LLaMA-Factory's lfm2_vl plugin: lower image_max_pixels)"
            )
        return [TokenGrid(rows, cols, tuple(range(token_count)))]

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        problem = tiling_problem(str(setting("model_name_or_path")), setting("image_max_pixels"))
        return [problem] if problem else []

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """``get_image_features``: SigLIP2 over each image's padded patch list, then the unshuffle and the projector,
        one feature row per image token, images in order."""
        stacked = stacked_pixel_values(samples, *self.per_image_keys)
        if stacked is None:
            return None
        pixel_values, spatial_shapes, pixel_attention_mask = stacked
        output = model.model.get_image_features(
            pixel_values=pixel_values, spatial_shapes=spatial_shapes, pixel_attention_mask=pixel_attention_mask
        )
        return ImageFeatures(torch.cat(list(output.pooler_output)))

    def language_inputs_kept(self, inputs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        """The kept positions of the language model's inputs. The batch carries no position ids (1-D rope): the
        language model, called once per copy on the whole sequence without a cache, numbers it ``0..L-1``, so those
        are the kept tokens' original positions."""
        if inputs.get("position_ids") is None:
            if inputs.get("past_key_values") is not None:
                raise ValueError("aimkp: a copy with its hidden tokens removed runs without a cache")
            embeds = inputs["inputs_embeds"]
            inputs = {**inputs, "position_ids": torch.arange(embeds.shape[1], device=embeds.device)[None]}
        return keep_positions(inputs, keep)

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_lfm2_vl import build_lfm2_vl

        build_lfm2_vl(spec, out)
