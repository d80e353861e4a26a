"""Modality spans: where the post text and the image tokens are inside the token ids actually fed to the model.

- Image tokens: the positions holding the model's image token id, in contiguous blocks (one per image). A block's
  grid comes from the model family: LLaVA-1.5 a square grid (24×24 at 336 px), Qwen2-VL / Qwen2.5-VL
  ``(grid_h / merge) × (grid_w / merge)`` from ``image_grid_thw``. Other layouts get no grid and are masked with a
  1-D stride over their tokens (the documented fallback).
- Text: the tokens after the last image token (and the special tokens closing the image) up to the instruction,
  found by its token ids; trailing whitespace-only tokens (the newline before the instruction) are left out. If the
  instruction cannot be found, the span runs to the next special token or the first answer token (and the
  caller is told). A sample
  without image tokens has no anchor, so its text span is empty (neither modality is masked for it).

Pure Python / torch; nothing here imports LLaMA-Factory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageSpan:
    positions: list[int]
    grid: tuple[int, int] | None  # (rows, cols) of the LLM-side image tokens, or None for the 1-D fallback


@dataclass
class ModalitySpans:
    text: list[int] = field(default_factory=list)
    images: list[ImageSpan] = field(default_factory=list)
    instruction_found: bool = True

    @property
    def image_positions(self) -> list[int]:
        return [position for image in self.images for position in image.positions]


def image_token_id_of(config: object) -> int | None:
    """The image placeholder token id of a model config (LLaVA: ``image_token_index``, Qwen: ``image_token_id``)."""
    for name in ("image_token_index", "image_token_id"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def contiguous_blocks(positions: Sequence[int]) -> list[list[int]]:
    blocks: list[list[int]] = []
    for position in positions:
        if blocks and position == blocks[-1][-1] + 1:
            blocks[-1].append(position)
        else:
            blocks.append([position])
    return blocks


def find_subsequence(sequence: Sequence[int], pattern: Sequence[int], start: int, end: int) -> int:
    """Index of the last occurrence of ``pattern`` within ``sequence[start:end]``, or -1."""
    width = len(pattern)
    if width == 0:
        return -1
    for index in range(end - width, start - 1, -1):
        if list(sequence[index : index + width]) == list(pattern):
            return index
    return -1


def square_grid(count: int) -> tuple[int, int] | None:
    side = math.isqrt(count)
    return (side, side) if side * side == count else None


def find_spans(
    input_ids: Sequence[int],
    labels: Sequence[int],
    image_token_id: int | None,
    grids: Sequence[tuple[int, int] | None] | None,
    skip_after_image: set[int],
    instructions: Sequence[Sequence[int]],
    is_whitespace: Callable[[int], bool],
    ignore_index: int = -100,
) -> ModalitySpans:
    """Locate the text and image spans of one unpadded sample.

    ``grids`` gives one grid per image block (None entries, or None for all, mean the 1-D fallback);
    ``skip_after_image`` are special token ids (e.g. ``<|vision_end|>`` closing the image, ``<|im_end|>`` closing
    the user turn); ``instructions`` are the
    candidate token-id sequences of the instruction, tried in order; ``is_whitespace`` tells whether a token decodes
    to whitespace only.
    """
    ids = list(input_ids)
    answer_start = next((index for index, label in enumerate(labels) if label != ignore_index), len(ids))
    image_positions = [
        index for index in range(answer_start) if image_token_id is not None and ids[index] == image_token_id
    ]
    blocks = contiguous_blocks(image_positions)
    images = [
        ImageSpan(block, grids[number] if grids is not None and number < len(grids) else None)
        for number, block in enumerate(blocks)
    ]
    if not blocks:  # the text is anchored on the image; without one its start is unknown
        return ModalitySpans(text=[], images=[], instruction_found=False)
    start = blocks[-1][-1] + 1
    while start < answer_start and ids[start] in skip_after_image:
        start += 1
    end, found = answer_start, False
    for pattern in instructions:
        index = find_subsequence(ids, pattern, start, answer_start)
        if index >= 0:
            end, found = index, True
            break
    if not found:  # at least stop before the chat template's closing special token, if it has one
        end = next((index for index in range(start, answer_start) if ids[index] in skip_after_image), answer_start)
    while end > start and is_whitespace(ids[end - 1]):
        end -= 1
    return ModalitySpans(text=list(range(start, end)), images=images, instruction_found=found)
