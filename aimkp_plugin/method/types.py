"""The method core's own types: where the modalities sit in one sample, what a step is asked to do, and what it did.

- :class:`TokenGrid`: one 2-D grid of image tokens (LLaVA-1.5's 24×24, a Qwen image's merged grid, one InternVL tile),
  given by the sequence positions of its cells in row-major order;
- :class:`ImageSpan`: every image token of one image, and its grids (several for a tiled image). Image tokens that
  belong to no grid (separators, newlines) are never masked. Without grids (``grids`` None) the image is masked with
  the 1-D fallback, every γ-th token. An image that reaches the language model through cross-attention (Mllama) has
  grids of *vision keys* (``keys``): its cells index the sample's cross-attention keys, and its tokens are never
  hidden;
- :class:`ModalitySpans`: the text span and the image spans of one sample;
- :class:`SampleInputs`: one unpadded sample, its index in the training set, its model inputs and spans;
- :class:`StepConfig`, :class:`CopyOutcome`, :class:`SampleOutcome`: a step's settings and its per-sample results.

Pure Python and torch; nothing here imports the data layer, a model family or LLaMA-Factory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .state import ModalityState


IGNORE_INDEX = -100
ORIGINAL = "original"


@dataclass(frozen=True)
class TokenGrid:
    """``height``×``width`` image tokens at sequence ``positions`` (row-major, ``height * width`` of them)."""

    height: int
    width: int
    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.height * self.width != len(self.positions):
            raise ValueError(f"a {self.height}×{self.width} grid needs {self.height * self.width} positions")


@dataclass(frozen=True)
class ImageSpan:
    """The image tokens of one image: all their positions, and their grids (None: the 1-D fallback). With ``keys``
    the grids' cells are indices of the sample's cross-attention vision keys, not sequence positions."""

    positions: list[int]
    grids: tuple[TokenGrid, ...] | None = None
    keys: bool = False

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of a single-grid image (None for a tiled image or the fallback)."""
        return (self.grids[0].height, self.grids[0].width) if self.grids and len(self.grids) == 1 else None


@dataclass
class ModalitySpans:
    text: list[int] = field(default_factory=list)
    images: list[ImageSpan] = field(default_factory=list)
    instruction_found: bool = True

    @property
    def image_positions(self) -> list[int]:
        return [position for image in self.images for position in image.positions]


@dataclass
class SampleInputs:
    """One unpadded sample: ``model_inputs`` hold batch-of-one tensors (input_ids, labels, pixel inputs, ...).

    ``ids_on_host`` and ``labels_on_host`` are the same ``input_ids`` and ``labels`` as Python lists, given by whoever
    split the batch (it read them already), so that the step's bookkeeping never reads a device tensor; when not
    given they are read once, on first use."""

    index: int
    model_inputs: dict[str, torch.Tensor]
    spans: ModalitySpans
    ids_on_host: list[int] | None = field(default=None, repr=False, compare=False)
    labels_on_host: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def labels(self) -> torch.Tensor:
        return self.model_inputs["labels"]

    def host_ids(self) -> list[int]:
        if self.ids_on_host is None:
            self.ids_on_host = self.model_inputs["input_ids"][0].tolist()
        return self.ids_on_host

    def host_labels(self) -> list[int]:
        if self.labels_on_host is None:
            self.labels_on_host = self.labels[0].tolist()
        return self.labels_on_host

    @functools.cached_property
    def num_answer_tokens(self) -> int:
        """The answer tokens a loss reads: labels after the first position that are not ``IGNORE_INDEX``."""
        return sum(label != IGNORE_INDEX for label in self.host_labels()[1:])


AUTO_BUFFER = "auto"  # StepConfig.max_buffer_bytes: sized from the device's memory


@dataclass
class StepConfig:
    """What a step is asked to do (the spec's settings), and the fast step's knobs, which never change a number:
    ``max_tokens_per_forward`` (None: automatic), ``max_buffer_bytes`` (None: no limit; ``AUTO_BUFFER``: from the
    device's memory, :func:`~.pass_planning.auto_buffer_bytes`) and ``share_prefix`` (None: automatic)."""

    modalities: Sequence[str]
    thresholds: dict[str, float]
    filtering: bool = True
    progressive: bool = True
    max_tokens_per_forward: int | None = None
    max_buffer_bytes: int | str | None = None
    share_prefix: bool | None = None


@dataclass
class CopyOutcome:
    modality: str
    stride: int
    cosine: float
    kept: bool


@dataclass
class SampleOutcome:
    index: int
    num_answer_tokens: int
    original_loss_sum: float
    copies: list[CopyOutcome] = field(default_factory=list)
    updates: list[tuple[int, str, ModalityState]] = field(default_factory=list)
    visit: tuple[int, int] | None = None  # (index, epoch) when this visit moved the curriculum
