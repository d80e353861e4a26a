"""``aimkp compare``: the metrics of several prediction runs in one table (markdown, JSON) and one bar chart.

Each run is a folder holding ``generated_predictions.jsonl`` (or the file itself). Its label is its path relative
to the runs' common parent, e.g. ``sft/full`` or ``aimkp/predict_image_only``; the input setting is read from the
label's last part (``full``, ``text_only``, ``image_only``; ``full`` when none is named) and the method is the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import INPUT_SETTINGS
from .metrics import METRIC_KEYS, score
from .predictions import read_pairs


PREDICTIONS_FILE = "generated_predictions.jsonl"


@dataclass(frozen=True)
class RunResult:
    run: str
    method: str
    setting: str
    style: str
    n: int
    f1_at_1: float
    f1_at_3: float
    map_at_5: float

    def metric(self, key: str) -> float:
        return {"f1@1": self.f1_at_1, "f1@3": self.f1_at_3, "map@5": self.map_at_5}[key]


def predictions_path(run: str | os.PathLike[str]) -> Path:
    path = Path(run)
    path = path / PREDICTIONS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {PREDICTIONS_FILE} (run a predict recipe with this output_dir first).")
    return path


def label_of(path: Path, parent: Path) -> tuple[str, str, str]:
    """``(label, method, setting)`` of a run folder relative to the common parent of all runs."""
    label = path.relative_to(parent).as_posix() if path != parent else path.name
    parts = label.split("/")
    setting = next((name for name in INPUT_SETTINGS if parts[-1].endswith(name)), None)
    method = "/".join(parts[:-1]) if setting is not None and len(parts) > 1 else label
    return label, method or label, setting or "full"


def compare_runs(runs: list[str], style: str = "aimkp") -> list[RunResult]:
    paths = [predictions_path(run) for run in runs]
    folders = [path.parent.resolve() for path in paths]
    parent = Path(os.path.commonpath(folders)) if len(folders) > 1 else folders[0].parent
    results = []
    for path, folder in zip(paths, folders, strict=True):
        label, method, setting = label_of(folder, parent)
        scores = score(read_pairs(path), style)
        results.append(
            RunResult(label, method, setting, style, scores["n"], scores["f1@1"], scores["f1@3"], scores["map@5"])
        )
    return results


def markdown_table(results: list[RunResult]) -> str:
    lines = ["| method | setting | F1@1 | F1@3 | MAP@5 | n |", "|---|---|---:|---:|---:|---:|"]
    for result in sorted(results, key=lambda item: (item.method, INPUT_SETTINGS.index(item.setting))):
        lines.append(
            f"| {result.method} | {result.setting} | {result.f1_at_1:.2f} | {result.f1_at_3:.2f} | "
            f"{result.map_at_5:.2f} | {result.n} |"
        )
    return "\n".join(lines) + "\n"


def bar_chart(results: list[RunResult], path: Path) -> Path:
    """One panel per metric; settings on the x axis, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(result.method for result in results))
    settings = [name for name in INPUT_SETTINGS if any(result.setting == name for result in results)]
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(1, len(METRIC_KEYS), figsize=(4.5 * len(METRIC_KEYS), 4), sharey=True)
    for axis, key in zip(axes, METRIC_KEYS, strict=True):
        for number, method in enumerate(methods):
            values = [
                next((r.metric(key) for r in results if r.method == method and r.setting == name), 0.0)
                for name in settings
            ]
            positions = [index + (number - (len(methods) - 1) / 2) * width for index in range(len(settings))]
            bars = axis.bar(positions, values, width, label=method)
            axis.bar_label(bars, fmt="%.1f", fontsize=7)
        axis.set_xticks(range(len(settings)), settings)
        axis.set_title(key.upper())
    axes[0].set_ylabel(f"percent ({results[0].style} style)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_comparison(results: list[RunResult], out: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "compare.md", "json": out / "compare.json", "chart": out / "compare.png"}
    files["markdown"].write_text(markdown_table(results))
    files["json"].write_text(json.dumps([asdict(result) for result in results], indent=2) + "\n")
    bar_chart(results, files["chart"])
    return files
