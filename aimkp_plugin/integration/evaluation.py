"""Touch point: the SFT trainer's evaluation (``compute_metrics`` and the generation keys of in-training evaluation).

When the evaluation data is in ``cmkp`` format and ``predict_with_generate: true`` is set, evaluation and prediction
report the keyphrase metrics of the spec's protocol in the ``aimkp`` style (:mod:`aimkp_plugin.evaluation.metrics`),
next to LLaMA-Factory's ROUGE/BLEU:

- ``aimkp_f1_at_1``, ``aimkp_f1_at_3``, ``aimkp_map_at_5`` (percent) and ``aimkp_score`` = F1@1 + F1@3 + MAP@5, the
  authors' criterion for the best epoch. The trainer prefixes them (``eval_aimkp_score``), so
  ``metric_for_best_model: eval_aimkp_score`` with ``load_best_model_at_end: true`` keeps the authors' best epoch.
- Each generated answer is split on ``,`` and each gold answer on ``;`` or ``,``, exactly as ``aimkp eval`` reads
  ``generated_predictions.jsonl``; every evaluation during training also writes its predictions to
  ``<output_dir>/aimkp_eval/<prefix>_step<N>.jsonl`` (``predict`` / ``label`` lines), so ``aimkp eval`` on that file
  gives the logged numbers.

Two things LLaMA-Factory 0.9.5 gets wrong for generation during training are put right for these runs (only these):
the trainer's in-training ``evaluate()`` passes no generation keys, so ``Seq2SeqTrainer`` would drop the run's
``num_beams``, ``do_sample``, ``temperature``, ``max_new_tokens`` and stop tokens; and the tokenizer pads on the right
during training, which breaks batched generation. Evaluation here uses the run's generation keys and left padding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import AimkpConfigError, is_true
from ..evaluation.metrics import score, split_prediction
from ..evaluation.predictions import split_gold
from ..method.types import IGNORE_INDEX


logger = logging.getLogger("llamafactory.aimkp")
CMKP_FORMATTING = "cmkp"
METRIC_NAMES = {"f1@1": "aimkp_f1_at_1", "f1@3": "aimkp_f1_at_3", "map@5": "aimkp_map_at_5"}
SCORE_NAME = "aimkp_score"
PREDICTIONS_FOLDER = "aimkp_eval"

_keyphrase_evaluation = False


def keyphrase_evaluation() -> bool:
    """Whether this process's run evaluates ``cmkp`` data with generation (set before the model loads)."""
    return _keyphrase_evaluation


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def evaluates_cmkp(value_of: Callable[[str], Any]) -> bool:
    """True when ``predict_with_generate`` is on and every evaluation dataset is a ``cmkp`` entry of the run's
    ``dataset_info.json``: the ``eval_dataset`` names, or, without them, the training datasets that ``val_size``
    splits."""
    if not is_true(value_of("predict_with_generate")):
        return False
    names = _names(value_of("eval_dataset"))
    if not names and float(value_of("val_size") or 0) > 0:
        names = _names(value_of("dataset"))
    info_file = Path(str(value_of("dataset_dir") or "data")) / "dataset_info.json"
    if not names or not info_file.is_file():
        return False
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False  # LLaMA-Factory reports an unreadable dataset_info.json itself
    entries = [info.get(name) for name in names]
    return all(isinstance(entry, dict) and entry.get("formatting") == CMKP_FORMATTING for entry in entries)


def set_keyphrase_evaluation(value_of: Callable[[str], Any]) -> None:
    """Decide for this run; a ``metric_for_best_model`` naming a keyphrase metric needs that evaluation, so a run
    without it stops here, before the model loads, instead of after its first evaluation."""
    global _keyphrase_evaluation
    _keyphrase_evaluation = evaluates_cmkp(value_of)
    metric = str(value_of("metric_for_best_model") or "")
    if metric.removeprefix("eval_").split("_")[0] == "aimkp" or "_aimkp_" in metric:
        if not _keyphrase_evaluation:
            raise AimkpConfigError(
                f"metric_for_best_model: {metric} is reported only by a generating evaluation of cmkp data: set "
                "predict_with_generate: true and an eval_dataset (or val_size) whose dataset_info.json entries have "
                f'"formatting": "cmkp" (dataset_dir: {value_of("dataset_dir") or "data"}).'
            )


def decode_texts(tokenizer: Any, token_ids: np.ndarray) -> list[str]:
    """Token ids (``-100`` where nothing was generated or gathered) as text, as LLaMA-Factory's
    ``save_predictions`` decodes them."""
    ids = np.where(token_ids != IGNORE_INDEX, token_ids, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


class KeyphraseMetrics:
    """``compute_metrics`` for a generating evaluation of ``cmkp`` data: LLaMA-Factory's similarity metrics (when
    given) plus the four keyphrase metrics. Supports ``batch_eval_metrics`` (``compute_result=False`` collects)."""

    def __init__(self, tokenizer: Any, similarity: Callable[..., dict[str, float] | None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.similarity = similarity
        self.predictions_file: Callable[[], Path | None] = lambda: None
        self._rows: list[tuple[str, str]] = []

    def __call__(self, eval_preds: Any, compute_result: bool = True) -> dict[str, float] | None:
        from llamafactory.extras.misc import numpify

        similarity = self.similarity(eval_preds, compute_result) if self.similarity is not None else None
        predictions = decode_texts(self.tokenizer, numpify(eval_preds.predictions))
        labels = decode_texts(self.tokenizer, numpify(eval_preds.label_ids))
        self._rows.extend(zip(predictions, labels, strict=True))
        if not compute_result:
            return None
        rows, self._rows = self._rows, []
        path = self.predictions_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                for prediction, label in rows:
                    handle.write(json.dumps({"predict": prediction, "label": label}, ensure_ascii=False) + "\n")
        pairs = [(split_gold(label), split_prediction(prediction.strip())) for prediction, label in rows]
        scored = [pair for pair in pairs if pair[0]]
        if len(scored) < len(pairs):
            logger.warning(f"aimkp-plugin: {len(pairs) - len(scored)} evaluation samples have no gold keyphrase.")
        values = score(scored, "aimkp")
        metrics = {name: values[key] for key, name in METRIC_NAMES.items()}
        metrics[SCORE_NAME] = sum(metrics.values())
        return {**(similarity or {}), **metrics}
