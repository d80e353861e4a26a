"""Mllama (Llama 3.2 Vision, ``mllama``): images read through cross-attention layers, so an image copy hides vision
keys, not tokens.

Layout (transformers 5.6.0 ``models/mllama/modeling_mllama.py``; LLaMA-Factory 0.9.5 ``MllamaPlugin``, template
``mllama``, the only template with that plugin):

- The sequence holds one ``<|image|>`` token per image, an ordinary embedded token: no image feature replaces it.
- ``MllamaVisionModel`` cuts an image into up to ``max_num_tiles`` tiles (``aspect_ratio_ids``; padding tiles have
  ``aspect_ratio_mask`` 0). A tile is a ``(image_size/patch_size)²`` patch grid with a class token in front,
  ``P = (image_size/patch_size)² + 1`` vision tokens (40² + 1 = 1601 on Llama 3.2 Vision's 560 px tiles, patch
  14). A local encoder mixes the patches of a tile, a global encoder the tiles of an image. ``multi_modal_projector``
  turns them into ``cross_attention_states``: the keys and values of the cross-attention layers
  (``cross_attention_layers`` of the text config), ``T · P`` per image, ordered tile, then token of the tile.
- ``cross_attention_mask`` ``(B, L, I, T)``: a text token sees the image's real tiles from the image's token on
  (``get_cross_attention_token_mask``). ``_prepare_cross_attention_mask`` repeats it ``P`` times per tile.
- A text row that sees no tile (``full_text_row_masked_out_mask`` 0: the tokens before ``<|image|>``) gets a mask
  of zeros, so it attends to every vision key, padding tiles included; ``MllamaCrossAttentionDecoderLayer``
  multiplies only the MLP output by that row mask, not the attention output. Those tokens do read the image.

The method on this layout:

- **Image grid**: per real tile, its ``(image_size/patch_size)²`` patches, row-major after the class token
  (:func:`tile_patch_grids`); the cells are vision keys (``ImageSpan.keys``). The class tokens and the padding
  tiles are no grid cells and stay visible; so does the ``<|image|>`` token. The 2-D rule applies per tile at the
  sample's image stride, each tile keeping its last patch when the rule keeps none (as InternVL's tiles). One image
  per sample (``aspect_ratio_ids`` with one column), as in CMKP.
- **Image copy**: a hidden patch is removed from what the language model sees: its column of the prepared
  cross-attention mask is set to the dtype's minimum in every text row, the rows that see no tile included
  (:func:`hide_vision_keys`, a pre-hook on the language model in the reference step). Every tile keeps a patch, so
  ``full_text_row_masked_out_mask`` does not change, and the result equals the model with the hidden keys deleted
  from ``cross_attention_states``. The vision encoder still sees the whole image, as the vision tower of the
  token-based families does: only the language model's view is thinned.
- **Text copy**: the causal 4-D self-attention mask with the hidden columns cleared, as for LLaVA. A cross-attention
  layer treats every text row on its own (text tokens are only its queries), so a hidden text token reaches no kept
  one through it; this equals the sequence with the hidden tokens deleted (their cross-attention mask rows too).
- **Positions**: 1-D, ``0..L-1``.
- **Fast step**: the vision model and projector run once per micro-batch (:meth:`MllamaFamily.encode_images`); every
  row reads its sample's keys beside the embeddings, with the tiles its tokens see rebuilt from its image token's
  position (checked against the sample's ``cross_attention_mask``) and its own hidden keys blocked
  (:meth:`MllamaFamily.language_logits`). The text copies' prefix is never shared (the packed layers would need the
  per-row keys and masks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..method.family_interface import FastStepUnsupportedError, ImageFeatures, KeyHiding
from ..method.types import ImageSpan, SampleInputs, TokenGrid
from ..models.building import TinyModelSpec
from .base import FamilyDescription, ImageLayoutError, ModelFamily


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


def hide_vision_keys(cross_attention_mask: torch.Tensor, hidden_keys: Sequence[int]) -> torch.Tensor:
    """The prepared additive cross-attention mask ``(B, 1, L, K)`` (``_prepare_cross_attention_mask``'s first
    output) with the ``hidden_keys`` columns blocked in every row, the rows that see no tile (all zeros) included."""
    mask = cross_attention_mask.clone()
    if len(hidden_keys):
        mask[..., torch.as_tensor(hidden_keys, device=mask.device)] = torch.finfo(mask.dtype).min
    return mask


def cross_attention_masks(
    image_mask: torch.Tensor, tile_keys: torch.Tensor, hidden_keys: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The language model's ``cross_attention_mask`` ``(rows, 1, L, K)`` and ``full_text_row_masked_out_mask``
    ``(rows, 1, L, 1)`` for rows with one image token each (``image_mask``): a token sees the keys ``tile_keys``
    (its image's real tiles) from the image token on, as ``_prepare_cross_attention_mask`` makes them (a row that
    sees no key attends to all), then ``hidden_keys`` are blocked in every row."""
    length = image_mask.shape[1]
    image_at = image_mask.long().argmax(dim=1)
    sees = torch.arange(length, device=image_mask.device)[None] >= image_at[:, None]
    allowed = sees[:, :, None] & tile_keys[:, None, :]
    row_sees = allowed.any(dim=-1)
    blocked = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype, device=image_mask.device).masked_fill(~allowed, blocked)
    mask = (mask * row_sees[..., None].to(dtype)).masked_fill(hidden_keys[:, None, :], blocked)
    return mask[:, None], row_sees[:, None, :, None].to(dtype)


