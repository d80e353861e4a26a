"""Llama 4 (``llama4``: Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E): tiles plus a global view, one square grid
each; chunked local attention, NoPE global layers and MoE feed-forward blocks in the text model.

- Layout (``Llama4Processor._prompt_split_image``, LLaMA-Factory's ``Llama4Plugin``): an image resized onto a canvas of
  ``rows × cols`` square tiles (``Llama4ImageProcessor``, at most ``max_patches`` tiles) is written as::

      <|image_start|> [tile(0,0) <|tile_x_separator|> tile(0,1) ... tile(0,cols-1) <|tile_y_separator|>] per row
      <|image|> global view <|image_end|>

  where each tile and the global view (the whole picture resized to one tile; present only when there is more than
  one tile) are ``N`` ``<|patch|>`` tokens, ``N = ((tile / patch) · pixel_shuffle_ratio)²`` (12 × 12 = 144 at Scout's
  336 px tiles, patch 14, ratio 0.5). ``pixel_values`` holds one row per tile, the global view last; the vision
  encoder and its pixel-shuffle MLP (``vision_model.vision_adapter``) turn each row into a square ``√N × √N`` grid
  of features, which ``multi_modal_projector`` maps into the text width and which replace the ``<|patch|>`` tokens
  in order (``image_token_index`` is ``<|patch|>``).
- Grids: one square grid per tile and one for the global view. The separators and ``<|image|>`` stand between the
  runs of ``<|patch|>`` tokens, so every tile and the global view is its own contiguous block of image tokens, one
  row of ``pixel_values`` each (the batch splitter's blocks): the 2-D rule applies per grid, every grid at the
  sample's one image stride, and a grid whose rule keeps nothing keeps its own last token. ``<|image_start|>``, the
  separators, ``<|image|>`` and ``<|image_end|>`` carry no pixels; they are not grid cells and stay visible. The
  tiles' arrangement is not merged into one grid: the global view repeats the picture at another scale, and per tile
  the rule keeps the same every-γ-th cells.
- Attention: layers whose ``no_rope_layers`` entry is 1 use RoPE and *chunked* attention (``chunked_attention``: a
  query sees the keys of its own chunk of ``attention_chunk_size`` positions, causally); the others are NoPE global
  layers (``full_attention``: plain causal). transformers builds the chunked mask from a 2-D mask by token index,
  and passes a 4-D mask through unchanged to every layer, which would make the chunked layers global. So both steps
  give the model one 4-D mask per layer type (a dict, which ``Llama4TextModel`` uses as it is): causal, and within
  ``⌊p / C⌋`` chunks for the chunked layers, with causality and chunks counted in original positions ``p``; the
  reference step clears the hidden columns, the fast step builds them over the kept tokens. A hidden token is then
  seen by no token in any layer, and each kept token sees exactly the kept tokens it sees in the original.
- Attention temperature tuning (NoPE layers): the query is scaled by ``1 + attn_scale · log1p(⌊(i + 1) /
  floor_scale⌋)``, where transformers 5.6.0 takes ``i`` as the token's index in the sequence it runs (not its
  position id). The scale is exactly 1 while ``i + 1 < floor_scale`` (8192 in Scout and Maverick). The fast step runs
  kept tokens at other indices (a copy's kept tokens, a packed shared prefix of up to ``2 · cutoff_len`` tokens), so
  a run with ``attn_temperature_tuning`` and ``2 · cutoff_len ≥ floor_scale`` is refused before the model loads; below
  that every index gets the scale 1, in every step, as in the original sequence.
- MoE: a sparse layer routes each token on its own (a sigmoid of its top-k router logits) through fused 3-D expert
  weights, plus a shared expert (Linear layers that see every token, flattened). LoRA (``lora_target: all``) adapts
  the attention projections and the dense and shared-expert MLPs, which the fast step covers; the experts' fused
  weights and the router (``Llama4Router``, a subclass of Linear that LLaMA-Factory's target search skips) have no
  per-copy rule and a run that trains them takes the reference step, with a warning naming them. Routing is per
  token, so a hidden token moves no kept token's experts. Llama 4's forward adds no router auxiliary loss at all
  (LLaMA-Factory's ``moe_aux_loss_coef`` only sets config flags), so plain SFT and AimKP train on the answer
  cross-entropy alone.
- Positions: 1-D (0..L-1), the kept tokens at theirs. Fast step: the vision encoder with its pixel-shuffle MLP and
  ``multi_modal_projector`` run once per micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import ImageFeatures, base_model_of
from ..method.masking import as_attention_mask, hide_positions
from ..method.types import SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, ModelFamily, attention_mask_dtype, stacked_pixel_values


def llama4_allowed(positions: torch.Tensor, chunk: int | None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 1, L, L)`` bool, True = attend: causal in ``positions`` ``(B, L)``, and within the same chunk of
    ``chunk`` positions when given (transformers' ``chunked_overlay`` without left padding); keys outside ``valid``
    are masked, and every query keeps its own key so no row is empty."""
    query, key = positions[:, :, None], positions[:, None, :]
    allowed = key <= query
    if chunk is not None:
        allowed &= torch.div(key, chunk, rounding_mode="floor") == torch.div(query, chunk, rounding_mode="floor")
    if valid is not None:
        allowed &= valid[:, None, :]
    allowed |= torch.eye(positions.shape[-1], dtype=torch.bool, device=positions.device)
    return allowed[:, None]


