"""Where the post text sits inside the token ids actually fed to the model.

- Image tokens: the positions holding the model's image token id before the answer, in contiguous blocks (one per
  image); runs parted only by a family's break tokens (Pixtral's ``[IMG_BREAK]`` after each row) are one block, the
  break tokens not in it. What grid a block forms is the model family's business (``aimkp_plugin.families``).
- Text: the tokens after the last image block (the special tokens closing the image, and a chat turn's header
  where the image comes before the turn, as in PaliGemma's chat template) up to the instruction,
  found by its token ids; whitespace-only tokens at either end (the newline before the instruction, Gemma 3's blank
  line after the image) are left out. If the
  instruction cannot be found, the span runs to the next special token or the first answer token (and the caller is
  told). A sample without image tokens has no anchor, so its text span is empty (neither modality is masked for it).

Pure Python; nothing here imports torch, a model family or LLaMA-Factory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TextSpan:
    positions: list[int]
    instruction_found: bool


def answer_start_of(labels: Sequence[int], ignore_index: int = -100) -> int:
    """The position of the first answer token (the length when there is none)."""
    return next((index for index, label in enumerate(labels) if label != ignore_index), len(labels))


def contiguous_blocks(positions: Sequence[int]) -> list[list[int]]:
    blocks: list[list[int]] = []
    for position in positions:
        if blocks and position == blocks[-1][-1] + 1:
            blocks[-1].append(position)
        else:
            blocks.append([position])
    return blocks


def image_blocks(
    input_ids: Sequence[int], answer_start: int, image_token_id: int, breaks: frozenset[int] = frozenset()
) -> list[list[int]]:
    """The contiguous runs of ``image_token_id`` before the answer: one per image, in order. Runs parted only by
    tokens of ``breaks`` (row breaks inside one image) form one block; the break tokens are not in it."""
    blocks = contiguous_blocks([index for index in range(answer_start) if input_ids[index] == image_token_id])
    joined: list[list[int]] = []
    for block in blocks:
        gap = range(joined[-1][-1] + 1, block[0]) if joined else range(0)
        if joined and len(gap) and all(input_ids[index] in breaks for index in gap):
            joined[-1].extend(block)
        else:
            joined.append(block)
    return joined


def find_subsequence(sequence: Sequence[int], pattern: Sequence[int], start: int, end: int) -> int:
    """Index of the last occurrence of ``pattern`` within ``sequence[start:end]``, or -1."""
    width = len(pattern)
    if width == 0:
        return -1
    for index in range(end - width, start - 1, -1):
        if list(sequence[index : index + width]) == list(pattern):
            return index
    return -1


def find_text_span(
    input_ids: Sequence[int],
    answer_start: int,
    last_image_token: int | None,
    skip_after_image: set[int],
    instructions: Sequence[Sequence[int]],
    is_whitespace: Callable[[int], bool],
    headers: Sequence[Sequence[int]] = (),
) -> TextSpan:
    """Locate the post text of one unpadded sample, anchored after ``last_image_token`` (None: no image, no span).

    ``skip_after_image`` are special token ids (e.g. ``<|vision_end|>`` closing the image, ``<|im_end|>`` closing the
    user turn); ``instructions`` are the candidate token-id sequences of the instruction, tried in order;
    ``is_whitespace`` tells whether a token decodes to whitespace only; ``headers`` are token-id sequences of a chat
    turn's header that may follow those special tokens (PaliGemma's ``user\n`` after ``<start_of_turn>``), skipped
    once, the first that matches.
    """
    if last_image_token is None:  # the text is anchored on the image; without one its start is unknown
        return TextSpan([], False)
    ids = list(input_ids)
    start = last_image_token + 1
    while start < answer_start and ids[start] in skip_after_image:
        start += 1
    header = next((len(h) for h in headers if h and ids[start : start + len(h)] == list(h)), 0)
    start = min(start + header, answer_start)
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
    while start < end and is_whitespace(ids[start]):  # e.g. Gemma 3's "\n\n" after <end_of_image>
        start += 1
    return TextSpan(list(range(start, end)), found)
