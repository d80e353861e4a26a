"""The spec's rules, checked one by one: mask geometry, stride transitions, cosines, and span finding."""

from __future__ import annotations

import math

import pytest
import torch

from aimkp_plugin.data.spans import answer_start_of, find_text_span, image_blocks
from aimkp_plugin.families import family_for
from aimkp_plugin.method.filtering import gradient_cosine, keep_copy
from aimkp_plugin.method.masking import (
    hidden_positions,
    image_keep_offsets,
    text_keep_offsets,
    visibility_attention_mask,
)
from aimkp_plugin.method.state import CurriculumState, ModalityState, StateMismatchError, next_modality_state
from aimkp_plugin.method.types import ImageSpan, ModalitySpans, TokenGrid
from aimkp_plugin.method.variants import hidden_for


# ---------------------------------------------------------------- geometry


def spec_text_rule(length: int, stride: int) -> list[int]:
    """The spec read literally: positions p with (p + 1) mod γ = 0; if γ > L only the last token."""
    if stride > length:
        return [length - 1]
    return [p for p in range(length) if (p + 1) % stride == 0]


@pytest.mark.parametrize("length", [1, 4, 7, 10, 27])
@pytest.mark.parametrize("stride", [1, 2, 3, 5, 64])
def test_text_mask_keeps_every_gamma_th_token(length: int, stride: int) -> None:
    assert text_keep_offsets(length, stride) == spec_text_rule(length, stride)


def test_text_mask_examples() -> None:
    assert text_keep_offsets(10, 3) == [2, 5, 8]
    assert text_keep_offsets(10, 11) == [9]
    assert text_keep_offsets(0, 2) == []


@pytest.mark.parametrize(("stride", "count"), [(1, 576), (2, 144), (4, 36), (8, 9), (16, 1), (32, 1)])
def test_image_mask_on_llava_grid_matches_the_spec_counts(stride: int, count: int) -> None:
    kept = image_keep_offsets(24, 24, stride)
    assert len(kept) == count
    for offset in kept:
        row, col = divmod(offset, 24)
        assert stride == 1 or (row % stride == stride - 1 and col % stride == stride - 1) or offset == 575


def test_image_mask_worked_cells() -> None:
    assert image_keep_offsets(24, 24, 16) == [15 * 24 + 15]
    assert image_keep_offsets(24, 24, 32) == [575]  # the last image token
    assert image_keep_offsets(24, 24, 8) == [r * 24 + c for r in (7, 15, 23) for c in (7, 15, 23)]


@pytest.mark.parametrize(("height", "width"), [(6, 10), (10, 6), (3, 17), (8, 8)])
@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
def test_image_mask_on_non_square_qwen_grids(height: int, width: int, stride: int) -> None:
    expected = [
        row * width + col
        for row in range(height)
        for col in range(width)
        if row % stride == stride - 1 and col % stride == stride - 1
    ]
    assert image_keep_offsets(height, width, stride) == (expected or [height * width - 1])


def test_hidden_positions_are_the_span_minus_kept() -> None:
    assert hidden_positions([10, 11, 12, 13], [1, 3]) == [10, 12]


def test_attention_mask_hides_columns_and_keeps_causality() -> None:
    mask = visibility_attention_mask(5, [1, 3], torch.float32)[0, 0]
    allowed = mask == 0
    expected = torch.ones(5, 5, dtype=torch.bool).tril()
    expected[:, [1, 3]] = False
    expected[1, 1] = expected[3, 3] = True  # a hidden token only sees itself; nobody sees it
    assert torch.equal(allowed, expected)
    assert mask.min() == torch.finfo(torch.float32).min
    assert torch.equal(visibility_attention_mask(5, [1, 3], torch.bool)[0, 0], expected)


# ---------------------------------------------------------------- stride rules


