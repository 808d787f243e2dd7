"""benchmarks/head_start.py on the real default model (one step; slow)."""

from __future__ import annotations

import math

import pytest


def test_bad_variant_says_which_exist() -> None:
    from benchmarks.head_start import main

    with pytest.raises(SystemExit, match="b, b_scaler1 or ab"):
        main(["c", "1"])


@pytest.mark.slow
def test_one_step_of_the_b_head_on_the_shipped_encoder() -> None:
    from benchmarks.head_start import main
    from d2l_integrations.engine.engine import shipped_checkpoint_path

    if shipped_checkpoint_path("HuggingFaceTB/SmolLM2-135M-Instruct") is None:
        pytest.skip("no checkpoint ships for the default model")
    result = main(["b", "1"])
    assert result["steps"] == 1 and len(result["kl_per_step"]) == 1
    assert math.isfinite(result["kl_per_step"][0]) and result["kl_per_step"][0] > 0