class Llama4Family(ModelFamily):
    name = "llama4"
    model_types = ("llama4",)
    templates = ("llama4",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="one square grid per tile and one for the global view, ((tile/patch)·0.5)² tokens each (12×12 at 336 px "
        "tiles); tiles + global view share the image's stride",
        masked="each grid's cells by the 2-D rule, each keeping its last token when the rule keeps none; "
        "`<\\|image_start\\|>`, the tile separators, `<\\|image\\|>` and `<\\|image_end\\|>` stay visible; MoE "
        "experts and router are not hooked (LoRA leaves them alone)",  # pipes escaped: the README's table cells
        positions="1-D (0..L-1); causality and attention chunks counted in original positions",
    )
    custom_attention = True
    tiny_models = (
        # 32 px tiles / patch 4 -> 8x8 patches -> 4x4 = 16 tokens per tile after the pixel shuffle; up to 4 tiles
        TinyModelSpec(name="llama4", family="llama4", template="llama4", image_size=32, patch_size=4),
    )

    # ------------------------------------------------------------------ image tokens and grids

    def tokens_per_tile(self, config: Any) -> int:
        """``((tile / patch) · pixel_shuffle_ratio)²``: one tile's (and the global view's) image tokens."""
        vision = config.vision_config
        side = vision.image_size // vision.patch_size * vision.pixel_shuffle_ratio
        return round(side) ** 2

    def image_grids(self, config: Any, token_count: int, image_inputs: dict[str, torch.Tensor]) -> list[TokenGrid]:
        """One block of ``<|patch|>`` tokens is one tile or the global view: one square grid."""
        per_tile = self.tokens_per_tile(config)
        side = math.isqrt(per_tile)
        if token_count != per_tile or side * side != per_tile:
            raise ImageLayoutError(
                f"{token_count} image tokens in a run of <|patch|> tokens, but a Llama 4 tile (and the global view) "
                f"has {per_tile} ((image_size / patch_size · pixel_shuffle_ratio)² of the vision config), which "
                "must form a square grid"
            )
        return [TokenGrid(side, side, tuple(range(token_count)))]

    # ------------------------------------------------------------------ attention and run checks

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        text = model_config.get("text_config") or {}
        floor_scale = int(text.get("floor_scale", 8192))
        cutoff = int(setting("cutoff_len") or 2048)  # LLaMA-Factory's default cutoff_len
        if text.get("attn_temperature_tuning", True) and 2 * cutoff >= floor_scale:
            return [
                f"cutoff_len: {cutoff} with attn_temperature_tuning and floor_scale {floor_scale}: transformers "
                "scales the NoPE layers' queries by each token's index in the sequence it runs, which the fast step's "
                "shorter copies and packed prefixes (up to 2 · cutoff_len tokens) change once an index reaches "
                f"floor_scale. Set cutoff_len to at most {(floor_scale - 1) // 2}."
            ]
        return []

    def layer_masks(
        self, model: nn.Module, positions: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """One mask per layer type of the text model: ``chunked_attention`` within chunks, ``full_attention``
        causal; both in ``positions``."""
        text = model.config.get_text_config()
        return {
            layer_type: as_attention_mask(
                llama4_allowed(
                    positions, text.attention_chunk_size if layer_type == "chunked_attention" else None, valid
                ),
                dtype,
            )
            for layer_type in sorted(set(text.layer_types))
        }

    def reference_attention_mask(
        self, model: nn.Module, sample: SampleInputs, hidden: list[int], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        input_ids = sample.model_inputs["input_ids"]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        masks = self.layer_masks(model, positions, None, torch.bool)
        return {
            layer_type: as_attention_mask(hide_positions(allowed, hidden), dtype)
            for layer_type, allowed in masks.items()
        }

    # ------------------------------------------------------------------ the fast step

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The vision encoder's (with its pixel-shuffle MLP) and the projector's parameters."""
        return [*model.vision_model.parameters(), *model.multi_modal_projector.parameters()]

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """Every tile and global view through the vision encoder, the pixel shuffle and the projector (as
        ``Llama4ForConditionalGeneration.forward``), one feature row per ``<|patch|>`` token, in order."""
        stacked = stacked_pixel_values(samples)
        if stacked is None:
            return None
        features = model.get_image_features(
            pixel_values=stacked[0], vision_feature_select_strategy=None, return_dict=True
        ).last_hidden_state
        return ImageFeatures(model.multi_modal_projector(features.reshape(-1, features.shape[-1])))

    def decoder_layers(self, model: nn.Module) -> list[nn.Module]:
        """The text model's decoder layers (``get_decoder()`` gives Llama 4's causal LM wrapper, not its layers)."""
        return list(self.language_model(model).layers)

    def language_model(self, model: nn.Module) -> nn.Module:
        """``language_model.model`` (the text model; Llama 4 has no ``model.model``)."""
        return base_model_of(model).language_model.model

    def language_logits(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        image_mask: torch.Tensor,
        extras: Sequence[torch.Tensor],
        logits_positions: torch.Tensor,
    ) -> torch.Tensor:
        """The model with one mask per layer type over the kept tokens (chunks and causality in original
        positions)."""
        dtype = attention_mask_dtype(model, inputs_embeds.dtype)
        masks = self.layer_masks(model, position_ids, attention_mask.bool(), dtype)
        return model(
            inputs_embeds=inputs_embeds,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_positions,
        ).logits

    # ------------------------------------------------------------------ tiny models

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_llama4 import build_llama4

        build_llama4(spec, out)