@pytest.mark.parametrize(
    ("before", "cosine", "after"),
    [
        (ModalityState(1), None, ModalityState(2)),
        (ModalityState(1), 0.9, ModalityState(2)),
        (ModalityState(2), 0.5, ModalityState(4)),
        (ModalityState(8), 0.11, ModalityState(16)),
        (ModalityState(2), 0.1, ModalityState(2, frozen=True)),  # c == tau freezes, at max(2/2, 2) = 2
        (ModalityState(4), 0.1, ModalityState(2, frozen=True)),
        (ModalityState(16), -0.3, ModalityState(8, frozen=True)),
        (ModalityState(8), math.nan, ModalityState(4, frozen=True)),  # NaN counts as disagreement
        (ModalityState(4, frozen=True), 0.9, ModalityState(4, frozen=True)),
        (ModalityState(4, frozen=True), -0.9, ModalityState(4, frozen=True)),
        (ModalityState(4), None, ModalityState(4)),
    ],
)
def test_stride_transition_table(before: ModalityState, cosine: float | None, after: ModalityState) -> None:
    assert next_modality_state(before, cosine, threshold=0.1) == after


def test_fixed_stride_ablation_never_moves() -> None:
    assert next_modality_state(ModalityState(1), None, 0.1, progressive=False) == ModalityState(1)
    assert next_modality_state(ModalityState(2), -1.0, 0.1, progressive=False) == ModalityState(2)


def test_filter_keeps_copies_at_or_above_threshold() -> None:
    assert keep_copy(0.4, 0.4) and keep_copy(0.41, 0.4) and not keep_copy(0.39, 0.4)
    assert not keep_copy(math.nan, -1.0)
    assert keep_copy(-1.0, 0.4, filtering=False)


# ---------------------------------------------------------------- cosine


def test_cosine_over_parameter_lists_matches_flat_cosine() -> None:
    generator = torch.Generator().manual_seed(0)
    first = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    second = [torch.randn(3, 4, generator=generator), torch.randn(5, generator=generator)]
    flat = torch.nn.functional.cosine_similarity(
        torch.cat([t.flatten() for t in first]), torch.cat([t.flatten() for t in second]), dim=0
    )
    assert gradient_cosine(first, second) == pytest.approx(float(flat), abs=1e-6)


def test_cosine_is_nan_for_zero_or_non_finite_gradients() -> None:
    assert math.isnan(gradient_cosine([torch.zeros(3)], [torch.ones(3)]))
    assert math.isnan(gradient_cosine([torch.tensor([1.0, math.nan])], [torch.ones(2)]))


def test_cosine_of_bf16_gradients_is_computed_in_float32() -> None:
    first = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)]
    assert gradient_cosine(first, first) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- state file


def test_a_second_visit_in_the_same_epoch_does_not_move_the_curriculum(tmp_path) -> None:
    state = CurriculumState(2, 1)
    assert state.first_visit(0, epoch=0) and not state.first_visit(0, epoch=0)
    assert state.first_visit(0, epoch=1)
    other = CurriculumState(2, 1)
    other.apply([], visits=[(1, 3)])
    assert not other.first_visit(1, epoch=3) and other.first_visit(1, epoch=4)
    state.save(tmp_path)
    restored = CurriculumState(2, 1)
    restored.load_matching(tmp_path / "aimkp_state.json")
    assert restored.last_epoch.tolist() == [1, -1]


def test_state_round_trip_and_matching_by_fingerprint(tmp_path) -> None:
    state = CurriculumState(3, init_stride=1, fingerprints=["a", "b", "c"])
    state.set(1, "text", ModalityState(4))
    state.set(2, "image", ModalityState(2, frozen=True))
    path = state.save(tmp_path)
    same = CurriculumState(3, 1, ["a", "b", "c"])
    assert same.load_matching(path) == 3
    assert torch.equal(same.stride, state.stride) and torch.equal(same.frozen, state.frozen)
    shuffled = CurriculumState(4, 1, ["c", "x", "b", "a"])
    assert shuffled.load_matching(path) == 3
    assert shuffled.get(2, "text") == ModalityState(4) and shuffled.get(0, "image") == ModalityState(2, True)
    assert shuffled.get(1, "text") == ModalityState(1)
    with pytest.raises(StateMismatchError, match="none of its 3 samples matches"):
        CurriculumState(2, 1, ["y", "z"]).load_matching(path)


# ---------------------------------------------------------------- spans


