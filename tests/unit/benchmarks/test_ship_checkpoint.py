"""benchmarks.ship_checkpoint: a run's checkpoint replaces the shipped one, keeping the old record's extra columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.ship_checkpoint import merged_eval, ship
from d2l_integrations.engine.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint, save_checkpoint
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.hypernetwork import Hypernetwork
from d2l_integrations.errors import CheckpointNotFoundError


def tiny(seed: int, base_model: str = "tiny") -> Hypernetwork:
    torch.manual_seed(seed)
    config = HypernetworkConfig(num_layers=2, hidden_size=16, module_dims=(("down_proj", 32, 16),), rank=2, latent_size=8,
                                num_latents=3, num_blocks=1, num_heads=4, num_kv_heads=2, head_dim=4,
                                base_model=base_model, base_model_revision="rev-1")
    return Hypernetwork(config)


def test_merged_eval_adds_only_the_missing_context_columns() -> None:
    new = {"facts": {"accuracy": {"d2l": 45.0, "no_context": 2.0}, "n": 256}, "wiki": {"accuracy": {"d2l": 10.0}}}
    old = {"facts": {"accuracy": {"d2l": 49.0, "no_context": 1.5, "full_context": 48.8}, "f1": {"full_context": 9.0}}}
    out = merged_eval(new, old)
    assert out["facts"]["accuracy"] == {"d2l": 45.0, "no_context": 2.0, "full_context": 48.8}  # measured cell kept
    assert "f1" not in out["facts"]  # a metric the new run did not report is not invented
    assert out["wiki"] == {"accuracy": {"d2l": 10.0}}
    assert new["facts"]["accuracy"] == {"d2l": 45.0, "no_context": 2.0}  # inputs untouched


def test_ship_replaces_weights_and_keeps_the_record(tmp_path: Path) -> None:
    old_dir, run_dir = tmp_path / "shipped", tmp_path / "run"
    save_checkpoint(tiny(0), old_dir, eval_table={"facts": {"accuracy": {"d2l": 49.0, "full_context": 48.8}}},
                    prefer_over_distill={"cpu": True, "cuda": False})
    doc = json.loads((old_dir / CONFIG_NAME).read_text())
    doc["metadata"]["comparison_with_distill"] = {"verdict": "v"}
    (old_dir / CONFIG_NAME).write_text(json.dumps(doc))
    new = tiny(1)
    save_checkpoint(new, run_dir, eval_table={"facts": {"accuracy": {"d2l": 45.0}}})

    meta = ship(run_dir, old_dir, "run x")
    assert meta["checkpoint_id"] == new.checkpoint_id and meta["replaces"] == doc["metadata"]["checkpoint_id"]
    assert meta["eval"]["facts"]["accuracy"] == {"d2l": 45.0, "full_context": 48.8}
    assert meta["prefer_over_distill"] == {"cpu": True, "cuda": False}
    assert meta["comparison_with_distill"]["hypernetwork_lines_measured_on"] == doc["metadata"]["checkpoint_id"]
    loaded = load_checkpoint(old_dir)
    assert loaded.checkpoint_id == new.checkpoint_id
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(loaded.state_dict().values(), new.state_dict().values(), strict=True))
    assert sorted(p.name for p in old_dir.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_ship_takes_the_table_of_an_early_export_from_the_runs_eval_json(tmp_path: Path) -> None:
    old_dir, run_dir = tmp_path / "shipped", tmp_path / "run"
    save_checkpoint(tiny(0), old_dir, eval_table={"facts": {"accuracy": {"d2l": 49.0, "full_context": 48.8}}})
    save_checkpoint(tiny(1), run_dir)  # the copy written before the evaluation: no table
    table = {"facts": {"n": 256, "accuracy": {"d2l": 41.8, "mismatched": 3.9}, "samples": {"d2l": ["x"]}, "seconds": 9.0},
             "squad": {"n": 256, "accuracy": {"d2l": 7.0}, "score": {"d2l": 4.7}, "samples": {}}}  # as train_d2l writes it
    (tmp_path / "eval.json").write_text(json.dumps(table))
    meta = ship(run_dir, old_dir, "run x", eval_json=tmp_path / "eval.json")
    assert meta["eval"] == {"facts": {"n": 256, "accuracy": {"d2l": 41.8, "mismatched": 3.9, "full_context": 48.8}},
                            "squad": {"n": 256, "accuracy": {"d2l": 7.0}, "f1": {"d2l": 4.7}}}
    with pytest.raises(ValueError, match="leave out --eval-json"):  # a config with its own table keeps it
        ship(old_dir, run_dir, "back", eval_json=tmp_path / "eval.json")


def test_ship_refuses_a_mismatched_weights_file_and_leaves_the_shipped_one(tmp_path: Path) -> None:
    old_dir, run_dir, other = tmp_path / "shipped", tmp_path / "run", tmp_path / "other"
    save_checkpoint(tiny(0), old_dir)
    save_checkpoint(tiny(1), run_dir)
    save_checkpoint(tiny(2), other)
    (run_dir / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    before = (old_dir / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="export it again"):
        ship(run_dir, old_dir, "run x")
    assert (old_dir / WEIGHTS_NAME).read_bytes() == before


def test_ship_refuses_another_base_model_and_a_missing_folder(tmp_path: Path) -> None:
    save_checkpoint(tiny(0), tmp_path / "shipped")
    save_checkpoint(tiny(1, base_model="other"), tmp_path / "run")
    with pytest.raises(ValueError, match="that base model's folder"):
        ship(tmp_path / "run", tmp_path / "shipped", "x")
    with pytest.raises(CheckpointNotFoundError):
        ship(tmp_path / "missing", tmp_path / "shipped", "x")
