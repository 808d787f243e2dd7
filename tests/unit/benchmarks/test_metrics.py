"""SQuAD normalisation, EM/F1 (best over references, SQuAD 2.0 abstention), NIAH scoring and cost arithmetic."""

from __future__ import annotations

import pytest

from benchmarks.metrics import (
    break_even_queries,
    compute_cost_usd,
    contains_answer,
    exact_match,
    f1_score,
    niah_correct,
    normalize_answer,
    percentile,
    score_prediction,
    token_cost_usd,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an   apple, a day ", "apple day"),
        ("Theatre of the absurd", "theatre of absurd"),  # "the" inside a word stays
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_best_over_references():
    assert exact_match("Denver Broncos", ["Carolina Panthers", "the Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0


def test_f1_partial_overlap_and_best_reference():
    # pred {broncos, of, denver} vs ref {denver, broncos}: P = 2/3, R = 1 -> F1 = 0.8
    assert f1_score("the Broncos of Denver", ["Denver Broncos"]) == pytest.approx(0.8)
    assert f1_score("Denver", ["Denver Broncos", "Denver"]) == 1.0
    assert f1_score("Paris", ["London"]) == 0.0
    # repeated tokens count once per occurrence (multiset intersection)
    assert f1_score("a b b", ["b"]) == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))


def test_unanswerable_questions_reward_abstention():
    assert exact_match("", []) == 1.0
    assert f1_score("This is unanswerable.", []) == 1.0
    assert exact_match("Paris", []) == 0.0
    assert f1_score("Paris", []) == 0.0


def test_contains_answer_is_word_aligned():
    assert contains_answer("It was founded by Mira Quell in 1873.", ["Mira Quell"]) == 1.0
    assert contains_answer("1873", ["873"]) == 0.0


def test_niah_needs_the_exact_number():
    assert niah_correct("4821", ["4821"]) == 1.0
    assert niah_correct("The special magic number is 4,821.", ["4821"]) == 1.0
    assert niah_correct("48210", ["4821"]) == 0.0
    assert niah_correct("I don't know", ["4821"]) == 0.0


def test_score_prediction_headline_metric():
    assert score_prediction("Paris", ["Paris"], "qa")["score"] == 1.0
    assert score_prediction("It is 12.", ["12"], "niah")["score"] == 1.0
    with pytest.raises(ValueError, match="Unknown task kind"):
        score_prediction("x", ["x"], "mcq")


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [0.3, 1.2, 0.9, 5.0, 2.2]
    for q in (0, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


PRICES = {"prompt_usd_per_1k_tokens": 0.5, "completion_usd_per_1k_tokens": 1.5, "cpu_usd_per_hour": 3.6, "gpu_usd_per_hour": 36.0}


def test_costs():
    assert token_cost_usd(2000, 1000, PRICES) == pytest.approx(2.5)
    assert compute_cost_usd(10, PRICES, "cpu") == pytest.approx(0.01)
    assert compute_cost_usd(10, PRICES, "cuda:0") == pytest.approx(0.1)


def test_break_even():
    # one-off 10, 3 per query without, 1 per query with: repaid after 5 queries
    assert break_even_queries(10.0, 1.0, 3.0) == pytest.approx(5.0)
    assert break_even_queries(0.0, 1.0, 3.0) == 0.0
    assert break_even_queries(10.0, 3.0, 3.0) is None  # no saving: never repaid
    assert break_even_queries(10.0, 4.0, 3.0) is None  # dearer per query: never repaid
