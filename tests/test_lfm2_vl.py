"""LFM2-VL's own checks: why its copies remove hidden tokens (the short convolutions see through the attention mask),
a copy against the model called on the deleted sequence with no hook, and the tiling that LLaMA-Factory's plugin
cannot expand (refused before the model loads, with the image budget that avoids it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aimkp_plugin.families import ImageLayoutError, family_for
from aimkp_plugin.integration.batches import BatchSplitter
from aimkp_plugin.method.step import copy_logits, masked_inputs
from aimkp_plugin.method.variants import hidden_for

from .helpers import FAMILY_INPUTS, kept_positions, llamafactory_batch


TINY_BUDGET = 64 * (8 * 2) ** 2  # max_image_tokens × (encoder_patch_size × downsample_factor)² of the tiny processor


def float64_sample(tiny_models: dict, workspace: Path, tmp_path: Path):
    """The tiny LFM2-VL in float64 and the one sample of a real LLaMA-Factory batch (a wide picture: 5×12 tokens)."""
    from transformers import AutoModelForImageTextToText

    template, images = FAMILY_INPUTS["lfm2_vl"]
    batch, tokenizer = llamafactory_batch(tiny_models["lfm2_vl"], template, workspace, tmp_path, 1, images)
    model = AutoModelForImageTextToText.from_pretrained(tiny_models["lfm2_vl"], dtype=torch.float64).eval()
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    return model, BatchSplitter(model.config, tokenizer).split(batch, [0])[0]


def removed_copy_logits(model, sample, hidden: list[int]) -> torch.Tensor:
    """The reference step's logits of a copy (its kept tokens only)."""
    with torch.no_grad():
        logits, _ = copy_logits(model, sample, hidden, torch.bool, None, family_for("lfm2_vl").token_removal(model))
    return logits[0]


