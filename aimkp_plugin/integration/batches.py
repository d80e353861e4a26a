"""From LLaMA-Factory's padded SFT batches to unpadded per-sample inputs with their modality spans.

Batch layouts (``SFTDataCollatorWith4DAttentionMask``, llamafactory 0.9.5):

- LLaVA: ``input_ids``, ``attention_mask`` (2-D 0/1), ``labels``, ``pixel_values`` (one row per image);
- Qwen2-VL / Qwen2.5-VL: also ``position_ids`` (4, B, L) or (3, B, L), ``rope_deltas``, ``image_grid_thw`` (one row
  per image) and ``pixel_values`` (patches × features, images one after the other).

Images belong to samples in order; each image is one contiguous block of image tokens in its sample.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..data.cmkp import DEFAULT_INSTRUCTION
from ..data.spans import ModalitySpans, contiguous_blocks, find_spans, image_token_id_of, square_grid
from ..method.step import SampleInputs


logger = logging.getLogger("llamafactory.aimkp")

GRID_FAMILIES = {"llava": "square", "qwen2_vl": "thw", "qwen2_5_vl": "thw"}
# attention_mask is rebuilt per sample; rope_deltas only serves generation
KNOWN_KEYS = ("input_ids", "labels", "attention_mask", "rope_deltas", "pixel_values", "image_grid_thw", "position_ids")
_known_instructions: set[str] = {DEFAULT_INSTRUCTION}


class UnsupportedBatchError(ValueError):
    """A batch holds inputs the AimKP step does not know how to split per sample."""


def register_instruction(instruction: str) -> None:
    """Make an instruction findable as the end anchor of the text span (called for every cmkp dataset loaded)."""
    _known_instructions.add(instruction)


class BatchSplitter:
    """Splits a padded batch into per-sample :class:`SampleInputs`, locating the text and image spans."""

    def __init__(self, model_config: Any, tokenizer: Any) -> None:
        self.model_type = getattr(model_config, "model_type", "unknown")
        self.image_token_id = image_token_id_of(model_config)
        if self.image_token_id is None:
            raise UnsupportedBatchError(f"model_type {self.model_type} has no image token id; AimKP needs images.")
        self.grid_kind = GRID_FAMILIES.get(self.model_type)
        if self.grid_kind is None:
            logger.warning(
                f"aimkp-plugin: no image grid layout is known for model_type {self.model_type}; image copies use the "
                "1-D fallback (every γ-th image token)."
            )
        vision = getattr(model_config, "vision_config", None)
        self.merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.special_ids = set(self.tokenizer.all_special_ids) | {
            token_id for token_id, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        self.special_ids.discard(self.image_token_id)
        self.warned_instruction = False
        self.warned_grid = False
        self.instructions = self.instruction_patterns()

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

    def grids(self, count: int, block_sizes: list[int], image_grid_thw: torch.Tensor | None) -> list:
        grids: list = [None] * count
        if self.grid_kind == "square":
            grids = [square_grid(size) for size in block_sizes]
        elif self.grid_kind == "thw" and image_grid_thw is not None:
            grids = []
            for row, size in zip(image_grid_thw.tolist(), block_sizes, strict=True):
                time, height, width = row
                grid = (height // self.merge, width // self.merge)
                grids.append(grid if time == 1 and grid[0] * grid[1] == size else None)
        if self.grid_kind is not None and None in grids and not self.warned_grid:
            self.warned_grid = True
            logger.warning(
                f"aimkp-plugin: an image of model_type {self.model_type} does not form the expected grid "
                f"({block_sizes} tokens); its copies use the 1-D fallback (every γ-th image token). Warned once."
            )
        return grids

    def spans(self, ids: list[int], labels: list[int], image_grid_thw: torch.Tensor | None) -> ModalitySpans:
        answer_start = next((index for index, label in enumerate(labels) if label != -100), len(ids))
        blocks = contiguous_blocks([index for index in range(answer_start) if ids[index] == self.image_token_id])
        grids = self.grids(len(blocks), [len(block) for block in blocks], image_grid_thw)
        spans = find_spans(
            ids, labels, self.image_token_id, grids, self.special_ids, self.instructions, self.is_whitespace
        )
        if blocks and not spans.instruction_found and not self.warned_instruction:
            self.warned_instruction = True
            logger.warning(
                "aimkp-plugin: the instruction was not found in a sample; its text span runs to the answer "
                "(the instruction and the chat template's suffix are then masked as text too)."
            )
        return spans

    def split(self, batch: dict[str, Any], indices: Sequence[int]) -> list[SampleInputs]:
        unknown = set(batch) - set(KNOWN_KEYS)
        if unknown:
            raise UnsupportedBatchError(
                f"aimkp: the batch of model_type {self.model_type} holds {sorted(unknown)}, which the AimKP step "
                "cannot split per sample yet. Supported: LLaVA-1.5, Qwen2-VL, Qwen2.5-VL."
            )
        grid_thw = batch.get("image_grid_thw")
        patch_offsets = [0]  # Qwen: where each image's patches start in pixel_values
        for row in grid_thw.tolist() if grid_thw is not None else []:
            patch_offsets.append(patch_offsets[-1] + row[0] * row[1] * row[2])
        samples, image_cursor = [], 0
        for row, index in enumerate(indices):
            sample, count = self.sample_inputs(batch, row, image_cursor, patch_offsets)
            samples.append(SampleInputs(int(index), *sample))
            image_cursor += count
        return samples

    def sample_inputs(self, batch: dict[str, Any], row: int, first_image: int, patch_offsets: list[int]):
        """``(model_inputs, spans)`` of one row without its padding, and how many images it holds."""
        attention_mask = batch.get("attention_mask")
        visible = attention_mask[row].bool() if attention_mask is not None else slice(None)
        ids, labels = batch["input_ids"][row][visible], batch["labels"][row][visible]
        id_list = ids.tolist()
        count = len(contiguous_blocks([i for i, token in enumerate(id_list) if token == self.image_token_id]))
        images = slice(first_image, first_image + count)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids[None], "labels": labels[None]}
        grid_thw = batch["image_grid_thw"][images] if "image_grid_thw" in batch else None
        pixel_values = batch.get("pixel_values")
        if count and pixel_values is not None:
            if grid_thw is not None:
                inputs["pixel_values"] = pixel_values[patch_offsets[images.start] : patch_offsets[images.stop]]
                inputs["image_grid_thw"] = grid_thw
            else:
                inputs["pixel_values"] = pixel_values[images]
        positions = batch.get("position_ids")
        if positions is not None:  # (rows, B, L) m-rope positions or (B, L)
            rows = positions[:, row : row + 1] if positions.dim() == 3 else positions[row : row + 1]
            inputs["position_ids"] = rows[..., visible]
        return (inputs, self.spans(id_list, labels.tolist(), grid_thw)), count
