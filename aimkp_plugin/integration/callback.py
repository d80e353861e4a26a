"""Touch point: the HF ``TrainerCallback`` that owns the AimKP curriculum state's lifecycle.

- initialisation (one stride and frozen flag per training sample and modality);
- synchronisation across processes after every optimizer step (each rank applies the updates of every other);
- ``aimkp_state.json`` in every checkpoint folder and in ``output_dir``, restored on ``resume_from_checkpoint``;
- metrics for the trainer's logs (per modality: mean stride, fraction frozen, fraction of masked copies kept,
  mean cosine), and at the end a plot of the curriculum next to LLaMA-Factory's loss plot.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..config import AimkpArguments
from ..method.state import MODALITY_INDEX, STATE_FILE, CurriculumState, ModalityState
from ..method.types import SampleOutcome
from .engines import distributed


logger = logging.getLogger("llamafactory.aimkp")
PLOT_FILE = "training_aimkp_curriculum.png"
METRIC_PREFIX = "aimkp_"


class AimkpCallback(TrainerCallback):
    """Holds the :class:`CurriculumState` of a run and everything that happens to it outside the step itself."""

    def __init__(self, arguments: AimkpArguments, fingerprints: list[str]) -> None:
        self.arguments = arguments
        self.state = CurriculumState(len(fingerprints), arguments.aimkp_init_stride, fingerprints)
        self.pending: list[tuple[int, str, ModalityState]] = []
        self.pending_visits: list[tuple[int, int]] = []
        self.window: dict[str, float] = defaultdict(float)
        self.history: list[dict[str, float]] = []
        self.warned_nan = False

    # ------------------------------------------------------------------ during the step

    def record(self, outcomes: list[SampleOutcome]) -> None:
        """Count copies, keeps and cosines since the last log; queue the state updates for synchronisation."""
        for outcome in outcomes:
            self.pending += outcome.updates
            if outcome.visit is not None:
                self.pending_visits.append(outcome.visit)
            for copy in outcome.copies:
                self.window[f"{copy.modality}_copies"] += 1
                self.window[f"{copy.modality}_kept"] += float(copy.kept)
                if math.isnan(copy.cosine):
                    if not self.warned_nan:
                        self.warned_nan = True
                        logger.warning(
                            f"aimkp-plugin: sample {outcome.index} gave a zero or non-finite gradient for its "
                            f"{copy.modality} copy; it counts as disagreement (dropped, stride frozen). Warned once."
                        )
                else:
                    self.window[f"{copy.modality}_cosine_sum"] += copy.cosine
                    self.window[f"{copy.modality}_cosines"] += 1

    def synchronise(self) -> None:
        """Give every rank the updates every other rank made since the last call (a no-op on one process)."""
        if distributed():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.pending, self.pending_visits))
            for rank, (updates, visits) in enumerate(gathered):
                if rank != dist.get_rank():
                    self.state.apply(updates, visits)
        self.pending, self.pending_visits = [], []

    def log_metrics(self) -> dict[str, float]:
        """Metrics since the last log, summed over ranks (a collective call when distributed); resets the window."""
        kinds = ("copies", "kept", "cosine_sum", "cosines")
        names = [f"{modality}_{kind}" for modality in MODALITY_INDEX for kind in kinds]
        counts = torch.tensor([self.window[name] for name in names], dtype=torch.float64)
        if distributed():
            dist.all_reduce(counts)
        total = dict(zip(names, counts.tolist(), strict=True))
        self.window.clear()
        metrics = {f"{METRIC_PREFIX}{key}": round(value, 4) for key, value in self.state.summary().items()}
        for modality in MODALITY_INDEX:
            copies, cosines = total[f"{modality}_copies"], total[f"{modality}_cosines"]
            prefix = f"{METRIC_PREFIX}{modality}"
            metrics[f"{prefix}_copies"] = int(copies)
            if copies:  # keep rate and cosine are undefined while no copy was made (e.g. the first epoch)
                metrics[f"{prefix}_keep_rate"] = round(total[f"{modality}_kept"] / copies, 4)
            if cosines:
                metrics[f"{prefix}_mean_cosine"] = round(total[f"{modality}_cosine_sum"] / cosines, 4)
        return metrics

    def remember(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, **metrics})

    # ------------------------------------------------------------------ checkpoints

    def restore(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"aimkp-plugin: cannot resume the AimKP curriculum: {checkpoint_dir} has no {STATE_FILE} (was it "
                "written by a run without aimkp: true?). Resume from a checkpoint of an AimKP run, or start a new run "
                "without resume_from_checkpoint."
            )
        restored = self.state.load_matching(path)
        logger.info(f"aimkp-plugin: restored the curriculum of {restored}/{len(self.state)} samples from {path}.")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.state.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def check_consistency(self) -> str:
        """A digest of the state, checked to be identical on every rank; raises if the ranks diverged."""
        digest = hashlib.sha1(self.state.stride.numpy().tobytes() + self.state.frozen.numpy().tobytes()).hexdigest()
        if distributed():
            digests: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
            if len(set(digests)) != 1:
                raise RuntimeError(f"aimkp-plugin: the curriculum state differs across ranks: {digests}")
            logger.info(f"aimkp-plugin: curriculum state identical on all {len(digests)} ranks ({digest[:12]}).")
        return digest

    def on_train_end(self, args, state, control, **kwargs):
        digest = self.check_consistency()
        if not state.is_world_process_zero:
            return
        path = self.state.save(args.output_dir)
        plot = self.plot(args.output_dir)
        summary = self.state.summary()
        text = ", ".join(
            f"{modality} mean stride {summary[f'{modality}_mean_stride']:.2f} "
            f"({summary[f'{modality}_frozen_fraction']:.0%} frozen)"
            for modality in self.arguments.aimkp_modalities
        )
        print(f"AimKP curriculum: {text}. State: {path} (sha1 {digest[:12]})" + (f". Plot: {plot}" if plot else ""))

    def plot(self, output_dir: str) -> str | None:
        """Mean strides and keep rates over the logged steps; returns the PNG path (None without logged steps)."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker

        steps = [entry["step"] for entry in self.history]
        figure, (strides, keeps) = plt.subplots(1, 2, figsize=(10, 4))
        for modality, style in zip(self.arguments.aimkp_modalities, ("-", "--"), strict=False):
            prefix = f"{METRIC_PREFIX}{modality}"
            strides.plot(steps, [entry[f"{prefix}_mean_stride"] for entry in self.history], style, label=modality)
            rates = [entry.get(f"{prefix}_keep_rate", math.nan) for entry in self.history]
            keeps.plot(steps, rates, style, marker=".", label=modality)
        strides.set(title="mean masking stride", xlabel="step", ylabel="stride (log scale)", ylim=(0.9, None))
        strides.set_yscale("log", base=2)
        strides.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        keeps.set(title="masked copies kept", xlabel="step", ylabel="fraction", ylim=(-0.05, 1.05))
        strides.legend()
        keeps.legend()
        figure.tight_layout()
        path = os.path.join(output_dir, PLOT_FILE)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path
