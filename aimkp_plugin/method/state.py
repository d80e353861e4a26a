"""Per-sample curriculum state: a stride γ and a frozen flag per sample and modality, its update rule, and its file.

Update after a visit, per modality, only when not frozen (τ = the modality's threshold, c = cosine of the masked
copy's gradient with the original's):

- γ = 1 → γ = 2 (there was no masked copy yet);
- γ > 1 and c > τ → γ = 2γ;
- γ > 1 and c ≤ τ → frozen, γ = max(γ/2, 2) from then on.

A frozen modality keeps being masked at its frozen stride and filtered. Plain Python and JSON (tensors on request).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


STATE_FILE = "aimkp_state.json"
STATE_FORMAT = "aimkp_state"
STATE_VERSION = 1
MODALITY_INDEX = {"text": 0, "image": 1}


class StateMismatchError(ValueError):
    """A saved state does not fit the training set it is being restored for."""


@dataclass(frozen=True)
class ModalityState:
    stride: int
    frozen: bool = False


def next_modality_state(
    state: ModalityState, cosine: float | None, threshold: float, progressive: bool = True
) -> ModalityState:
    """The state after one visit. ``cosine`` None means no masked copy was compared (nothing to learn from).

    With ``progressive`` off the stride never changes (the ablation "fixed stride").
    """
    if not progressive or state.frozen:
        return state
    if state.stride == 1:
        return ModalityState(2)
    if cosine is None:
        return state
    if cosine > threshold:
        return ModalityState(state.stride * 2)
    return ModalityState(max(state.stride // 2, 2), frozen=True)


class CurriculumState:
    """Strides and frozen flags of every training sample, indexed [sample][modality], and each sample's last visited
    epoch. Held as Python lists: the step reads and writes single entries on the host, with no tensor op; ``stride``,
    ``frozen`` and ``last_epoch`` give them as (N, 2), (N, 2) and (N,) tensors."""

    def __init__(self, num_samples: int, init_stride: int, fingerprints: list[str] | None = None) -> None:
        self.init_stride = init_stride
        self._stride = [[init_stride, init_stride] for _ in range(num_samples)]
        self._frozen = [[False, False] for _ in range(num_samples)]
        self.fingerprints = list(fingerprints) if fingerprints is not None else [""] * num_samples
        self._last_epoch = [-1] * num_samples  # epoch of each sample's last visit

    def __len__(self) -> int:
        return len(self._stride)

    @property
    def stride(self) -> torch.Tensor:
        return torch.tensor(self._stride, dtype=torch.long).reshape(len(self), 2)

    @property
    def frozen(self) -> torch.Tensor:
        return torch.tensor(self._frozen, dtype=torch.bool).reshape(len(self), 2)

    @property
    def last_epoch(self) -> torch.Tensor:
        return torch.tensor(self._last_epoch, dtype=torch.long)

    def get(self, index: int, modality: str) -> ModalityState:
        column = MODALITY_INDEX[modality]
        return ModalityState(self._stride[index][column], self._frozen[index][column])

    def set(self, index: int, modality: str, state: ModalityState) -> None:
        column = MODALITY_INDEX[modality]
        self._stride[index][column] = int(state.stride)
        self._frozen[index][column] = bool(state.frozen)

    def apply(self, updates: list[tuple[int, str, ModalityState]], visits: list[tuple[int, int]] = ()) -> None:
        """Apply stride updates and ``(index, epoch)`` visits made elsewhere (another rank)."""
        for index, modality, state in updates:
            self.set(index, modality, state)
        for index, epoch in visits:
            self._last_epoch[index] = max(self._last_epoch[index], int(epoch))

    def first_visit(self, index: int, epoch: int) -> bool:
        """Record a visit; False when the sample was already visited in this epoch.

        A distributed sampler may repeat samples to give every rank an equal share of the last step; such a repeat
        trains as usual but does not move the curriculum a second time in the same epoch.
        """
        if self._last_epoch[index] >= epoch:
            return False
        self._last_epoch[index] = int(epoch)
        return True

    def summary(self) -> dict[str, float]:
        """Mean stride and fraction frozen per modality."""
        return {
            **{
                f"{name}_mean_stride": float(self.stride[:, column].float().mean())
                for name, column in MODALITY_INDEX.items()
            },
            **{
                f"{name}_frozen_fraction": float(self.frozen[:, column].float().mean())
                for name, column in MODALITY_INDEX.items()
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "init_stride": self.init_stride,
            "num_samples": len(self),
            "fingerprint": self.fingerprints,
            "text_stride": [row[0] for row in self._stride],
            "text_frozen": [row[0] for row in self._frozen],
            "image_stride": [row[1] for row in self._stride],
            "image_frozen": [row[1] for row in self._frozen],
            "last_epoch": list(self._last_epoch),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    def load_matching(self, path: str | os.PathLike[str]) -> int:
        """Restore from a saved state, matching samples by fingerprint; returns how many samples were restored.

        Samples are matched by index when all fingerprints agree, else by fingerprint (a sample whose fingerprint
        is absent keeps its initial state). Raises :class:`StateMismatchError` when nothing matches.
        """
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise StateMismatchError(f"{path}: not an {STATE_FORMAT} v{STATE_VERSION} file.")
        columns = ("text_stride", "text_frozen", "image_stride", "image_frozen")
        last_epoch = data.get("last_epoch", [-1] * len(data["text_stride"]))
        saved = list(zip(*(data[column] for column in columns), last_epoch, strict=True))
        if data["fingerprint"] == self.fingerprints:
            targets = list(range(len(saved)))
        else:
            position = {fingerprint: index for index, fingerprint in enumerate(self.fingerprints)}
            targets = [position.get(fingerprint, -1) for fingerprint in data["fingerprint"]]
        restored = 0
        for target, (text_stride, text_frozen, image_stride, image_frozen, epoch) in zip(targets, saved, strict=True):
            if target < 0:
                continue
            self._stride[target] = [int(text_stride), int(image_stride)]
            self._frozen[target] = [bool(text_frozen), bool(image_frozen)]
            self._last_epoch[target] = int(epoch)
            restored += 1
        if restored == 0 and len(self):
            raise StateMismatchError(
                f"{path}: none of its {len(saved)} samples matches the current training set; was the dataset changed?"
            )
        return restored