class MllamaFamily(ModelFamily):
    name = "mllama"
    model_types = ("mllama",)
    templates = ("mllama",)
    projector = "multi_modal_projector"
    description = FamilyDescription(
        grid="per real tile, the (image_size/patch)² patch grid of the cross-attention vision keys (40×40 on 560 px "
        "tiles); one image per sample",
        masked="each tile's patches by the 2-D rule, hidden from every text token's cross-attention; the class "
        "tokens, padding tiles and `<|image|>` stay",
        positions="1-D (0..L-1)",
    )
    per_image_keys = ("aspect_ratio_ids", "aspect_ratio_mask")
    per_token_keys = ("cross_attention_mask",)
    cross_attention_images = True
    tiny_models = (
        # 28 px tiles / patch 7 -> a 4x4 patch grid (+ class token) per tile, up to 4 tiles per image
        TinyModelSpec(name="mllama", family="mllama", template="mllama", image_size=28, patch_size=7, num_layers=3),
    )

    def image_span(self, config: Any, positions: list[int], image_inputs: dict[str, torch.Tensor]) -> ImageSpan:
        """The image's key grids: one per real tile (``aspect_ratio_mask``)."""
        if len(positions) != 1 or image_inputs["aspect_ratio_ids"].shape[1] != 1:
            raise ImageLayoutError(
                f"{len(positions)} adjacent <|image|> tokens in a batch of up to "
                f"{image_inputs['aspect_ratio_ids'].shape[1]} images per sample; an Mllama sample takes one image"
            )
        vision = config.vision_config
        tiles = int(image_inputs["aspect_ratio_mask"].sum())
        return ImageSpan(positions, tuple(tile_patch_grids(vision.image_size, vision.patch_size, tiles)), keys=True)

    def run_problems(self, model_config: dict[str, Any], setting: Callable[[str], Any]) -> list[str]:
        template = setting("template")
        if template in self.templates:
            return []
        return [
            f"template: {template} does not build Mllama's cross_attention_mask (which text tokens see which image "
            "tiles). Set template: mllama."
        ]

    def key_hiding(self, model: nn.Module) -> KeyHiding:
        """The reference step's pre-hook on the language model: :func:`hide_vision_keys` on its prepared mask."""
        tiles = model.config.vision_config.max_num_tiles
        return KeyHiding(self.language_model(model), functools.partial(_hidden_in_kwargs, tiles=tiles))

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [*model.model.vision_model.parameters(), *model.model.multi_modal_projector.parameters()]

    def encode_images(self, model: nn.Module, samples: Sequence[SampleInputs]) -> ImageFeatures | None:
        """Every image's keys ``(images, T · P, D)``, and as the extra which of them its text sees (the real tiles'),
        each sample's ``cross_attention_mask`` checked against that rule."""
        with_images = [sample for sample in samples if "pixel_values" in sample.model_inputs]
        if not with_images:
            return None
        if len(with_images) != len(samples):
            raise FastStepUnsupportedError("an Mllama micro-batch mixes samples with and without an image")
        inputs = {
            key: torch.cat([sample.model_inputs[key] for sample in with_images])
            for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
        }
        vision = model.model.vision_model(**inputs).last_hidden_state  # (images, 1, T, P, vision_output_dim)
        width = model.config.text_config.hidden_size
        keys = model.model.multi_modal_projector(vision).reshape(len(with_images), -1, width)
        patches = vision.shape[-2]
        seen = torch.stack([_seen_keys(sample, model.config.image_token_index, patches) for sample in with_images])
        return ImageFeatures(keys, (seen.to(keys.device),), replaces_tokens=False)

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
        """The language model with each row's keys (``extras``: the keys, the keys its text sees, the keys it hides;
        one image per row) and the masks of :func:`cross_attention_masks`; ``lm_head`` at ``logits_positions``."""
        cross: dict[str, torch.Tensor] = {}
        if extras:
            keys, seen, hidden = extras
            if keys.shape[0] != image_mask.shape[0] or bool((image_mask.sum(dim=1) != 1).any()):
                raise FastStepUnsupportedError("an Mllama row of the fast step needs exactly one image token")
            mask, full_rows = cross_attention_masks(image_mask, seen, hidden, model.dtype)
            cross = {
                "cross_attention_states": keys,
                "cross_attention_mask": mask,
                "full_text_row_masked_out_mask": full_rows,
            }
        hidden_states = model.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **cross,
        ).last_hidden_state
        return model.lm_head(hidden_states[:, logits_positions])

    def build_tiny(self, spec: TinyModelSpec, out: Path) -> None:
        from ..models.tiny_mllama import build_mllama

        build_mllama(spec, out)


