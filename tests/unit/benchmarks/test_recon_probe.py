"""benchmarks/recon_probe.py: the reconstruction loss's gradient share, and whether recon-only steps turn the delta."""

from __future__ import annotations

import json

import torch

from benchmarks.recon_probe import probe
from d2l_integrations.engine.training import save_target
from tests.unit.engine.test_training import tiny_hypernet


def _targets(base, folder, n: int = 5, rank: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    (_, d_in, d_out), = base.module_dims(["down_proj"])
    for i in range(n):
        tid = f"t{i}"
        a = torch.randn(base.num_layers, rank, d_in, generator=g)
        b = torch.randn(base.num_layers, rank, d_out, generator=g)
        save_target(folder / f"{tid}.safetensors", {"down_proj": (a, b)})
        doc = f"The lighthouse of Quarn{i} has {100 + i} lamps and a red door."
        rows.append({"target": tid, "doc": doc, "questions": [[f"How many lamps does Quarn{i} have?", str(100 + i)]]})
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_probe_measures_both_gradients_and_recon_only_steps_turn_the_delta(tiny_base, tmp_path):
    _targets(tiny_base, tmp_path)
    torch.manual_seed(0)
    lines = probe(tiny_base, tiny_hypernet(tiny_base), str(tmp_path), rows=3, steps=20, lr=1e-2)
    first, last = lines[0], lines[-1]
    assert first["rows"] >= 2 and first["grad_norm_recon"] > 0 and first["grad_norm_distill"] > 0
    assert -1.0 <= first["grad_cosine"] <= 1.0
    assert set(first["layer_delta_norm_row0"]) == {"down_proj"}
    before = sum(first["cos"]) / len(first["cos"])
    after = sum(last["cos"]) / len(last["cos"])
    assert last["after_steps"] == 20 and last["mode"] == "recon_only"
    assert after > before + 0.05  # the loss can steer the direction when it is alone


def test_probe_steps_on_the_training_loss_with_a_weight(tiny_base, tmp_path):
    _targets(tiny_base, tmp_path)
    torch.manual_seed(0)
    lines = probe(tiny_base, tiny_hypernet(tiny_base), str(tmp_path), rows=3, steps=3, lr=1e-2, weight=100.0)
    steps = [d for d in lines if "step" in d]
    assert [d["step"] for d in steps] == [1, 3] and all("distill_loss_before_step" in d for d in steps)
    assert lines[-1]["mode"] == "distill+100*recon" and lines[-1]["after_steps"] == 3