def test_the_attention_mask_does_not_hide_a_token_from_the_short_convolutions(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Hidden by the attention mask alone, a token still fills its neighbours' convolution windows: the kept tokens'
    logits move against the deleted sequence (which the removal gives, 1e-10 in tests/test_aimkp_step.py). This is why
    the family removes hidden tokens."""
    model, sample = float64_sample(tiny_models, cmkp_workspace, tmp_path)
    assert {"conv", "full_attention"} <= set(model.config.text_config.layer_types)
    for modality in ("text", "image"):
        hidden = hidden_for(sample.spans, modality, 2)
        keep = kept_positions(sample.model_inputs["input_ids"].shape[1], hidden)
        with torch.no_grad():
            masked = model(**masked_inputs(sample, hidden, torch.bool), use_cache=False).logits[0, keep]
        assert (masked - removed_copy_logits(model, sample, hidden)).abs().max() > 1e-5, modality


def test_copy_equals_the_model_called_on_the_deleted_embeddings(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """The plainest deletion there is, with no hook: the model called on the deleted sequence's input embeddings (the
    image features put in place by hand), the kept tokens' positions 0..L-1 and a mask of ones."""
    model, sample = float64_sample(tiny_models, cmkp_workspace, tmp_path)
    inputs = sample.model_inputs
    assert len(sample.spans.images[0].grids) == 1 and sample.spans.images[0].grid == (5, 12)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        output = model.model.get_image_features(
            inputs["pixel_values"], inputs["spatial_shapes"], inputs["pixel_attention_mask"]
        )
        image = (inputs["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image, torch.cat(list(output.pooler_output)).to(embeds.dtype))
    for modality in ("text", "image"):
        hidden = hidden_for(sample.spans, modality, 2)
        keep = kept_positions(inputs["input_ids"].shape[1], hidden)
        with torch.no_grad():
            deleted = model(
                inputs_embeds=embeds[:, keep],
                position_ids=keep[None],
                attention_mask=torch.ones(1, len(keep), dtype=torch.long),
                use_cache=False,
            ).logits[0]
        torch.testing.assert_close(removed_copy_logits(model, sample, hidden), deleted, rtol=0, atol=1e-10)


@pytest.fixture
def tiling_model(tiny_models: dict, tmp_path: Path) -> Path:
    """The tiny LFM2-VL with its processor's tiling on, as in the real checkpoints (64 px tiles: 4×4 tokens each)."""
    folder = tmp_path / "lfm2_vl-tiling"
    shutil.copytree(tiny_models["lfm2_vl"], folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"].update(do_image_splitting=True, tile_size=64)
    (folder / "processor_config.json").write_text(json.dumps(config))
    return folder


def plugin_tokens_and_features(model: Path, image_max_pixels: int) -> tuple[int, int, int]:
    """LLaMA-Factory's lfm2_vl plugin on one 256 px picture: the ``<image>`` tokens it writes, the feature rows the
    model makes of its pixel inputs, and the rows of ``spatial_shapes``."""
    from llamafactory.data.mm_plugin import get_mm_plugin
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    processor.image_max_pixels, processor.image_min_pixels = image_max_pixels, 32 * 32  # as LLaMA-Factory's loader
    plugin = get_mm_plugin(name="lfm2_vl", image_token="<image>")
    picture = [Image.new("RGB", (256, 256), (40, 90, 160))]
    messages = plugin.process_messages([{"role": "user", "content": "<image>a post"}], picture, [], [], processor)
    shapes = plugin._get_mm_inputs(picture, [], [], processor)["spatial_shapes"]
    features = int((shapes[:, 0] // 2 * (shapes[:, 1] // 2)).sum())
    return messages[0]["content"].count("<image>"), features, shapes.shape[0]


def test_llamafactory_gives_a_tiled_image_its_first_tiles_tokens_only(tiling_model: Path) -> None:
    """Why tiling is refused: for an image split into 9 tiles and a thumbnail, LLaMA-Factory's plugin (0.9.5 and
    main) writes the 16 tokens of the first tile while the model makes 208 feature rows, so training stops with or
    without AimKP. Under the image budget the picture stays one piece and the counts agree."""
    assert plugin_tokens_and_features(tiling_model, 768 * 768) == (16, 9 * 16 + 8 * 8, 10)
    assert plugin_tokens_and_features(tiling_model, TINY_BUDGET) == (64, 64, 1)


def test_a_run_that_could_tile_is_refused_before_the_model_loads(tiling_model: Path, tiny_models: dict) -> None:
    from aimkp_plugin.config import AimkpArguments, AimkpConfigError
    from aimkp_plugin.integration.args import check_before_training

    family = family_for("lfm2_vl")
    run = {"model_name_or_path": str(tiling_model)}
    refused = rf"lfm2_vl model: image_max_pixels 589824 .* image_max_pixels: {TINY_BUDGET}"
    with pytest.raises(AimkpConfigError, match=refused):
        check_before_training(run, AimkpArguments(aimkp=True))
    assert family.run_problems({}, {**run, "image_max_pixels": TINY_BUDGET}.get) == []
    assert family.run_problems({}, {**run, "image_max_pixels": TINY_BUDGET + 1}.get)
    assert family.run_problems({}, {"model_name_or_path": str(tiny_models["lfm2_vl"])}.get) == []  # tiling off


def test_an_image_whose_tokens_do_not_fit_its_spatial_shapes_is_an_error(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    template, images = FAMILY_INPUTS["lfm2_vl"]
    batch, tokenizer = llamafactory_batch(tiny_models["lfm2_vl"], template, cmkp_workspace, tmp_path, 1, images)
    batch["spatial_shapes"] = batch["spatial_shapes"] * torch.tensor([[1, 2]])  # 10×48 patches: 5×24 tokens
    with pytest.raises(ImageLayoutError, match=r"training sample 3, image 1: the lfm2_vl model family .* 60 image"):
        BatchSplitter(AutoConfig.from_pretrained(tiny_models["lfm2_vl"]), tokenizer).split(batch, [3])
