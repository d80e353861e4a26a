"""The reference AimKP step against a one-variant-at-a-time ground truth written independently from the spec.

The ground truth finds the spans its own way (exact search of the encoded post text, image tokens by id), picks the
hidden tokens by the spec's formulas, runs a second copy of the model on the sequence with those tokens deleted and
every kept token at its original position ids (the spec's definition of a copy, step 4), takes the mean answer
cross-entropy and ``torch.autograd.grad``, all in float64. The plugin runs the LLaMA-Factory batch through its
splitter and step (SDPA, boolean masks; hidden tokens removed for a family that mixes tokens outside attention).
Cosines, keep decisions, the final ``.grad`` of every trainable parameter and the stride updates must agree.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from aimkp_plugin.data.cmkp import iter_records
from aimkp_plugin.families import family_for
from aimkp_plugin.integration.batches import BatchSplitter
from aimkp_plugin.method.state import CurriculumState, ModalityState, next_modality_state
from aimkp_plugin.method.step import reference_sample_step
from aimkp_plugin.method.types import StepConfig

from .helpers import (
    FAMILY_INPUTS,
    deleting,
    deleting_keys,
    kept_positions,
    language_model_of,
    llamafactory_batch,
    norms_in_input_dtype,
    paligemma_gemma_model,
)


STRIDES = [  # (text, image) per sample: both masked; frozen image at 4 with text 3; text off, image 8
    (ModalityState(2), ModalityState(2)),
    (ModalityState(3), ModalityState(4, frozen=True)),
    (ModalityState(1), ModalityState(8)),
]


def load_model(path: Path, attention: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    # MoE experts: the eager loop (grouped_mm takes no float64)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.float64, attn_implementation=attention, experts_implementation="eager"
    )
    for name, parameter in model.named_parameters():  # train the LLM and projector, freeze the vision tower
        parameter.requires_grad = "vision" not in name or "merger" in name
    return norms_in_input_dtype(model).train()


def spec_hidden(text: list[int], grids: list[list[int]], shapes: list[tuple[int, int]], modality: str, stride: int):
    """Hidden positions straight from the spec's formulas; ``grids`` holds the row-major positions of each grid (one
    per InternVL tile; LLaVA-NeXT's base grid and high-resolution area), ``shapes`` their (rows, cols); each applies
    the rule on its own."""
    if modality == "text":
        keep = {p for p in range(len(text)) if (p + 1) % stride == 0} or {len(text) - 1}
        return [position for offset, position in enumerate(text) if offset not in keep]
    hidden = []
    for positions, (rows, cols) in zip(grids, shapes, strict=True):
        keep = {
            r * cols + c
            for r in range(rows)
            for c in range(cols)
            if r % stride == stride - 1 and c % stride == stride - 1
        }
        keep = keep or {rows * cols - 1}
        hidden += [position for offset, position in enumerate(positions) if offset not in keep]
    return hidden


def truth_layout(family: str, config, batch: dict, row: int, visible, image: list[int], pixel_offset: int):
    """The model inputs of one sample and its image grids, read off the batch independently of the plugin:
    ``(inputs without input_ids/labels, grids, their shapes, pixel rows used)``."""
    if family == "llava":
        side = math.isqrt(len(image))
        return {"pixel_values": batch["pixel_values"][row : row + 1].double()}, [image], [(side, side)], 1
    if family == "gemma3":
        side = math.isqrt(config.mm_tokens_per_image)
        return {"pixel_values": batch["pixel_values"][row : row + 1].double()}, [image], [(side, side)], 1
    if family == "paligemma":  # the SigLIP patch grid, before <bos>; token_type_ids carry the bidirectional block
        side = config.vision_config.image_size // config.vision_config.patch_size
        return {"pixel_values": batch["pixel_values"][row : row + 1].double()}, [image], [(side, side)], 1
    if family == "gemma4":  # the patches' (x, y), pooled k×k into tokens; the block's token types for the model
        positions = batch["image_position_ids"][row]
        positions = positions[(positions >= 0).all(dim=-1)]
        pooling = config.vision_config.pooling_kernel_size
        shape = (len(positions[:, 1].unique()) // pooling, len(positions[:, 0].unique()) // pooling)
        token_types = torch.zeros(1, int(visible.sum()), dtype=torch.long)
        token_types[0, image] = 1
        inputs = {
            "pixel_values": batch["pixel_values"][row : row + 1].double(),
            "image_position_ids": batch["image_position_ids"][row : row + 1],
            "mm_token_type_ids": token_types,
        }
        return inputs, [image], [shape], 1
    if family == "llava_next":  # the model's own anyres helpers: the stitched tiles unpadded, a newline per row
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        size = batch["image_sizes"][row].tolist()
        g = config.vision_config.image_size // config.vision_config.patch_size
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        rows, cols = unpad_image(torch.zeros(1, tiles_h * g, tiles_w * g), size).shape[1:]
        assert len(image) == g * g + rows * (cols + 1)
        high_res = [image[g * g + r * (cols + 1) + c] for r in range(rows) for c in range(cols)]
        inputs = {
            "pixel_values": batch["pixel_values"][row : row + 1].double(),
            "image_sizes": batch["image_sizes"][row : row + 1],
        }
        return inputs, [image[: g * g], high_res], [(g, g), (rows, cols)], 1
    if family in ("mistral3", "pixtral"):  # rows of [IMG] from image_sizes, each row followed by one break token
        height, width = batch["image_sizes"][row].tolist()
        step = config.vision_config.patch_size * getattr(config, "spatial_merge_size", 1)
        rows, cols = height // step, width // step
        assert len(image) == rows * cols and all(image[r * cols] == image[r * cols - 1] + 2 for r in range(1, rows))
        inputs = {
            "pixel_values": batch["pixel_values"][row : row + 1].double(),
            "image_sizes": batch["image_sizes"][row : row + 1],
        }
        return inputs, [image], [(rows, cols)], 1
    if family == "llama4":  # tiles then the global view, each a run of <|patch|> tokens between separators
        vision = config.vision_config
        side = int(vision.image_size // vision.patch_size * vision.pixel_shuffle_ratio)
        per_tile = side * side
        tiles = len(image) // per_tile
        grids = [image[tile * per_tile : (tile + 1) * per_tile] for tile in range(tiles)]
        assert all(grid[-1] - grid[0] == per_tile - 1 for grid in grids)  # each tile contiguous
        gaps = [after[0] - before[-1] - 1 for before, after in zip(grids, grids[1:], strict=False)]
        assert gaps == [1] * (tiles - 2) + [2]  # a separator between tiles; a separator and <|image|> before the view
        inputs = {"pixel_values": batch["pixel_values"][pixel_offset : pixel_offset + tiles].double()}
        return inputs, grids, [(side, side)] * tiles, tiles
    if family == "mllama":  # one <|image|> token; the grids are vision keys: each real tile's patches after its CLS
        side = config.vision_config.image_size // config.vision_config.patch_size
        tiles = int(batch["aspect_ratio_mask"][row].sum())
        inputs = {key: batch[key][row : row + 1] for key in ("aspect_ratio_ids", "aspect_ratio_mask")}
        inputs["pixel_values"] = batch["pixel_values"][row : row + 1].double()
        inputs["cross_attention_mask"] = batch["cross_attention_mask"][row : row + 1][:, visible]
        grids = [[tile * (side * side + 1) + 1 + cell for cell in range(side * side)] for tile in range(tiles)]
        return inputs, grids, [(side, side)] * tiles, 1
    if family == "internvl":
        per_tile = config.image_seq_length  # each tile: a square grid of tokens after the pixel shuffle
        tiles = len(image) // per_tile
        side = math.isqrt(per_tile)
        inputs = {"pixel_values": batch["pixel_values"][pixel_offset : pixel_offset + tiles].double()}
        grids = [image[tile * per_tile : (tile + 1) * per_tile] for tile in range(tiles)]
        return inputs, grids, [(side, side)] * tiles, tiles
    if family == "lfm2_vl":  # the real patches' (h, w), pixel-unshuffled f×f into tokens; one pixel row per image
        height, width = batch["spatial_shapes"][pixel_offset].tolist()
        assert int(batch["pixel_attention_mask"][pixel_offset].sum()) == height * width
        factor = config.downsample_factor
        inputs = {
            key: batch[key][pixel_offset : pixel_offset + 1]
            for key in ("pixel_values", "spatial_shapes", "pixel_attention_mask")
        }
        inputs["pixel_values"] = inputs["pixel_values"].double()
        return inputs, [image], [(height // factor, width // factor)], 1
    merge = config.vision_config.spatial_merge_size
    thw = batch["image_grid_thw"][row : row + 1]
    patches = int(thw.prod())
    inputs = {
        "pixel_values": batch["pixel_values"][pixel_offset : pixel_offset + patches].double(),
        "image_grid_thw": thw,
        "position_ids": batch["position_ids"][:, row : row + 1][..., visible],
    }
    return inputs, [image], [(int(thw[0, 1]) // merge, int(thw[0, 2]) // merge)], patches


def ground_truth_gradient(
    model, inputs: dict, hidden: list[int], parameters, hidden_keys: list[int] = ()
) -> tuple[list[torch.Tensor], int]:
    """The gradient of a copy's mean answer cross-entropy: the model run on the sequence with the ``hidden`` tokens
    deleted, every kept token at its original position ids (:func:`~tests.helpers.deleting`), and Mllama's
    ``hidden_keys`` deleted from its cross-attention keys (:func:`~tests.helpers.deleting_keys`)."""
    length = inputs["input_ids"].shape[1]
    kwargs = dict(inputs)
    kwargs.setdefault("position_ids", torch.arange(length)[None])
    labels = kwargs.pop("labels")
    keep = kept_positions(length, hidden)
    keys = deleting_keys(model, list(hidden_keys)) if hidden_keys else nullcontext()
    with deleting(model, keep), keys:  # without a cache, as in training; float64 (HF's own loss: float32)
        logits = model(**kwargs, use_cache=False).logits
    kept_labels = labels[0, keep]
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], kept_labels[1:], ignore_index=-100)  # mean over answers
    return list(torch.autograd.grad(loss, parameters, allow_unused=False)), int((labels[:, 1:] != -100).sum())


def flat(gradients: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([gradient.reshape(-1) for gradient in gradients])


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
def test_reference_step_matches_one_variant_at_a_time_ground_truth(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    template, images = FAMILY_INPUTS[family]
    path = tiny_models[family]
    batch, tokenizer = llamafactory_batch(path, template, cmkp_workspace, tmp_path, size=3, images=images)
    posts = [post for _, post in iter_records(cmkp_workspace / "raw" / "test_src.txt")][:3]

    # ---- ground truth, sample by sample, variant by variant
    truth_model = load_model(path, "sdpa")  # eager attention would take its softmax in float32
    truth_parameters = [parameter for parameter in truth_model.parameters() if parameter.requires_grad]
    config = truth_model.config
    image_id = config.image_token_index if family in ("llava", "mllama") else config.image_token_id
    pixel_offset = 0
    truth, layouts = [], []
    for row, post in enumerate(posts):
        visible = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][visible]
        image = [index for index, token in enumerate(ids.tolist()) if token == image_id]
        extra, grids, grid, used = truth_layout(family, config, batch, row, visible, image, pixel_offset)
        pixel_offset += used
        layouts.append((len(grids), grid))
        inputs = {"input_ids": ids[None], "labels": batch["labels"][row][visible][None], **extra}
        if "token_type_ids" in batch:  # Gemma 3 and PaliGemma build their bidirectional image blocks from them
            inputs["token_type_ids"] = batch["token_type_ids"][row][visible][None]
        encoded = tokenizer.encode(post.text, add_special_tokens=False)
        start = next(i for i in range(len(ids)) if ids[i : i + len(encoded)].tolist() == encoded)
        text = list(range(start, start + len(encoded)))
        gradients, n_tokens = {}, 0
        gradients["original"], n_tokens = ground_truth_gradient(truth_model, inputs, [], truth_parameters)
        for modality, state in zip(("text", "image"), STRIDES[row], strict=True):
            if state.stride > 1:
                hidden = spec_hidden(text, grids, grid, modality, state.stride)
                if family == "mllama" and modality == "image":  # its grids' cells are vision keys
                    hidden, keys = [], hidden
                else:
                    keys = []
                gradients[modality], _ = ground_truth_gradient(truth_model, inputs, hidden, truth_parameters, keys)
        cosines = {
            name: float(torch.nn.functional.cosine_similarity(flat(gradients["original"]), flat(g), dim=0))
            for name, g in gradients.items()
            if name != "original"
        }
        truth.append((gradients, n_tokens, cosines))

    if family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "mistral3", "pixtral", "lfm2_vl"):
        assert all(rows != cols for _, [(rows, cols)] in layouts), layouts  # non-square merged grids
    if family in ("internvl", "llama4"):
        assert all(tiles > 1 for tiles, _ in layouts), layouts  # tiles plus a thumbnail (global view)
    if family == "llava_next":  # unpadded: the high-resolution area is not the stitched tiles' full square
        assert all(shapes[1][0] != shapes[1][1] for _, shapes in layouts), layouts

    # thresholds between observed cosines, so that some copies are kept and some dropped
    text_cosines = sorted(cos["text"] for _, _, cos in truth if "text" in cos)
    image_cosines = sorted(cos["image"] for _, _, cos in truth if "image" in cos)
    thresholds = {"text": (text_cosines[0] + text_cosines[1]) / 2, "image": (image_cosines[0] + image_cosines[1]) / 2}
    total_tokens = sum(n for _, n, _ in truth)
    expected = [torch.zeros_like(parameter) for parameter in truth_parameters]
    for gradients, n_tokens, cosines in truth:
        kept = ["original"] + [name for name, cosine in cosines.items() if cosine >= thresholds[name]]
        for name in kept:
            for accumulator, gradient in zip(expected, gradients[name], strict=True):
                accumulator += gradient * n_tokens / len(kept) / total_tokens
    assert any(c < thresholds["text"] for c in text_cosines) and any(c >= thresholds["text"] for c in text_cosines)

    # ---- the plugin
    model = load_model(path, "sdpa")
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    state = CurriculumState(3, 1, ["a", "b", "c"])
    for index, (text_state, image_state) in enumerate(STRIDES):
        state.set(index, "text", text_state)
        state.set(index, "image", image_state)
    config = StepConfig(modalities=["text", "image"], thresholds=thresholds)
    batch_for_plugin = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    samples = BatchSplitter(model.config, tokenizer).split(batch_for_plugin, [0, 1, 2])
    family_of_model = family_for(model.config)
    mask, removal = family_of_model.reference_mask_builder(model), family_of_model.token_removal(model)
    keys = family_of_model.key_hiding(model)
    outcomes = [
        reference_sample_step(model, parameters, s, state, config, total_tokens, torch.bool, 0, mask, removal, keys)
        for s in samples
    ]

    for outcome, (_, n_tokens, cosines) in zip(outcomes, truth, strict=True):
        assert outcome.num_answer_tokens == n_tokens
        assert {copy.modality: copy.cosine for copy in outcome.copies} == pytest.approx(cosines, abs=1e-9)
        assert {copy.modality: copy.kept for copy in outcome.copies} == {
            name: cosine >= thresholds[name] for name, cosine in cosines.items()
        }
        for modality, before in zip(("text", "image"), STRIDES[outcome.index], strict=True):
            after = next_modality_state(before, cosines.get(modality), thresholds[modality])
            assert state.get(outcome.index, modality) == after
    for parameter, reference in zip(parameters, expected, strict=True):
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-7, atol=1e-12)


def split_sample(family: str, tiny_models: dict, workspace: Path, tmp_path: Path, size: int = 1):
    """The float64 model and the last sample of a real LLaMA-Factory batch of ``size``."""
    template, images = FAMILY_INPUTS[family]
    batch, tokenizer = llamafactory_batch(tiny_models[family], template, workspace, tmp_path, size=size, images=images)
    model = load_model(tiny_models[family], "sdpa").eval()
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    return model, BatchSplitter(model.config, tokenizer).split(batch, list(range(size)))[-1]


def plugin_copy_logits(model, sample, hidden: list[int], hidden_keys: list[int] = ()) -> torch.Tensor:
    """The reference step's logits of a copy at its kept tokens ``(K, V)`` (``hidden_keys``: Mllama's vision keys)."""
    from aimkp_plugin.method.step import copy_logits

    family = family_for(model.config)
    mask, removal, keys = family.reference_mask_builder(model), family.token_removal(model), family.key_hiding(model)
    with torch.no_grad():
        logits, _ = copy_logits(model, sample, hidden, torch.bool, mask, removal, keys, hidden_keys)
    if removal is not None:
        return logits[0]
    return logits[0, kept_positions(logits.shape[1], hidden)]


@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
def test_copy_logits_equal_the_model_on_the_sequence_with_the_hidden_tokens_deleted(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """The spec's definition of a copy (step 4): at every kept token, the reference step's logits equal one forward
    pass of the model on the sequence with the hidden tokens deleted and the kept tokens at their original position
    ids (float64, 1e-10). Attention masking gives that for pure-attention models; Qwen3.5's linear-attention layers
    need the tokens removed."""
    from aimkp_plugin.method.variants import hidden_for, hidden_keys_for

    model, sample = split_sample(family, tiny_models, cmkp_workspace, tmp_path)
    inputs = {key: value for key, value in sample.model_inputs.items() if key != "labels"}
    length = inputs["input_ids"].shape[1]
    inputs.setdefault("position_ids", torch.arange(length)[None])  # (Gemma 3's token_type_ids are among them)
    for modality in ("text", "image"):
        hidden, keys = hidden_for(sample.spans, modality, 2), hidden_keys_for(sample.spans, modality, 2)
        assert hidden or keys  # Mllama's image copy hides vision keys, no token
        deleted_keys = deleting_keys(model, keys) if keys else nullcontext()
        with torch.no_grad(), deleting(model, kept_positions(length, hidden)), deleted_keys:
            deleted = model(**inputs, use_cache=False).logits[0]
        torch.testing.assert_close(plugin_copy_logits(model, sample, hidden, keys), deleted, rtol=0, atol=1e-10)


def test_qwen3_5_copy_equals_the_model_called_on_the_deleted_embeddings(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Qwen3.5's copies against the plainest deletion there is, with no hook: the model called on the deleted
    sequence's input embeddings (the image features put in place by hand), the kept tokens' position ids and a mask
    of ones."""
    from aimkp_plugin.method.variants import hidden_for

    model, sample = split_sample("qwen3_5", tiny_models, cmkp_workspace, tmp_path)
    inputs = sample.model_inputs
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        image = (inputs["input_ids"] == model.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image, torch.cat(list(output.pooler_output)).to(embeds.dtype))
    for modality in ("text", "image"):
        hidden = hidden_for(sample.spans, modality, 2)
        keep = kept_positions(inputs["input_ids"].shape[1], hidden)
        with torch.no_grad():
            deleted = model(
                inputs_embeds=embeds[:, keep],
                position_ids=inputs["position_ids"][..., keep],
                attention_mask=torch.ones(1, len(keep), dtype=torch.long),
                use_cache=False,
            ).logits[0]
        torch.testing.assert_close(plugin_copy_logits(model, sample, hidden), deleted, rtol=0, atol=1e-10)