def spans_of(ids: list[int], labels: list[int], image: int, skip: set[int], instructions, whitespace=()):
    """Image blocks and the text span, as the batch splitter finds them."""
    start = answer_start_of(labels)
    blocks = image_blocks(ids, start, image)
    text = find_text_span(
        ids, start, blocks[-1][-1] if blocks else None, skip, instructions, set(whitespace).__contains__
    )
    return blocks, text


def test_spans_llava_layout() -> None:
    image, newline, *instruction = 99, 5, 40, 41, 42
    ids = [1, 2, 3] + [image] * 4 + [7, 8, 9, newline] + instruction + [50, 51, 52]
    labels = [-100] * (len(ids) - 2) + [51, 52]
    blocks, text = spans_of(ids, labels, image, set(), [instruction], {newline})
    assert text.positions == [7, 8, 9] and text.instruction_found
    assert blocks == [[3, 4, 5, 6]]
    span = family_for("llava").image_span(None, blocks[0], {})
    assert span.grid == (2, 2) and span.grids[0].positions == (3, 4, 5, 6)


def test_spans_qwen_layout_skips_vision_end_and_finds_several_images() -> None:
    pad, start, end = 99, 97, 98
    ids = [1, start, pad, pad, end, start, pad, pad, pad, end, 7, 8, 40, 41, 60, 61]
    labels = [-100] * 15 + [61]
    blocks, text = spans_of(ids, labels, pad, {end}, [[40, 41]])
    assert blocks == [[2, 3], [6, 7, 8]]
    assert text.positions == [10, 11]


def test_spans_without_instruction_run_to_the_answer() -> None:
    blocks, text = spans_of([9, 9, 7, 8, 60], [-100, -100, -100, -100, 60], 9, set(), [[40]])
    assert text.positions == [2, 3] and not text.instruction_found and blocks == [[0, 1]]


def test_spans_without_instruction_stop_at_the_template_special_token() -> None:
    pad, end, im_end = 99, 98, 90
    ids = [1, pad, end, 7, 8, im_end, 5, 60]
    _, text = spans_of(ids, [-100] * 7 + [60], pad, {end, im_end}, [[40]])
    assert text.positions == [3, 4] and not text.instruction_found


def test_spans_without_image_have_no_text_anchor() -> None:
    blocks, text = spans_of([1, 2, 3, 4], [-100, -100, -100, 4], 9, set(), [[3]])
    assert text.positions == [] and blocks == []


def test_generic_family_masks_every_gamma_th_image_token() -> None:
    span = family_for("no_such_model").image_span(None, [3, 4, 5, 6, 7], {})
    assert span.grids is None
    spans = ModalitySpans(text=[], images=[span])
    assert hidden_for(spans, "image", 2) == [3, 5, 7]


def test_tiled_image_applies_the_rule_per_tile_and_leaves_other_image_tokens_visible() -> None:
    """Two 2×2 tiles with a separator token between them: each tile keeps its (1, 1) cell at γ=2 and its last cell
    at γ=4 (the rule keeps nothing there); the separator is never hidden."""
    tiles = (TokenGrid(2, 2, (10, 11, 12, 13)), TokenGrid(2, 2, (15, 16, 17, 18)))
    spans = ModalitySpans(images=[ImageSpan(list(range(10, 19)), tiles)])
    assert hidden_for(spans, "image", 2) == [10, 11, 12, 15, 16, 17]
    assert hidden_for(spans, "image", 4) == [10, 11, 12, 15, 16, 17]
    assert 14 not in hidden_for(spans, "image", 8)


def test_spans_leave_out_whitespace_at_both_ends() -> None:
    """Gemma 3 puts a blank line between ``<end_of_image>`` and the post text: it is not post text."""
    image, end_of_image, blank, newline, *instruction = 99, 98, 6, 5, 40, 41
    ids = [1, image, image, end_of_image, blank, 7, 8, newline] + instruction + [50]
    _, text = spans_of(ids, [-100] * (len(ids) - 1) + [50], image, {end_of_image}, [instruction], {blank, newline})
    assert text.positions == [5, 6] and text.instruction_found
