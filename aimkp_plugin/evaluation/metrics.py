"""Keyphrase metrics in two styles: the AimKP authors' (the spec's protocol) and the CMKP / MM-MKP evaluator's.

Both stem with NLTK's Porter stemmer word by word and report F1@1, F1@3 and MAP@5 in percent, but they differ:

``aimkp`` (XMUDeepLIT/AimKP ``metrics.py``, as the spec restates it), per sample, then averaged:
  - predictions: the generated text split on ``,``, each piece stripped (empty pieces stay and take a rank);
    gold lower-cased, predictions not;
  - correct@k = |set(gold) ∩ set(top-k predictions)| after stemming; P = correct / k (k even if fewer were
    predicted); R = correct / |set(gold)|; F1@k = 2PR / (P + R), and the per-sample F1s are averaged;
  - MAP@5 = mean over i = 1..n of correct@i / i with n = min(#predictions, 5) (every rank counts, hit or not).

``cmkp`` (yuewang-cuhk/CMKP ``unified_model/pred_evaluate_func.py`` and ``metric_utils.py``):
  - phrases split into words on single spaces, stemmed with lower-casing; predictions deduplicated after stemming
    (first occurrence kept) and junk dropped (a word equal to ``<unk>``, ``,`` or ``.``); gold deduplicated too;
  - P@k = matches in the top k / min(k, #predictions); R@k = matches / #gold; macro P and macro R are averaged over
    samples and F1@k = 2·P·R / (P + R) of those averages;
  - AP@k (textbook) = Σ over hit ranks i ≤ k of precision@i / #gold; MAP@5 is its mean; no predictions → 0.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


STYLES = ("aimkp", "cmkp")
CMKP_JUNK_WORDS = frozenset({"<unk>", ",", "."})
METRIC_KEYS = ("f1@1", "f1@3", "map@5")


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=500_000)
def stem_word(word: str, lowercase: bool) -> str:
    return _stemmer().stem(word, to_lowercase=lowercase)


def stem_phrase(phrase: str) -> str:
    """Porter-stem every space-separated word (``str.split``) and join them with single spaces."""
    return " ".join(stem_word(word, False) for word in phrase.split())


def split_prediction(text: str) -> list[str]:
    """A generated answer as a ranked list of phrases: split on ``,``, each piece stripped (empty pieces kept)."""
    return [piece.strip() for piece in text.split(",")]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def aimkp_sample(gold: Sequence[str], predicted: Sequence[str]) -> tuple[float, float, float]:
    """(F1@1, F1@3, MAP@5) of one sample, the authors' way; fractions in [0, 1]."""
    gold_set = {stem_phrase(phrase.strip().lower()) for phrase in gold}
    stemmed = [stem_phrase(phrase) for phrase in predicted]

    def correct_at(k: int) -> int:
        return len(gold_set.intersection(stemmed[:k]))

    def f1_at(k: int) -> float:
        return _f1(correct_at(k) / k, correct_at(k) / len(gold_set) if gold_set else 0.0)

    n = min(len(stemmed), 5)
    map_at_5 = sum(correct_at(i) / i for i in range(1, n + 1)) / n if n else 0.0
    return f1_at(1), f1_at(3), map_at_5


def _cmkp_stem(phrase: str) -> tuple[str, ...]:
    return tuple(stem_word(word.strip(), True) for word in phrase.strip().split(" "))


def cmkp_sample(gold: Sequence[str], predicted: Sequence[str]) -> tuple[float, ...]:
    """(P@1, R@1, P@3, R@3, AP@5) of one sample, the CMKP evaluator's way; fractions in [0, 1]."""
    targets = list(dict.fromkeys(_cmkp_stem(phrase) for phrase in gold))
    kept = [words for words in map(_cmkp_stem, predicted) if not CMKP_JUNK_WORDS.intersection(words)]
    ranked = list(dict.fromkeys(kept))
    hits = [words in targets for words in ranked]
    if not ranked or not targets:
        return 0.0, 0.0, 0.0, 0.0, 0.0

    def precision_recall(k: int) -> tuple[float, float]:
        matches = sum(hits[:k])
        return matches / min(k, len(ranked)), matches / len(targets)

    average_precision = sum(sum(hits[: i + 1]) / (i + 1) for i in range(min(5, len(ranked))) if hits[i])
    return (*precision_recall(1), *precision_recall(3), average_precision / len(targets))


def score(pairs: Sequence[tuple[Sequence[str], Sequence[str]]], style: str = "aimkp") -> dict[str, float]:
    """F1@1, F1@3 and MAP@5 in percent over ``(gold, predicted)`` pairs, plus the count ``n``."""
    if style not in STYLES:
        raise ValueError(f"Unknown metric style {style!r}; choose one of: {', '.join(STYLES)}.")
    count = len(pairs)
    if count == 0:
        return {**dict.fromkeys(METRIC_KEYS, 0.0), "n": 0}
    if style == "aimkp":
        rows = [aimkp_sample(gold, predicted) for gold, predicted in pairs]
        f1_1, f1_3, map_5 = (100.0 * sum(column) / count for column in zip(*rows, strict=True))
        return {"f1@1": f1_1, "f1@3": f1_3, "map@5": map_5, "n": count}
    rows = [cmkp_sample(gold, predicted) for gold, predicted in pairs]
    p1, r1, p3, r3, ap5 = (sum(column) / count for column in zip(*rows, strict=True))
    return {"f1@1": 100.0 * _f1(p1, r1), "f1@3": 100.0 * _f1(p3, r3), "map@5": 100.0 * ap5, "n": count}