def test_per_token_keys_are_padded_to_the_input_ids(tiny_models: dict, cmkp_workspace: Path, tmp_path: Path) -> None:
    """LLaMA-Factory pads ``input_ids`` to a multiple (of 8 in training; 64 here) but Gemma 4's ``mm_token_type_ids``
    only to the longest sample: the splitter pads each row's to its ``input_ids``, aligned with the image tokens."""
    template, images = FAMILY_INPUTS["gemma4"]
    batch, tokenizer = llamafactory_batch(
        tiny_models["gemma4"], template, cmkp_workspace, tmp_path, size=2, images=images, pad_to_multiple_of=64
    )
    assert batch["mm_token_type_ids"].shape[1] < batch["input_ids"].shape[1]
    config = load_model(tiny_models["gemma4"], "sdpa").config
    for sample in BatchSplitter(config, tokenizer).split(batch, [0, 1]):
        types, ids = sample.model_inputs["mm_token_type_ids"], sample.model_inputs["input_ids"]
        assert types.shape == ids.shape and torch.equal(types == 1, ids == config.image_token_id)


@pytest.mark.compat
@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
def test_the_split_does_not_depend_on_the_collators_padding(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """A batch padded to a multiple of 64 (LLaMA-Factory pads training batches to a multiple of 8, and main also
    right-pads a shorter ``position_ids`` to the padded length) gives the same samples as the unpadded batch: the same
    inputs, positions included, and the same spans."""
    from transformers import AutoConfig

    template, images = FAMILY_INPUTS[family]
    config = AutoConfig.from_pretrained(tiny_models[family])
    samples = {}
    for multiple in (None, 64):
        batch, tokenizer = llamafactory_batch(
            tiny_models[family], template, cmkp_workspace, tmp_path / f"pad{multiple}", 2, images, multiple
        )
        samples[multiple] = BatchSplitter(config, tokenizer).split(batch, [0, 1])
    assert batch["input_ids"].shape[1] % 64 == 0
    for plain, padded in zip(samples[None], samples[64], strict=True):
        assert plain.spans == padded.spans and plain.model_inputs.keys() == padded.model_inputs.keys()
        for key, value in plain.model_inputs.items():
            assert torch.equal(value, padded.model_inputs[key]), key


@pytest.mark.e2e
@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("family", list(FAMILY_INPUTS))
def test_hidden_tokens_do_not_influence_the_kept_tokens(
    family: str, size: int, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
):
    """Perturbing a hidden token's input embedding moves no kept token's logits (1e-10); perturbing a kept one does.
    The sample comes from a batch of ``size`` (the second of two carries the first's padding until it is split).
    Mllama's image copy hides vision keys: there a hidden and a kept key's cross-attention states are perturbed."""
    from aimkp_plugin.method.variants import hidden_for, hidden_keys_for

    model, sample = split_sample(family, tiny_models, cmkp_workspace, tmp_path, size)
    for modality in ("text", "image"):
        hidden, keys = hidden_for(sample.spans, modality, 2), hidden_keys_for(sample.spans, modality, 2)
        name = "cross_attention_states" if keys else "inputs_embeds"
        if keys:
            span = [cell for image in sample.spans.images for grid in image.grids for cell in grid.positions]
        else:
            span = sample.spans.text if modality == "text" else sample.spans.image_positions
        kept = [position for position in span if position not in hidden + keys]
        logits = []
        for position in (None, (hidden + keys)[0], kept[0]):
            handle = None
            if position is not None:  # perturb what the LLM receives (image positions hold the vision features)

                def perturb(module, args, kwargs, position=position, name=name):
                    if kwargs.get(name) is None:  # Mllama's language model embeds its ids itself
                        kwargs = {**kwargs, name: module.embed_tokens(kwargs["input_ids"]), "input_ids": None}
                    values = kwargs[name].clone()
                    values.view(1, -1, values.shape[-1])[:, position] += 3.0  # Mllama's keys: (tiles, P, D)
                    return args, {**kwargs, name: values}

                handle = language_model_of(model).register_forward_pre_hook(perturb, with_kwargs=True)
            try:
                logits.append(plugin_copy_logits(model, sample, hidden, keys))
            finally:
                if handle is not None:
                    handle.remove()
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-10, msg=modality)
        assert (logits[2] - logits[0]).abs().max() > 1e-6, modality


