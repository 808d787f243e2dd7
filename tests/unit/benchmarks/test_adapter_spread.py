"""benchmarks/adapter_spread.py: the minimal pairs and controls it measures the adapters on."""

from __future__ import annotations

import torch

from benchmarks.adapter_spread import _ratio, pairs


def _changed(a: str, b: str) -> tuple[int, int, str]:
    """The region of ``a`` that ``b`` changes (start, end) and what ``b`` has there instead."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    return p, len(a) - s, b[p:len(b) - s]


def test_pairs_swap_the_answer_and_the_control_puts_the_same_words_elsewhere() -> None:
    rows = pairs("facts", 4)
    assert len(rows) == 4
    for doc, pair, control in rows:
        assert doc != pair and doc != control and pair != control
        a_start, a_end, _ = _changed(doc, pair)
        c_start, c_end, _ = _changed(doc, control)
        assert c_end <= a_start or c_start >= a_end  # the control's change is not at the answer
        assert len(control) - len(doc) + (c_end - c_start) > 0  # something was put in its place


def test_ratio_is_zero_for_identical_pairs_and_one_for_swapped_documents() -> None:
    x = torch.randn(5, 7)
    assert _ratio(x, x) == 0.0
    assert abs(_ratio(x, x.roll(1, 0)) - 1.0) < 1e-6
