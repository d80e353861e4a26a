"""Mllama (Llama 3.2 Vision, ``mllama``): refused before the model loads, with the reason; the layout and the maths
an exact family would use, checked on a tiny model (``tests/test_mllama.py``).

Layout (transformers 5.6.0 ``models/mllama/modeling_mllama.py``; LLaMA-Factory 0.9.5 ``MllamaPlugin``, template
``mllama``, the only template with that plugin):

- The sequence holds one ``<|image|>`` token per image, an ordinary embedded token: no image feature replaces it.
- ``MllamaVisionModel`` cuts an image into up to ``max_num_tiles`` tiles (``aspect_ratio_ids``; padding tiles have
  ``aspect_ratio_mask`` 0). A tile is a ``(image_size/patch_size)²`` patch grid with a class token in front,
  ``num_patches = (image_size/patch_size)² + 1`` vision tokens (32² + 1 = 1025 at 448 px, patch 14). A local
  encoder mixes the patches of a tile, a global encoder mixes the tiles of an image. ``multi_modal_projector`` turns
  them into ``cross_attention_states`` ``(B·I·T, num_patches, D)``: the keys and values of the cross-attention
  layers (``cross_attention_layers`` of the text config), ordered image, tile, token of the tile.
- ``cross_attention_mask`` ``(B, L, I, T)`` says which tiles a text token sees: from the image's token to the next
  image's token, or to the end (``get_cross_attention_token_mask``), the image's real tiles only.
  ``_prepare_cross_attention_mask`` repeats it ``num_patches`` times per tile: the mask the model takes is per tile,
  so a patch cannot be hidden through it.
- A text row that sees no tile (``full_text_row_masked_out_mask`` 0: the tokens before the first ``<|image|>``) gets
  a mask of zeros, so it attends to every vision key, padding tiles included; ``MllamaCrossAttentionDecoderLayer``
  multiplies only the MLP output by that row mask, not the attention output. Those tokens do read the image.

What an exact family does (each point checked in float64 on a config-built tiny model):

- **Image grid**: per real tile, its ``(image_size/patch_size)²`` patches, row-major after the class token
  (:func:`tile_patch_grids`); the cells are *vision keys*, not sequence positions. The class tokens and the padding
  tiles are no grid cells and stay visible. The 2-D rule applies per tile at the sample's image stride, each tile
  keeping its last patch when the rule keeps none (as InternVL's tiles).
- **Image copy**: a hidden patch is removed from what the language model sees: its column of the prepared
  cross-attention mask is set to the dtype's minimum in every row, the rows that see no tile included
  (:func:`hide_vision_keys`). Every tile keeps a patch, so ``full_text_row_masked_out_mask`` does not change. The
  result equals the model with the hidden keys deleted from ``cross_attention_states``. The vision encoder still
  sees the whole image, as the vision tower of the token-based families does; only the language model's view is
  thinned.
- **Text copy**: the causal 4-D self-attention mask with the hidden columns cleared, as for LLaVA. A cross-attention
  layer treats every text row on its own (text tokens are its queries only), so a hidden text token reaches no kept
  one through it; the result equals the sequence with the hidden tokens deleted (their rows of
  ``cross_attention_mask`` and ``full_text_row_masked_out_mask`` too).
- **Fast step**: the images encoded once per sample; every copy reads the same ``cross_attention_states`` with its
  own key mask.

Why it is refused: the plugin's contract puts an image's features at image tokens of the sequence, and mllama's
masked units are cross-attention keys. Exactness needs, in the method core:

1. grids whose cells are vision keys (``TokenGrid`` holds sequence positions; ``variants.hidden_for`` returns
   positions that ``kept_positions`` and ``pass_planning.plan_rows`` drop from the sequence: for mllama an image
   copy would hide nothing), and a per-copy list of hidden keys beside the hidden positions, through both steps;
2. in the reference step, a per-copy hook on ``model.model.language_model`` that applies :func:`hide_vision_keys`
   (the whole model is called, and its only per-copy input is the self-attention ``attention_mask``);
3. in the fast step, features that are not scattered into ``inputs_embeds`` (``encode_images`` returns one row per
   image token; mllama has ``T · num_patches`` keys per image), padded and masked per row in ``language_logits``,
   which has no per-row input for hidden keys; and the shared prefix, which packs ``(rows, length)`` arguments only:
   ``cross_attention_states`` ``(rows, K, D)``, ``cross_attention_mask`` ``(rows, 1, L, K)`` and
   ``full_text_row_masked_out_mask`` ``(rows, 1, L, 1)`` are left unpacked (and a ``K`` equal to the pass length
   would be packed wrongly);
4. in the splitter, a per-token key with more than one axis per token (``cross_attention_mask``; ``per_token`` pads
   1-D rows) and per-sample ``pixel_values`` ``(B, I, T, C, H, W)``.

Without those, the 1-D fallback would mask a one-token image span and hide nothing: an image copy equal to the
original, trained as if it were masked. So ``aimkp: true`` stops before the model loads (:meth:`run_problems`), and a
trainer built otherwise stops at the first batch (:meth:`image_span`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..method.types import ImageSpan, TokenGrid
from .base import FamilyDescription, ImageLayoutError, ModelFamily


REFUSAL = (
    "mllama (Llama 3.2 Vision) reads its images through cross-attention layers, not as image tokens of the "
    "sequence: an image copy must hide vision patches among the cross-attention keys, per tile, and the plugin's "
    "steps hide sequence positions only (its 1-D fallback would hide nothing and train an unmasked copy as a "
    "masked one). Train it without aimkp (plain SFT), or use a supported model (`aimkp models families`)."
)


def tile_patch_grids(image_size: int, patch_size: int, tiles: int, first_key: int = 0) -> list[TokenGrid]:
    """The patch grid of each of an image's first ``tiles`` (real) tiles, whose cells are vision-key indices: a tile
    holds ``side² + 1`` keys (the class token first, then the ``side``×``side`` patches row-major), ``side =
    image_size // patch_size``, and the image's keys start at ``first_key``."""
    side = image_size // patch_size
    per_tile = side * side + 1
    return [
        TokenGrid(side, side, tuple(range(first_key + tile * per_tile + 1, first_key + (tile + 1) * per_tile)))
        for tile in range(tiles)
    ]


def hide_vision_keys(cross_attention_mask: torch.Tensor, hidden_keys: list[int]) -> torch.Tensor:
    """The prepared additive cross-attention mask ``(B, 1, L, K)`` (``_prepare_cross_attention_mask``'s first
    output) with the ``hidden_keys`` columns blocked in every row, the rows that see no tile (all zeros) included."""
    mask = cross_attention_mask.clone()
    if hidden_keys:
        mask[..., torch.tensor(hidden_keys, device=mask.device)] = torch.finfo(mask.dtype).min
    return mask


class MllamaFamily(ModelFamily):
    """Known and refused: :data:`REFUSAL` (the module docstring has the layout, the maths and what is missing)."""

    name = "mllama"
    model_types = ("mllama",)
    templates = ("mllama",)
    description = FamilyDescription(
        grid="per tile, the (image_size/patch)² patch grid of the vision keys (cross-attention), not of the sequence",
        masked="refused: the patches would be hidden among the cross-attention keys, which the steps cannot do yet",
        positions="1-D (0..L-1)",
    )
    has_fast_step = False

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        return [REFUSAL]

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        raise ImageLayoutError(REFUSAL)