def _seen_keys(sample: SampleInputs, image_token_id: int, patches: int) -> torch.Tensor:
    """Which of the sample's image keys its text sees (the real tiles', ``(T · P,)`` bool), read off its
    ``cross_attention_mask`` ``(1, L, 1, T)``, which must open those tiles from the image token on and nothing else
    (what the fast step rebuilds per row)."""
    ids, mask = sample.model_inputs["input_ids"][0], sample.model_inputs["cross_attention_mask"][0, :, 0].bool()
    image_at = int((ids == image_token_id).nonzero()[0])
    tiles = mask[image_at]
    expected = (torch.arange(len(ids), device=mask.device) >= image_at)[:, None] & tiles[None]
    if not torch.equal(mask, expected):
        raise FastStepUnsupportedError(
            f"sample {sample.index}: its cross_attention_mask is not 'the image's tiles from its <|image|> token on'"
        )
    return tiles.repeat_interleave(patches)


def _hidden_in_kwargs(kwargs: dict[str, Any], keys: list[int], tiles: int) -> dict[str, Any]:
    """The language model's keyword arguments with the vision ``keys`` hidden (one sample of one image of
    ``tiles`` tiles: its ``cross_attention_states`` hold ``tiles`` rows)."""
    states = kwargs.get("cross_attention_states")
    if states is None or states.shape[0] != tiles:
        raise ImageLayoutError("an Mllama image copy needs one sample with one image (its cross_attention_states)")
    return {**kwargs, "cross_attention_mask": hide_vision_keys(kwargs["cross_attention_mask"], keys)}
