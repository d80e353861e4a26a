"""Reading predictions to score: LLaMA-Factory's ``generated_predictions.jsonl`` or plain ``gold<sep>pred`` lines.

Rules:
- ``.jsonl``: one JSON object a line with ``predict`` and ``label`` (``prompt`` is ignored). A line that is not
  JSON, is not an object, or lacks either field stops with its line number.
- other files: ``gold<sep>prediction`` a line; gold phrases separated by ``;`` (CMKP raw) or ``,``.
- An empty prediction is kept and scores 0 (it is a real failure of the model); an empty gold stops with its line
  number (there is nothing to score against). Blank lines at the end of a file are ignored.
- Predictions are split on ``,`` (the answer format of the spec); gold is stripped, including the trailing
  newline Qwen labels keep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .metrics import split_prediction


SEPARATOR = "<sep>"
PROGRESS_MIN_LINES = 2000


class PredictionFormatError(ValueError):
    """A predictions file cannot be scored; the message names the file and line."""


def split_gold(text: str) -> list[str]:
    pieces = text.split(";") if ";" in text else text.split(",")
    return [piece.strip() for piece in pieces if piece.strip()]


def _pair(path: Path, number: int, gold_text: str, prediction: str) -> tuple[list[str], list[str]]:
    gold = split_gold(gold_text)
    if not gold:
        raise PredictionFormatError(f"{path}, line {number}: empty gold keyphrases (nothing to score against).")
    return gold, split_prediction(prediction.strip())


def read_pairs(path: str | os.PathLike[str], progress: bool | None = None) -> list[tuple[list[str], list[str]]]:
    """``(gold phrases, ranked predicted phrases)`` for every line of a predictions file."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    show = len(lines) >= PROGRESS_MIN_LINES if progress is None else progress
    if show:
        from tqdm import tqdm

        lines = tqdm(lines, desc=f"reading {path.name}", unit="line", leave=False)
    pairs = []
    for number, line in enumerate(lines, start=1):
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictionFormatError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
            if not isinstance(record, dict):
                raise PredictionFormatError(f"{path}, line {number}: expected a JSON object with predict and label.")
            missing = [key for key in ("predict", "label") if not isinstance(record.get(key), str)]
            if missing:
                raise PredictionFormatError(
                    f"{path}, line {number}: missing or non-string field(s) {', '.join(missing)}."
                )
            pairs.append(_pair(path, number, record["label"], record["predict"]))
        else:
            if SEPARATOR not in line:
                raise PredictionFormatError(f"{path}, line {number}: expected gold{SEPARATOR}prediction.")
            gold, prediction = line.split(SEPARATOR, 1)
            pairs.append(_pair(path, number, gold, prediction))
    return pairs
