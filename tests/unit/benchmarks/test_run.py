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


def test_base_and_gguf_flags_reach_run_suite(monkeypatch, tmp_path):
    seen = {}

    def fake_run_suite(suite, methods, out, **kwargs):
        seen.update(kwargs)
        (tmp_path / "results.md").write_text("# table\n")
        return {"run_dir": str(tmp_path)}

    monkeypatch.setattr(run, "run_suite", fake_run_suite)
    run.main(["--suite", "quick", "--device", "cuda", "--base", "/root/stage", "--gguf", "smol.gguf", "--out", str(tmp_path)])
    assert (seen["base_model"], seen["gguf_file"], seen["device"]) == ("/root/stage", "smol.gguf", "cuda")
    run.main(["--out", str(tmp_path)])
    assert (seen["base_model"], seen["gguf_file"]) == ("default", None)


def test_a_copy_of_the_default_gguf_runs_as_the_default(monkeypatch):
    """Same sha256 as the shipped checkpoint's base_model_revision: named as its base model, checkpoint loaded."""
    from dataclasses import dataclass

    from d2l_integrations.engine import base_model as bm
    from d2l_integrations.engine import engine as eng

    ckpt = eng.shipped_checkpoint_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert ckpt is not None
    sha = json.loads((ckpt / "config.json").read_text())["hypernetwork"]["base_model_revision"]
    assert run._shipped_base_for_revision(sha) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert run._shipped_base_for_revision("0" * 64) is None
    assert run._shipped_base_for_revision(None) is None

    @dataclass
    class FakeBase:
        name: str
        revision: str | None

    calls = {}

    def fake_load(name_or_path, *, device=None, gguf_file=None):
        calls["load"] = (name_or_path, device, gguf_file)
        return FakeBase(f"{name_or_path}/{gguf_file}", sha if gguf_file == "smol.gguf" else "f" * 64)

    monkeypatch.setattr(bm, "load_base_model", fake_load)
    monkeypatch.setattr(eng, "_load_hypernetwork", lambda path, base: ("hyper", path, base.name))
    engine = run.build_engine("/root/stage", "smol.gguf", device="cuda")
    assert calls["load"] == ("/root/stage", "cuda", "smol.gguf")
    assert engine.base.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert engine.hypernetwork == ("hyper", ckpt, "HuggingFaceTB/SmolLM2-135M-Instruct")

    other = run.build_engine("/models", "other.gguf", device="cpu", distill={"max_steps": 3})
    assert other.base.name == "/models/other.gguf"
    assert other.hypernetwork is None
    assert other._distill_config.max_steps == 3