@pytest.fixture(scope="module")
def llava_sample(tiny_models: dict, cmkp_workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    batch, tokenizer = llamafactory_batch(
        tiny_models["llava"], "llava", cmkp_workspace, tmp_path_factory.mktemp("ablation"), size=1
    )
    model = load_model(tiny_models["llava"], "sdpa").float()
    batch = {key: value.float() if key == "pixel_values" else value for key, value in batch.items()}
    return model, BatchSplitter(model.config, tokenizer).split(batch, [0])[0]


def run_visit(llava_sample, config: StepConfig, text_state: ModalityState, image_state: ModalityState, **span_changes):
    model, sample = llava_sample
    for name, value in span_changes.items():
        setattr(sample.spans, name, value)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in parameters:
        parameter.grad = None
    state = CurriculumState(1, 1, ["x"])
    state.set(0, "text", text_state)
    state.set(0, "image", image_state)
    outcome = reference_sample_step(model, parameters, sample, state, config, sample.num_answer_tokens, torch.bool)
    return outcome, state


def test_modalities_switch_masks_only_the_chosen_one(llava_sample) -> None:
    config = StepConfig(modalities=["text"], thresholds={"text": -1.0, "image": -1.0})
    outcome, state = run_visit(llava_sample, config, ModalityState(2), ModalityState(2))
    assert [copy.modality for copy in outcome.copies] == ["text"]
    assert state.get(0, "text") == ModalityState(4) and state.get(0, "image") == ModalityState(2)


def test_filter_off_keeps_disagreeing_copies_and_never_freezes(llava_sample) -> None:
    strict = {"text": 1.0, "image": 1.0}  # every copy disagrees with the filter on
    outcome, state = run_visit(llava_sample, StepConfig(["text", "image"], strict), ModalityState(2), ModalityState(2))
    assert [copy.kept for copy in outcome.copies] == [False, False]
    assert state.get(0, "text") == ModalityState(2, frozen=True)
    outcome, state = run_visit(
        llava_sample, StepConfig(["text", "image"], strict, filtering=False), ModalityState(2), ModalityState(2)
    )
    assert [copy.kept for copy in outcome.copies] == [True, True]
    assert state.get(0, "text") == ModalityState(4) and state.get(0, "image") == ModalityState(4)


def test_progressive_off_keeps_the_stride_fixed(llava_sample) -> None:
    config = StepConfig(["text", "image"], {"text": 1.0, "image": -1.0}, progressive=False)
    outcome, state = run_visit(llava_sample, config, ModalityState(2), ModalityState(2))
    assert {copy.modality: copy.stride for copy in outcome.copies} == {"text": 2, "image": 2}
    assert state.get(0, "text") == ModalityState(2) and state.get(0, "image") == ModalityState(2)


def test_sample_without_text_span_skips_that_modality(llava_sample) -> None:
    model, sample = llava_sample
    text = sample.spans.text
    try:
        config = StepConfig(["text", "image"], {"text": -1.0, "image": -1.0})
        outcome, state = run_visit(llava_sample, config, ModalityState(2), ModalityState(2), text=[])
        assert [copy.modality for copy in outcome.copies] == ["image"]
        assert state.get(0, "text") == ModalityState(2)  # untouched
    finally:
        sample.spans.text = text


def test_nan_cosine_is_logged_once_and_counts_as_disagreement(caplog) -> None:
    from aimkp_plugin.config import AimkpArguments
    from aimkp_plugin.integration.callback import AimkpCallback
    from aimkp_plugin.method.types import CopyOutcome, SampleOutcome

    callback = AimkpCallback(AimkpArguments(aimkp=True), ["a", "b"])
    for index in (0, 1):
        callback.record([SampleOutcome(index, 3, 1.0, [CopyOutcome("image", 2, math.nan, False)])])
    warnings = [record for record in caplog.records if "zero or non-finite gradient" in record.getMessage()]
    assert len(warnings) == 1
    metrics = callback.log_metrics()
    assert metrics["aimkp_image_keep_rate"] == 0.0 and metrics["aimkp_image_copies"] == 2


def test_resume_from_a_checkpoint_without_state_fails_clearly(tmp_path: Path) -> None:
    from aimkp_plugin.config import AimkpArguments
    from aimkp_plugin.integration.callback import AimkpCallback

    with pytest.raises(FileNotFoundError, match="has no aimkp_state.json"):
        AimkpCallback(AimkpArguments(aimkp=True), ["a"]).restore(str(tmp_path))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "gemma3", "llava_next", "mistral3", "pixtral"])
