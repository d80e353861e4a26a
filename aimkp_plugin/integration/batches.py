"""From LLaMA-Factory's padded SFT batches to unpadded per-sample inputs with their modality spans.

Batch layouts (``SFTDataCollatorWith4DAttentionMask``, llamafactory 0.9.5 and main): ``input_ids``,
``attention_mask`` (2-D 0/1), ``labels``, ``pixel_values`` (the images' rows one after the other: how many rows an
image takes is its model family's answer), per-image keys such as Qwen's ``image_grid_thw`` (one row per image), and
for multimodal rope ``position_ids`` (rows, B, L) with ``rope_deltas``. Every per-token key is cut to the sample's
``attention_mask``, so padding to a multiple of 8 (and main's right-padding of a shorter ``position_ids``) never
reaches a sample.

Images belong to samples in order; each image is one contiguous block of image tokens in its sample (its rows parted
only by the family's break tokens, Pixtral's ``[IMG_BREAK]``). The family (``aimkp_plugin.families``) turns each
block into its grid or grids; a block that does not fit is an error naming the sample, the family and the counts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..data.cmkp import DEFAULT_INSTRUCTION
from ..data.spans import answer_start_of, find_text_span, image_blocks
from ..families import ImageLayoutError, ModelFamily, family_for
from ..method.types import ModalitySpans, SampleInputs


logger = logging.getLogger("llamafactory.aimkp")

# attention_mask is rebuilt per sample; rope_deltas only serves generation
COMMON_KEYS = ("input_ids", "labels", "attention_mask", "rope_deltas", "pixel_values", "position_ids")
_known_instructions: set[str] = {DEFAULT_INSTRUCTION}


class UnsupportedBatchError(ValueError):
    """A batch holds inputs the AimKP step does not know how to split per sample."""


def register_instruction(instruction: str) -> None:
    """Make an instruction findable as the end anchor of the text span (called for every cmkp dataset loaded)."""
    _known_instructions.add(instruction)


class BatchSplitter:
    """Splits a padded batch into per-sample :class:`SampleInputs`, locating the text and image spans."""

    def __init__(self, model_config: Any, tokenizer: Any, family: ModelFamily | None = None) -> None:
        self.config = model_config
        self.family = family if family is not None else family_for(model_config)
        self.image_token_id = self.family.image_token_id(model_config)
        if self.image_token_id is None:
            raise UnsupportedBatchError(f"model_type {self.family.name} has no image token id; AimKP needs images.")
        self.known_keys = set(COMMON_KEYS) | set(self.family.per_image_keys) | set(self.family.per_token_keys)
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.special_ids = set(self.tokenizer.all_special_ids) | {
            token_id for token_id, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        self.special_ids.discard(self.image_token_id)
        self.break_ids = frozenset(self.token_id(token) for token in self.family.image_break_tokens)
        self.warned_instruction = False
        self.instructions = self.instruction_patterns()
        self.headers = [self.tokenizer.encode(text, add_special_tokens=False) for text in self.family.text_headers]

    def token_id(self, token: str) -> int:
        """The id of one of the family's special tokens; an error when the tokenizer lacks it."""
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise UnsupportedBatchError(f"aimkp: the {self.family.name} model family needs the token {token}.")
        return int(token_id)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one splitter per training run
    def is_whitespace(self, token_id: int) -> bool:
        return self.tokenizer.decode([token_id]).strip() == ""

    def instruction_patterns(self) -> list[list[int]]:
        """Token ids of each known instruction, as encoded alone and as encoded after a newline."""
        patterns: list[list[int]] = []
        for instruction in sorted(_known_instructions):
            alone = self.tokenizer.encode(instruction, add_special_tokens=False)
            after_newline = self.tokenizer.encode("\n" + instruction, add_special_tokens=False)
            while after_newline and self.is_whitespace(after_newline[0]):
                after_newline = after_newline[1:]
            for pattern in (alone, after_newline):
                if pattern and pattern not in patterns:
                    patterns.append(pattern)
        return patterns

    def split(self, batch: dict[str, Any], indices: Sequence[int]) -> list[SampleInputs]:
        unknown = set(batch) - self.known_keys
        if unknown:
            raise UnsupportedBatchError(
                f"aimkp: the batch of model_type {self.family.name} holds {sorted(unknown)}, which the AimKP step "
                "cannot split per sample yet."
            )
        attention_mask = batch.get("attention_mask")
        rows, image_count = [], 0  # per sample: (visible, ids, labels, its image numbers in the batch, spans, ids and
        # labels as lists)
        pixel_offsets = [0]  # where each image's rows start in pixel_values
        for row, index in enumerate(indices):
            visible = attention_mask[row].bool() if attention_mask is not None else slice(None)
            ids, labels = batch["input_ids"][row][visible], batch["labels"][row][visible]
            id_list, label_list = ids.tolist(), labels.tolist()
            answer_start = answer_start_of(label_list)
            blocks = image_blocks(id_list, len(id_list), self.image_token_id, self.break_ids)  # every image
            numbers = range(image_count, image_count + len(blocks))
            image_count += len(blocks)
            per_image = [self.image_inputs(batch, number) for number in numbers]
            prompt = [slot for slot, block in enumerate(blocks) if block[0] < answer_start]  # images before the answer
            spans = self.spans(
                int(index),
                id_list,
                answer_start,
                [blocks[slot] for slot in prompt],
                [per_image[slot] for slot in prompt],
            )
            rows.append((visible, ids, labels, numbers, spans, id_list, label_list))
            for block, inputs in zip(blocks, per_image, strict=True):
                pixel_offsets.append(pixel_offsets[-1] + self.family.pixel_rows(self.config, len(block), inputs))
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None and image_count and pixel_offsets[-1] != pixel_values.shape[0]:
            raise ImageLayoutError(
                f"aimkp: the batch's {image_count} images of model family {self.family.name} need "
                f"{pixel_offsets[-1]} rows of pixel_values, but it has {pixel_values.shape[0]}."
            )
        samples = []
        for row, (index, (visible, ids, labels, numbers, spans, id_list, label_list)) in enumerate(
            zip(indices, rows, strict=True)
        ):
            inputs: dict[str, torch.Tensor] = {"input_ids": ids[None], "labels": labels[None]}
            if numbers and pixel_values is not None:
                inputs["pixel_values"] = pixel_values[pixel_offsets[numbers.start] : pixel_offsets[numbers.stop]]
                for key in self.family.per_image_keys:
                    if key in batch:
                        inputs[key] = batch[key][numbers.start : numbers.stop]
            for key in self.family.per_token_keys:
                if key in batch:
                    inputs[key] = self.per_token(batch[key][row], batch["input_ids"].shape[1])[visible][None]
            positions = batch.get("position_ids")
            if positions is not None:  # (rows, B, L) multimodal rope positions or (B, L)
                selected = positions[:, row : row + 1] if positions.dim() == 3 else positions[row : row + 1]
                inputs["position_ids"] = selected[..., visible]
            samples.append(SampleInputs(int(index), inputs, spans, id_list, label_list))
        return samples

    def per_token(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """One row of a per-token key at ``input_ids``' padded ``length``: LLaMA-Factory 0.9.5's collator pads
        ``mm_token_type_ids`` to the longest sample only, and ``input_ids`` further (to a multiple of 8 in training);
        the missing padding (0, on the tokenizer's padding side) is added."""
        missing = length - values.shape[0]
        if missing <= 0:
            return values
        padding = values.new_zeros(missing, *values.shape[1:])  # Mllama's cross_attention_mask: (L, images, tiles)
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        return torch.cat([padding, values] if left else [values, padding])

    def image_inputs(self, batch: dict[str, Any], number: int) -> dict[str, torch.Tensor]:
        """The per-image keys (e.g. ``image_grid_thw``) of the batch's image ``number``, as one-row tensors."""
        return {key: batch[key][number : number + 1] for key in self.family.per_image_keys if key in batch}

    def spans(
        self, index: int, ids: list[int], answer_start: int, blocks: list[list[int]], per_image: list[dict]
    ) -> ModalitySpans:
        images = []
        for number, (block, inputs) in enumerate(zip(blocks, per_image, strict=True)):
            try:
                images.append(self.family.image_span(self.config, block, inputs))
            except ImageLayoutError as err:
                raise ImageLayoutError(
                    f"aimkp: training sample {index}, image {number + 1}: the {self.family.name} model family "
                    f"expects another layout: {err}."
                ) from None
        text = find_text_span(
            ids,
            answer_start,
            blocks[-1][-1] if blocks else None,
            self.special_ids,
            self.instructions,
            self.is_whitespace,
            self.headers,
        )
        if blocks and not text.instruction_found and not self.warned_instruction:
            self.warned_instruction = True
            logger.warning(
                "aimkp-plugin: the instruction was not found in a sample; its text span runs to the answer "
                "(the instruction and the chat template's suffix are then masked as text too)."
            )
        return ModalitySpans(text=text.positions, images=images, instruction_found=text.instruction_found)
