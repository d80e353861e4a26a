"""Mllama (Llama 3.2 Vision): what its family adds to the per-family tests (``aimkp_plugin/families/mllama.py``),
on a tiny ``MllamaForConditionalGeneration`` built from config, in float64:

- the rows before the image (no visible tile) attend to every vision key, padding tiles included: the reason an
  image copy blocks its hidden keys in every row;
- the fast step's cross-attention masks, rebuilt per row from the image token's position, equal the model's own
  (``_prepare_cross_attention_mask``), with the hidden keys blocked as the reference step blocks them;
- blocking a hidden patch's column equals deleting that key, and a text copy's causal mask equals deleting its
  hidden tokens (their cross-attention rows too), on a sample whose image has padding tiles;
- what the family refuses: another template than ``mllama``, more than one image per sample.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from aimkp_plugin.config import AimkpArguments
from aimkp_plugin.families import ImageLayoutError, family_for
from aimkp_plugin.families.mllama import cross_attention_masks, hide_vision_keys, tile_patch_grids
from aimkp_plugin.integration.args import AimkpConfigError, check_before_training
from aimkp_plugin.method.masking import hidden_positions, image_keep_offsets, visibility_attention_mask

from .helpers import tiny_train_config


IMAGE_SIZE, PATCH, MAX_TILES, TILES = 16, 4, 4, 2  # a 4×4 patch grid per tile; an image of 2 tiles, 2 padding tiles
LENGTH, IMAGE_AT, IMAGE_TOKEN = 14, 3, 63


def mllama_config_dict() -> dict:
    vision = {
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "intermediate_size": 32,
        "vision_output_dim": 32,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "max_num_tiles": MAX_TILES,
        "intermediate_layers_indices": [0],
        "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1], [1, 3], [3, 1], [1, 4], [2, 2], [4, 1]],
    }
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "cross_attention_layers": [1, 3],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    return {"model_type": "mllama", "vision_config": vision, "text_config": text, "image_token_index": IMAGE_TOKEN}


@pytest.fixture(scope="module")
def mllama() -> tuple[torch.nn.Module, dict]:
    """A random tiny model (gates opened: they start at 0, which would switch cross attention off) and one sample:
    an image of 2 tiles (aspect ratio 1×2) at position 3, seen by the tokens from there on."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    settings = mllama_config_dict()
    settings.pop("model_type")
    model = MllamaForConditionalGeneration(MllamaConfig(**settings)).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate") or name.endswith("_gate"):
                parameter.fill_(0.7)
    input_ids = torch.randint(3, 60, (1, LENGTH))
    input_ids[0, 0], input_ids[0, IMAGE_AT] = 1, IMAGE_TOKEN
    cross_attention_mask = torch.zeros(1, LENGTH, 1, MAX_TILES, dtype=torch.long)
    cross_attention_mask[0, IMAGE_AT:, 0, :TILES] = 1
    inputs = {
        "input_ids": input_ids,
        "pixel_values": torch.randn(1, 1, MAX_TILES, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64),
        "aspect_ratio_ids": torch.tensor([[2]]),
        "aspect_ratio_mask": torch.tensor([[[1] * TILES + [0] * (MAX_TILES - TILES)]]),
        "cross_attention_mask": cross_attention_mask,
        "position_ids": torch.arange(LENGTH)[None],
    }
    return model, inputs


def language_hook(change: Callable[[dict], dict]) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        assert not args
        return args, change(dict(kwargs))

    return hook


