"""The command line (also behind `d2l bench`), the price table and the peak-memory probe."""

from __future__ import annotations

import json

import pytest

from benchmarks import run


def test_main_passes_arguments_to_run_suite(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_suite(suite, methods, out, **kwargs):
        seen.update(suite=suite, methods=methods, out=out, **kwargs)
        (tmp_path / "results.md").write_text("# table\n")
        return {"run_dir": str(tmp_path)}

    monkeypatch.setattr(run, "run_suite", fake_run_suite)
    code = run.main(["--suite", "quick", "--methods", "rag,d2l", "--tasks", "facts", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert (seen["suite"], seen["methods"], seen["tasks"], seen["progress"]) == ("quick", "rag,d2l", ["facts"], False)
    assert seen["command"].startswith("python -m benchmarks.run --suite quick")
    assert "# table" in capsys.readouterr().out


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit) as err:
        run.main(["--suite", "enormous"])
    assert err.value.code == 2


def test_unknown_method_is_named(tmp_path):
    with pytest.raises(ValueError, match="Unknown methods"):
        run.run_suite("tiny", "rag,telepathy", tmp_path, engine=object())


def test_price_table(tmp_path):
    prices = run.load_prices()
    assert set(prices) >= {"prompt_usd_per_1k_tokens", "completion_usd_per_1k_tokens", "cpu_usd_per_hour", "gpu_usd_per_hour"}
    assert not any(k.startswith("_") for k in prices)
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"cpu_usd_per_hour": 1}))
    with pytest.raises(ValueError, match="lacks"):
        run.load_prices(bad)


def test_peak_memory_sees_an_allocation():
    with run.PeakMemory("cpu") as mem:
        block = bytearray(64 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        import time

        time.sleep(0.1)
    assert mem.peak_bytes > 64 * 2**20


def test_calibration_titles_are_parsed():
    from d2l_integrations.routing.config import RouterConfig

    cfg = RouterConfig(calibrated_on="squad_v1.1_dev_open titles=['Normans', 'Geology'] paragraphs=12")
    assert run.calibration_titles(cfg) == ["Normans", "Geology"]
    assert run.calibration_titles(RouterConfig()) == []
