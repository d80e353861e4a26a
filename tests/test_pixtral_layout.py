"""Mistral 3 and Pixtral: which family a config gets, the rows of ``[IMG]`` tokens parted by ``[IMG_BREAK]``, and the
Pixtral vision tower's images kept apart.

- Family selection: ``mistral3`` by its model type; ``llava`` with a ``pixtral`` vision tower is Pixtral, with any
  other tower LLaVA-1.5, from a transformers config, the dict of ``config.json`` or a bare model type.
- The splitter's image blocks: the rows of one image joined across their break tokens, two images kept apart by
  ``[IMG_END]``; a block whose rows do not sit as the grid says is an error.
- A copy's break and end tokens are visible: none is hidden, and a change to one moves the kept tokens after it.
- The fast step encodes a micro-batch's images in one call of the vision tower: every image's features equal those
  of the image alone, a change to one image's pixels (or to the batch padding beyond its ``image_sizes``) moves no
  other image's features (block-diagonal attention, float64).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aimkp_plugin.data.spans import image_blocks
from aimkp_plugin.families import FAMILY_BY_NAME, ImageLayoutError, family_for
from aimkp_plugin.integration.batches import BatchSplitter

from .helpers import FAMILY_INPUTS, llamafactory_batch


PIXTRAL_FAMILIES = ["mistral3", "pixtral"]


def test_the_vision_tower_tells_pixtral_from_llava(tiny_models: dict) -> None:
    from transformers import AutoConfig

    pixtral = AutoConfig.from_pretrained(tiny_models["pixtral"])
    assert pixtral.model_type == "llava" and family_for(pixtral).name == "pixtral"
    assert family_for(pixtral.to_dict()).name == "pixtral"  # the dict of config.json (checks before loading)
    assert family_for(AutoConfig.from_pretrained(tiny_models["llava"])).name == "llava"  # a CLIP tower
    assert family_for({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}).name == "llava"
    assert family_for("llava").name == "llava"  # a bare model type names no tower
    assert family_for(AutoConfig.from_pretrained(tiny_models["mistral3"])).name == "mistral3"
    assert family_for("mistral3").name == "mistral3"
    assert family_for({"model_type": "no_such_model"}).name == "no_such_model"


def test_image_blocks_join_rows_across_break_tokens_only() -> None:
    image, row_break, end, text = 7, 9, 10, 50
    first = [image, image, row_break, image, image, end]  # a 2×2 image
    second = [image, image, image, end]  # one row of 3
    ids = [1, *first, text, *second, text]
    assert image_blocks(ids, len(ids), image, frozenset({row_break})) == [[1, 2, 4, 5], [8, 9, 10]]
    assert image_blocks(ids, len(ids), image) == [[1, 2], [4, 5], [8, 9, 10]]  # without breaks: runs
    adjacent = [*first, *second]  # [IMG_END] parts two images even with nothing between them
    assert image_blocks(adjacent, len(adjacent), image, frozenset({row_break})) == [[0, 1, 3, 4], [6, 7, 8]]


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_rows_that_do_not_sit_as_the_grid_says_are_an_error(family: str, tiny_models: dict) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models[family])
    step = config.vision_config.patch_size * getattr(config, "spatial_merge_size", 1)
    sizes = {"image_sizes": torch.tensor([[2 * step, 3 * step]])}  # 2 rows of 3
    span = FAMILY_BY_NAME[family].image_span(config, [5, 6, 7, 9, 10, 11], sizes)
    assert span.grid == (2, 3) and span.grids[0].positions == (5, 6, 7, 9, 10, 11)
    for positions in ([5, 6, 7, 8, 9, 10], [5, 6, 7, 10, 11, 12], [5, 6, 8, 9, 10, 11]):  # no break, two, misplaced
        with pytest.raises(ImageLayoutError, match="are not 2 rows of 3"):
            FAMILY_BY_NAME[family].image_span(config, positions, sizes)
    with pytest.raises(ImageLayoutError, match=r"5 image tokens, but .* has a 2×3 grid"):
        FAMILY_BY_NAME[family].image_span(config, [5, 6, 7, 9, 10], sizes)


def float64_batch(family: str, tiny_models: dict, workspace: Path, tmp_path: Path, size: int):
    from transformers import AutoModelForImageTextToText

    template, images = FAMILY_INPUTS[family]
    batch, tokenizer = llamafactory_batch(tiny_models[family], template, workspace, tmp_path, size, images)
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    model = AutoModelForImageTextToText.from_pretrained(
        tiny_models[family], dtype=torch.float64, attn_implementation="sdpa"
    )
    return model.eval(), batch, tokenizer


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_break_and_end_tokens_stay_visible_in_an_image_copy(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    from aimkp_plugin.method.step import copy_logits
    from aimkp_plugin.method.variants import hidden_for

    model, batch, tokenizer = float64_batch(family, tiny_models, cmkp_workspace, tmp_path, 1)
    sample = BatchSplitter(model.config, tokenizer).split(batch, [0])[0]
    ids = sample.model_inputs["input_ids"][0]
    breaks = (ids == tokenizer.convert_tokens_to_ids("[IMG_BREAK]")).nonzero().squeeze(1).tolist()
    end = int((ids == tokenizer.convert_tokens_to_ids("[IMG_END]")).nonzero()[0])
    rows, _ = sample.spans.images[0].grid
    assert len(breaks) == rows - 1 and not {*breaks, end} & set(sample.spans.image_positions)
    hidden = hidden_for(sample.spans, "image", 2)
    assert hidden and not {*breaks, end} & set(hidden)

    def logits(position: int | None) -> torch.Tensor:
        def perturb(module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            embeds[:, position] += 3.0
            return args, {**kwargs, "inputs_embeds": embeds}

        handle = model.model.language_model.register_forward_pre_hook(perturb, with_kwargs=True)
        if position is None:
            handle.remove()
        try:
            with torch.no_grad():
                return copy_logits(model, sample, hidden, torch.bool)[0][0]
        finally:
            handle.remove()

    base = logits(None)
    for position in (breaks[0], end):  # each moves the tokens after it
        assert (logits(position)[position + 1 :] - base[position + 1 :]).abs().max() > 1e-6


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_images_encoded_together_equal_each_alone(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    model, batch, tokenizer = float64_batch(family, tiny_models, cmkp_workspace, tmp_path, 2)
    samples = BatchSplitter(model.config, tokenizer).split(batch, [0, 1])
    family_object = FAMILY_BY_NAME[family]
    counts = [len(sample.spans.image_positions) for sample in samples]
    with torch.no_grad():
        together = family_object.encode_images(model, samples).tokens
        alone = [family_object.encode_images(model, [sample]).tokens for sample in samples]
        torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-12)
        changed = samples[1].model_inputs["pixel_values"]
        samples[1].model_inputs["pixel_values"] = changed + torch.randn_like(changed)
        moved = family_object.encode_images(model, samples).tokens
    torch.testing.assert_close(moved[: counts[0]], together[: counts[0]], rtol=0, atol=1e-12)
    assert (moved[counts[0] :] - together[counts[0] :]).abs().max() > 1e-6
    height, width = samples[0].model_inputs["image_sizes"][0].tolist()
    padded = samples[0].model_inputs["pixel_values"].clone()
    padded = torch.nn.functional.pad(padded, (0, 16, 0, 16), value=5.0)  # padding beyond image_sizes is not read
    samples[0].model_inputs["pixel_values"] = padded
    with torch.no_grad():
        torch.testing.assert_close(family_object.encode_images(model, samples[:1]).tokens, alone[0], rtol=0, atol=0)
    assert padded.shape[-2:] != (height, width)


@pytest.mark.parametrize("family", PIXTRAL_FAMILIES)
def test_a_sliding_window_shorter_than_the_cutoff_is_refused(family: str) -> None:
    settings = {"cutoff_len": 1024}
    window = {"model_type": family, "text_config": {"sliding_window": 512}}
    problems = FAMILY_BY_NAME[family].run_problems(window, settings.get)
    assert problems and "sliding_window is 512, shorter than cutoff_len 1024" in problems[0]
    assert "Set cutoff_len: 512 or less." in problems[0]
    assert FAMILY_BY_NAME[family].run_problems({"text_config": {"sliding_window": 2048}}, settings.get) == []
    assert FAMILY_BY_NAME[family].run_problems({"text_config": {"sliding_window": None}}, settings.get) == []
