"""Integer data laid out on the host and sent to the device together, in one copy.

The fast step knows from the micro-batch's host lists, before its first forward, every index it will need on the
device: each pass's ids, labels, attention mask, answer-predicting positions and answer-token counts, each row's kept
positions and image-feature indices, the rows of each sample's vision backward and the Gram matrix's row pairs. On
CUDA a copy from pageable host memory waits for the stream, so copying each of them where it is used would stop the
device once per row and pass. :class:`StagedIndices` puts them in one flat int64 host tensor, pinned on CUDA and
copied with ``non_blocking``, and hands out views of the device copy. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class StagedIndices:
    """Integer tensors staged on the host (:meth:`add`), sent together (:meth:`send`), read on the device by handle."""

    def __init__(self) -> None:
        self._values: list[int] = []
        self._spans: list[tuple[int, tuple[int, ...]]] = []
        self._host: torch.Tensor | None = None  # kept alive until the copy has been read
        self._device: torch.Tensor | None = None

    def add(self, values: Sequence[int] | Sequence[Sequence[int]], shape: tuple[int, ...] | None = None) -> int:
        """Stage ``values`` (a flat list, or equal-length rows; ``shape`` for a flat list of more dimensions); returns
        its handle."""
        if self._device is not None:
            raise RuntimeError("StagedIndices: add after send")
        if values and isinstance(values[0], (list, tuple)):
            width = len(values[0])
            flat = [value for row in values for value in row]
            shape = shape or (len(values), width)
        else:
            flat = list(values)
            shape = shape or (len(flat),)
        if math.prod(shape) != len(flat):
            raise ValueError(f"StagedIndices: {len(flat)} values do not fill the shape {shape}")
        self._spans.append((len(self._values), shape))
        self._values.extend(int(value) for value in flat)
        return len(self._spans) - 1

    def send(self, device: torch.device) -> StagedIndices:
        """Copy everything staged to ``device`` at once (pinned and ``non_blocking`` on CUDA)."""
        host = torch.tensor(self._values, dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()
        self._host = host
        self._device = host.to(device, non_blocking=device.type == "cuda")
        return self

    def __getitem__(self, handle: int) -> torch.Tensor:
        if self._device is None:
            raise RuntimeError("StagedIndices: read before send")
        start, shape = self._spans[handle]
        return self._device[start : start + math.prod(shape)].view(shape)