def test_image_that_does_not_fit_the_family_layout_is_an_error(
    family: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """One image token too few (LLaVA, InternVL, Mistral 3, Pixtral) or a wrong ``image_grid_thw`` (Qwen2-VL): the
    splitter names the sample, the family and the counts instead of masking the image some other way."""
    from transformers import AutoConfig

    from aimkp_plugin.families import ImageLayoutError

    template, images = FAMILY_INPUTS[family]
    batch, tokenizer = llamafactory_batch(tiny_models[family], template, cmkp_workspace, tmp_path, 1, images)
    config = AutoConfig.from_pretrained(tiny_models[family])
    if family == "qwen2_vl":
        batch["image_grid_thw"] = batch["image_grid_thw"] * torch.tensor([[1, 2, 1]])
        expected = r"training sample 7, image 1: the qwen2_vl model family .* 4 image tokens, but image_grid_thw"
    else:
        image_id = getattr(config, "image_token_index", None) or config.image_token_id
        first = int((batch["input_ids"][0] == image_id).nonzero()[0])
        batch["input_ids"][0, first] = tokenizer.pad_token_id
        count = int((batch["input_ids"][0] == image_id).sum())
        expected = rf"training sample 7, image 1: the {family} model family .* {count} image tokens"
    with pytest.raises(ImageLayoutError, match=expected):
        BatchSplitter(config, tokenizer).split(batch, [7])


def test_gemma3_hidden_image_token_is_invisible_inside_the_bidirectional_block(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Gemma 3's image tokens see each other both ways. In an image copy, a hidden image token must still influence
    no other token (neither the image tokens after it nor those before it), while a kept image token does reach the
    image tokens before it (the block stays bidirectional among the kept tokens)."""
    from aimkp_plugin.method.step import masked_inputs
    from aimkp_plugin.method.variants import hidden_for

    batch, tokenizer = llamafactory_batch(tiny_models["gemma3"], "gemma3", cmkp_workspace, tmp_path, size=1)
    model = load_model(tiny_models["gemma3"], "sdpa").eval()
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    sample = BatchSplitter(model.config, tokenizer).split(batch, [0])[0]
    image = sample.spans.image_positions
    hidden = hidden_for(sample.spans, "image", 2)
    inputs = masked_inputs(sample, hidden, torch.bool, family_for("gemma3").reference_mask_builder(model))

    def logits_with(position: int | None) -> torch.Tensor:
        def perturb(module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            embeds[:, position] += 3.0
            return args, {**kwargs, "inputs_embeds": embeds}

        handle = language_model_of(model).register_forward_pre_hook(perturb, with_kwargs=True)
        if position is None:
            handle.remove()
        try:
            with torch.no_grad():
                return model(**inputs).logits[0]
        finally:
            handle.remove()

    base = logits_with(None)
    others = [position for position in range(base.shape[0]) if position not in hidden]
    first_hidden = hidden[0]
    assert image[0] == first_hidden and any(position > first_hidden for position in image if position not in hidden)
    torch.testing.assert_close(logits_with(first_hidden)[others], base[others], rtol=0, atol=1e-10)
    last_kept = max(position for position in image if position not in hidden)
    earlier_kept = min(position for position in image if position not in hidden)
    assert (logits_with(last_kept)[earlier_kept] - base[earlier_kept]).abs().max() > 1e-6


@pytest.mark.parametrize("text_model", ["gemma2", "gemma"])
def test_paligemma_hidden_tokens_are_invisible_both_ways_in_the_prefix(
    text_model: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """PaliGemma's image block is its bidirectional prefix (token_type_ids 0, as LLaMA-Factory marks it). In a copy,
    a hidden image token (its feature changed) moves no kept token's logits: neither the kept image tokens before it,
    which see the whole block, nor those after it, nor the text; a hidden text token (its id changed) moves none
    either. A kept image token still reaches the kept image tokens before it, and a kept text token the tokens after
    it. Both copies equal the model run on the sequence with the hidden tokens deleted (its own masks, from the
    token_type_ids), for PaliGemma 2 (Gemma 2: a mask per layer type) and PaliGemma (Gemma: one mask)."""
    from aimkp_plugin.method.variants import hidden_for

    path = tiny_models["paligemma"]
    if text_model == "gemma":
        path = paligemma_gemma_model(path, tmp_path / "gemma")
    batch, tokenizer = llamafactory_batch(path, "paligemma", cmkp_workspace, tmp_path, size=1)
    model = load_model(path, "sdpa").eval()
    batch = {key: value.double() if key == "pixel_values" else value for key, value in batch.items()}
    sample = BatchSplitter(model.config, tokenizer).split(batch, [0])[0]
    ids = sample.model_inputs["input_ids"]
    length = ids.shape[1]

    def copy_with(hidden: list[int], feature_at: int | None = None, id_at: int | None = None) -> torch.Tensor:
        changed = sample
        if id_at is not None:  # another text token's id at id_at
            other = ids.clone()
            other[0, id_at] = ids[0, sample.spans.text[0]] if ids[0, id_at] != ids[0, sample.spans.text[0]] else 5
            changed = replace(sample, model_inputs={**sample.model_inputs, "input_ids": other})

        def perturb(module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            embeds[:, feature_at] += 3.0
            return args, {**kwargs, "inputs_embeds": embeds}

        handle = model.model.language_model.register_forward_pre_hook(perturb, with_kwargs=True)
        if feature_at is None:
            handle.remove()
        try:
            return plugin_copy_logits(model, changed, hidden)
        finally:
            handle.remove()

    inputs = {key: value for key, value in sample.model_inputs.items() if key != "labels"}
    inputs["position_ids"] = torch.arange(length)[None]
    for modality in ("image", "text"):
        hidden = hidden_for(sample.spans, modality, 2)
        kept = [position for position in range(length) if position not in hidden]
        with torch.no_grad(), deleting(model, kept_positions(length, hidden)):
            deleted = model(**inputs, use_cache=False).logits[0]
        base = copy_with(hidden)
        torch.testing.assert_close(base, deleted, rtol=0, atol=1e-10)
        span = sample.spans.image_positions if modality == "image" else sample.spans.text
        kept_in_span = [position for position in span if position not in hidden]
        first_kept, last_kept = kept_in_span[0], kept_in_span[-1]
        before = hidden[0]  # before every kept token of the span
        after = next(position for position in hidden if first_kept < position < last_kept)  # between kept ones
        assert before < first_kept
        for position in (before, after):
            moved = (
                copy_with(hidden, feature_at=position) if modality == "image" else copy_with(hidden, id_at=position)
            )
            torch.testing.assert_close(moved, base, rtol=0, atol=1e-10, msg=f"{modality} {position}")
        if modality == "image":  # the kept block stays bidirectional: the last kept image token reaches the first
            moved = copy_with(hidden, feature_at=last_kept)
            assert (moved[kept.index(first_kept)] - base[kept.index(first_kept)]).abs().max() > 1e-6
        else:  # a kept text token is seen causally, by the tokens after it only
            moved = copy_with(hidden, id_at=first_kept)
            earlier = kept.index(first_kept)
            torch.testing.assert_close(moved[:earlier], base[:earlier], rtol=0, atol=1e-10)
            assert (moved[kept.index(last_kept)] - base[kept.index(last_kept)]).abs().max() > 1e-6


def test_paligemma_prefix_other_than_the_image_block_is_refused(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """token_type_ids that put the prompt in PaliGemma's bidirectional prefix (the processor's convention, not
    LLaMA-Factory's) stop both steps with the reason, instead of masking another attention pattern."""
    from aimkp_plugin.families.paligemma import PrefixLayoutError

    model, sample = split_sample("paligemma", tiny_models, cmkp_workspace, tmp_path)
    family = family_for("paligemma")
    token_types = sample.model_inputs["token_type_ids"].clone()
    token_types[0, : sample.spans.text[-1] + 1] = 0
    prompt_prefix = replace(sample, model_inputs={**sample.model_inputs, "token_type_ids": token_types})
    with pytest.raises(PrefixLayoutError, match="must be exactly the image tokens"):
        family.reference_mask_builder(model)(prompt_prefix, [], torch.bool)
    with pytest.raises(PrefixLayoutError, match="marks other tokens"):
        family.encode_images(model, [prompt_prefix])


@pytest.mark.parametrize("template", ["paligemma", "paligemma_chat"])
def test_paligemma_image_comes_first_and_the_text_span_is_the_post_text(
    template: str, tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Both PaliGemma templates put the image's 16 tokens first, then ``<bos>``; the text span is exactly the post
    text, also where ``paligemma_chat`` puts its turn header (``<start_of_turn>user\\n``) between image and text."""
    from transformers import AutoConfig

    batch, tokenizer = llamafactory_batch(tiny_models["paligemma"], template, cmkp_workspace, tmp_path, size=2)
    posts = [post for _, post in iter_records(cmkp_workspace / "raw" / "test_src.txt")][:2]
    config = AutoConfig.from_pretrained(tiny_models["paligemma"])
    for sample, post in zip(BatchSplitter(config, tokenizer).split(batch, [0, 1]), posts, strict=True):
        ids = sample.model_inputs["input_ids"][0]
        assert sample.spans.image_positions == list(range(16)) and int(ids[16]) == tokenizer.bos_token_id
        assert ids[sample.spans.text].tolist() == tokenizer.encode(post.text, add_special_tokens=False)
        assert sample.spans.instruction_found


def test_paligemma_runs_need_a_paligemma_template() -> None:
    """Only LLaMA-Factory's PaliGemma templates put the image before ``<bos>`` and mark the prefix (token_type_ids,
    which PaliGemma requires in training); another template stops before the model loads, naming the fix."""
    family = family_for("paligemma")
    for template in ("paligemma", "paligemma_chat"):
        assert family.run_problems({}, {"template": template}.get) == []
    [problem] = family.run_problems({}, {"template": "gemma3"}.get)
    assert problem.startswith("template: gemma3 does not lay out PaliGemma's images")
    assert "Set template: paligemma" in problem


def test_llama4_hidden_cells_of_every_tile_and_the_global_view_reach_no_kept_token(
    tiny_models: dict, cmkp_workspace: Path, tmp_path: Path
) -> None:
    """Llama 4's image: 2×2 tiles and the global view, each a 4×4 grid between visible separators, across several
    attention chunks. In an image copy, all hidden cells of all grids perturbed at once move no kept token's logits
    (chunked and NoPE layers alike), while the separators and ``<|image|>`` (visible, not grid cells) and a kept cell
    of the global view do move the tokens after them."""
    from aimkp_plugin.method.variants import hidden_for

    model, sample = split_sample("llama4", tiny_models, cmkp_workspace, tmp_path)
    grids = [grid for image in sample.spans.images for grid in image.grids]
    assert len(grids) == 5 and all((grid.height, grid.width) == (4, 4) for grid in grids)  # 2×2 tiles + global view
    chunk = model.config.get_text_config().attention_chunk_size
    assert grids[-1].positions[-1] // chunk > grids[0].positions[0] // chunk  # the image spans several chunks
    hidden = hidden_for(sample.spans, "image", 2)
    assert all(len(set(grid.positions) - set(hidden)) == 4 for grid in grids)  # the 2-D rule per grid
    ids = sample.model_inputs["input_ids"][0]
    image_id = model.config.image_token_id
    first, last = grids[0].positions[0], grids[-1].positions[-1]
    markers = [position for position in range(first, last) if int(ids[position]) != image_id]
    assert len(markers) == 5  # tile_x, tile_y, tile_x, tile_y, <|image|>

    def logits_with(positions: list[int]) -> torch.Tensor:
        def perturb(module, args, kwargs):
            embeds = kwargs["inputs_embeds"].clone()
            embeds[:, positions] += 3.0
            return args, {**kwargs, "inputs_embeds": embeds}

        handle = language_model_of(model).register_forward_pre_hook(perturb, with_kwargs=True)
        try:
            return plugin_copy_logits(model, sample, hidden)
        finally:
            handle.remove()

    base = logits_with([])
    torch.testing.assert_close(logits_with(hidden), base, rtol=0, atol=1e-10)
    assert (logits_with(markers) - base).abs().max() > 1e-6
    kept_global = [position for position in grids[-1].positions if position not in hidden]
    assert (logits_with(kept_global[:1]) - base).abs().max() > 1e-6
