"""engine_bench on the tiny engine: every measure is reported, including where internalize time goes."""

from __future__ import annotations

from benchmarks import engine_bench
from d2l_integrations.engine.engine import D2LEngine


def test_reports_the_encoder_and_hypernetwork_split(tiny_base, monkeypatch, tmp_path):
    seen = {}

    def default(*, device=None, dtype="auto"):  # noqa: ANN001, ANN202
        seen["dtype"] = dtype
        return D2LEngine(tiny_base, None)

    monkeypatch.setattr(D2LEngine, "default", staticmethod(default))
    monkeypatch.setattr(engine_bench, "CHUNK_TOKENS", 64)
    monkeypatch.setattr(engine_bench, "NEW_TOKENS", 4)
    monkeypatch.setattr(engine_bench, "REPEATS", 1)
    out = tmp_path / "engine.md"

    results = engine_bench.main(["--dtype", "float32", "--out", str(out)])

    assert seen["dtype"] == "float32"
    assert results["internalize_encoder_pass_s"] > 0 and results["internalize_hypernetwork_s"] > 0
    text = out.read_text()
    assert "of which: the base model's pass over the chunk / the hypernetwork" in text
    assert "UNTRAINED, random init (timing only)" in text
    assert "--dtype float32 --out" in text
