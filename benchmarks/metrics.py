"""Scores for one prediction, and the cost arithmetic of a run.

SQuAD scoring follows the official v2.0 evaluation script (rajpurkar/SQuAD-explorer,
``evaluate-v2.0.py``): lower-case, drop punctuation, drop the articles a/an/the, collapse
whitespace; EM and token F1 are the best over the references. An empty reference list means
"no answer in the passage" (SQuAD 2.0): the prediction is right only when it abstains.

    >>> exact_match("The Denver Broncos!", ["Denver Broncos"])
    1.0
    >>> round(f1_score("the Broncos of Denver", ["Denver Broncos"]), 3)
    0.8
    >>> niah_correct("The number is 4,821.", ["4821"])
    1.0
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

ABSTAIN_WORDS = ("unanswerable", "no answer", "not mentioned", "does not say", "doesn't say", "cannot be determined")
"""Predictions containing one of these count as the empty answer (SQuAD 2.0 abstention)."""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (SQuAD's ``normalize_answer``)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _abstains(prediction: str) -> bool:
    p = prediction.lower()
    return not normalize_answer(prediction) or any(w in p for w in ABSTAIN_WORDS)


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # SQuAD: F1 is 1 when both are empty, else 0
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference (best over references)."""
    if not references:
        return float(_abstains(prediction))
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """Token F1 between the normalised prediction and the best reference."""
    if not references:
        return float(_abstains(prediction))
    return max(_f1(prediction, r) for r in references)


def contains_answer(prediction: str, references: Sequence[str]) -> float:
    """1.0 when a normalised reference occurs in the normalised prediction (lenient; chatty small models)."""
    if not references:
        return float(_abstains(prediction))
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(r)} " in pred for r in references if normalize_answer(r)))


def niah_correct(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the exact needle number is one of the numbers in the prediction (``4,821`` reads as 4821)."""
    numbers = {m.replace(",", "") for m in re.findall(r"\d[\d,]*", prediction)}
    return float(any(r.replace(",", "") in numbers for r in references))


def score_prediction(prediction: str, references: Sequence[str], kind: str) -> dict[str, float]:
    """All metrics for one answer; ``score`` is the headline one (F1 for ``qa``, exact number for ``niah``)."""
    em, f1, contains = exact_match(prediction, references), f1_score(prediction, references), contains_answer(prediction, references)
    if kind == "niah":
        acc = niah_correct(prediction, references)
        return {"em": em, "f1": f1, "contains": contains, "niah": acc, "score": acc}
    if kind != "qa":
        msg = f"Unknown task kind {kind!r}; use 'qa' or 'niah'."
        raise ValueError(msg)
    return {"em": em, "f1": f1, "contains": contains, "score": f1}


# ----------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- money
def token_cost_usd(prompt_tokens: float, completion_tokens: float, prices: dict) -> float:
    """What one query costs at per-token API prices."""
    return prompt_tokens / 1000 * prices["prompt_usd_per_1k_tokens"] + completion_tokens / 1000 * prices["completion_usd_per_1k_tokens"]


def compute_cost_usd(seconds: float, prices: dict, device: str) -> float:
    """What ``seconds`` of this hardware cost at its hourly price (``gpu_usd_per_hour`` on cuda, else CPU)."""
    hourly = prices["gpu_usd_per_hour"] if device.startswith("cuda") else prices["cpu_usd_per_hour"]
    return seconds / 3600 * hourly


def break_even_queries(one_off_cost: float, cost_per_query: float, baseline_cost_per_query: float) -> float | None:
    """Queries per document after which a one-off cost is repaid by cheaper queries.

    ``n* = one_off / (baseline - cost)``; None when the method saves nothing per query (never repaid).

        >>> break_even_queries(10.0, 1.0, 3.0)
        5.0
        >>> break_even_queries(10.0, 3.0, 3.0) is None
        True
    """
    saving = baseline_cost_per_query - cost_per_query
    if saving <= 0:
        return None
    return one_off_cost / saving


__all__ = [
    "break_even_queries",
    "compute_cost_usd",
    "contains_answer",
    "exact_match",
    "f1_score",
    "mean",
    "niah_correct",
    "normalize_answer",
    "percentile",
    "score_prediction",
    "token_cost_usd",
]