@contextmanager
def hooked(model: torch.nn.Module, *changes: Callable[[dict], dict]) -> Iterator[None]:
    """``changes`` applied in order to the language model's keyword arguments (after the vision model and the mask
    preparation ran)."""
    handles = [
        model.model.language_model.register_forward_pre_hook(language_hook(change), with_kwargs=True)
        for change in changes
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits(model: torch.nn.Module, inputs: dict, *changes: Callable[[dict], dict]) -> torch.Tensor:
    with torch.no_grad(), hooked(model, *changes):
        return model(**inputs, use_cache=False).logits[0]


def vision_keys(kwargs: dict) -> torch.Tensor:
    """``cross_attention_states`` ``(B·I·T, num_patches, D)`` as the cross-attention layers read it, ``(1, K, D)``."""
    states = kwargs["cross_attention_states"]
    return states.reshape(1, -1, states.shape[-1])


def hiding(hidden_keys: list[int]) -> Callable[[dict], dict]:
    def change(kwargs: dict) -> dict:
        kwargs["cross_attention_mask"] = hide_vision_keys(kwargs["cross_attention_mask"], hidden_keys)
        return kwargs

    return change


def deleting_keys(keep: torch.Tensor) -> Callable[[dict], dict]:
    def change(kwargs: dict) -> dict:
        kwargs["cross_attention_states"] = vision_keys(kwargs)[:, keep]
        kwargs["cross_attention_mask"] = kwargs["cross_attention_mask"][..., keep]
        return kwargs

    return change


def perturbing_keys(keys: list[int]) -> Callable[[dict], dict]:
    def change(kwargs: dict) -> dict:
        states = vision_keys(kwargs).clone()
        states[:, keys] += 3.0
        kwargs["cross_attention_states"] = states
        return kwargs

    return change


def hidden_patches(stride: int) -> list[int]:
    """The vision keys an image copy at ``stride`` hides: the 2-D rule on each real tile's patch grid."""
    hidden = []
    for grid in tile_patch_grids(IMAGE_SIZE, PATCH, TILES):
        hidden += hidden_positions(list(grid.positions), image_keep_offsets(grid.height, grid.width, stride))
    return hidden


def test_tile_grids_are_the_patches_after_each_class_token() -> None:
    first, second = tile_patch_grids(IMAGE_SIZE, PATCH, TILES, first_key=100)
    assert (first.height, first.width) == (4, 4)
    assert first.positions == tuple(range(101, 117)) and second.positions == tuple(range(118, 134))
    assert hidden_patches(2) == [p for p in range(1, 34) if p != 17 and (p - 1) % 17 not in (5, 7, 13, 15)]


def test_image_copy_equals_the_model_with_the_hidden_vision_keys_deleted(mllama) -> None:
    model, inputs = mllama
    patches = (IMAGE_SIZE // PATCH) ** 2 + 1
    hidden = hidden_patches(2)
    keep = torch.tensor([key for key in range(MAX_TILES * patches) if key not in hidden])
    masked = logits(model, inputs, hiding(hidden))
    torch.testing.assert_close(masked, logits(model, inputs, deleting_keys(keep)), rtol=0, atol=1e-10)
    assert (masked - logits(model, inputs)).abs().max() > 1e-6  # the copy differs from the original
    moved = logits(model, inputs, perturbing_keys(hidden[:6]), hiding(hidden))
    torch.testing.assert_close(moved, masked, rtol=0, atol=1e-10)  # a hidden patch influences nothing
    kept_patch = next(int(key) for key in keep if key % patches != 0)
    assert (logits(model, inputs, perturbing_keys([kept_patch]), hiding(hidden)) - masked).abs().max() > 1e-6


def test_rows_that_see_no_tile_attend_to_every_vision_key(mllama) -> None:
    """``_prepare_cross_attention_mask`` zeroes the mask of a row that sees no tile, and the layer gates only the
    MLP by the row mask: the tokens before the image read every key, a padding tile's too."""
    model, inputs = mllama
    padding_key = TILES * ((IMAGE_SIZE // PATCH) ** 2 + 1) + 2
    moved = (logits(model, inputs, perturbing_keys([padding_key])) - logits(model, inputs)).abs().amax(dim=-1)
    assert (moved[:IMAGE_AT] > 1e-6).all()


def test_text_copy_equals_the_sequence_with_the_hidden_tokens_deleted(mllama) -> None:
    model, inputs = mllama
    hidden = [5, 7, 9, 10]
    keep = torch.tensor([position for position in range(LENGTH) if position not in hidden])
    mask = visibility_attention_mask(LENGTH, hidden, torch.bool)
    embeds = model.get_input_embeddings()(inputs["input_ids"])  # the text model's input, for the hooks to read
    by_embeds = {key: value for key, value in inputs.items() if key != "input_ids"} | {"inputs_embeds": embeds}
    masked = logits(model, {**by_embeds, "attention_mask": mask})[keep]

    def delete(kwargs: dict) -> dict:
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"][:, keep]
        kwargs["position_ids"] = kwargs["position_ids"][:, keep]
        kwargs["attention_mask"] = torch.ones(1, len(keep), dtype=torch.long)
        for key in ("cross_attention_mask", "full_text_row_masked_out_mask"):
            kwargs[key] = kwargs[key][:, :, keep]
        return kwargs

    torch.testing.assert_close(masked, logits(model, by_embeds, delete), rtol=0, atol=1e-10)

    def perturb(kwargs: dict) -> dict:
        kwargs["inputs_embeds"] = kwargs["inputs_embeds"].clone()
        kwargs["inputs_embeds"][:, hidden] += 3.0
        return kwargs

    moved = logits(model, {**by_embeds, "attention_mask": mask}, perturb)[keep]
    torch.testing.assert_close(moved, masked, rtol=0, atol=1e-10)


def test_fast_step_masks_equal_the_models_own(mllama) -> None:
    """:func:`cross_attention_masks` (the fast step's, from the image token's position and the keys its text sees)
    against the model's ``_prepare_cross_attention_mask`` of the sample's ``cross_attention_mask``, then the same
    hidden keys blocked in both."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    model, inputs = mllama
    patches = (IMAGE_SIZE // PATCH) ** 2 + 1
    expected, expected_rows = _prepare_cross_attention_mask(inputs["cross_attention_mask"], patches, torch.float64)
    hidden = hidden_patches(2)
    seen = inputs["cross_attention_mask"][0, IMAGE_AT, 0].bool().repeat_interleave(patches)[None]
    hidden_keys = torch.zeros_like(seen)
    hidden_keys[0, hidden] = True
    mask, rows = cross_attention_masks(inputs["input_ids"] == IMAGE_TOKEN, seen, hidden_keys, torch.float64)
    assert torch.equal(mask, hide_vision_keys(expected, hidden)) and torch.equal(rows, expected_rows)
    assert not rows[0, 0, :IMAGE_AT].any() and rows[0, 0, IMAGE_AT:].all()


def test_another_template_and_a_second_image_are_refused(tmp_path: Path) -> None:
    """Only LLaMA-Factory's ``mllama`` template builds the cross-attention mask: another one stops before the model
    loads. A batch with two images in a sample stops at the split (the keys of one image per sample)."""
    (tmp_path / "config.json").write_text(json.dumps(mllama_config_dict()))
    config = tiny_train_config(tmp_path, "llama3", tmp_path, tmp_path / "out", aimkp=True)
    with pytest.raises(AimkpConfigError, match="with a mllama model: template: llama3 .* Set template: mllama"):
        check_before_training(config, AimkpArguments(aimkp=True))
    two_images = {"aspect_ratio_ids": torch.tensor([[2, 1]]), "aspect_ratio_mask": torch.ones(1, 2, MAX_TILES)}
    with pytest.raises(ImageLayoutError, match="an Mllama sample takes one image"):
        family_for("mllama").image_span(None, [IMAGE_AT], two_images)
