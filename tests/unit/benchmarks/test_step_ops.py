"""benchmarks/step_ops.py: operator calls of one training step, per phase."""

from __future__ import annotations

from benchmarks.step_ops import count_step_ops, time_step_phases
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig
from tests.unit.engine.test_training import tiny_hypernet


def test_counts_every_phase_of_a_step_and_leaves_the_trainer_as_it_was(tiny_base):
    cfg = TrainingConfig(tasks=(("needle_alone/2", 1.0),), batch_size=3, max_doc_tokens=48, eval_every=0, save_every=10**9,
                         prefetch=False)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), cfg)
    counts = count_step_ops(trainer)
    assert {"data", "teacher", "hypernetwork", "student", "losses", "backward", "optimizer"} <= set(counts)
    assert all(v > 0 for v in counts.values()) and trainer.step == 1
    assert "teacher" not in trainer.__dict__ and "step" not in trainer.optimizer.__dict__  # the wrappers are gone
    again = count_step_ops(trainer)
    assert again["teacher"] == counts["teacher"] and trainer.step == 2  # the same work per step, counted alike


def test_times_every_phase_of_a_step_within_its_wall_time(tiny_base):
    """--time: host and kernel milliseconds per phase (the kernels are 0 on the CPU), inside the step's wall time."""
    cfg = TrainingConfig(tasks=(("needle_alone/2", 1.0),), batch_size=3, max_doc_tokens=48, eval_every=0, save_every=10**9,
                         prefetch=False)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), cfg)
    trainer.train_step()
    got = time_step_phases(trainer)
    phases = got["phases"]
    assert {"data", "teacher", "hypernetwork", "student", "losses", "backward", "optimizer"} <= set(phases)
    assert all(p["host_ms"] > 0 and p["kernel_ms"] == 0 for p in phases.values())
    assert got["kernel_ms"] == 0 and got["gpu_busy"] == 0
    assert sum(p["host_ms"] for p in phases.values()) <= got["wall_ms"]  # on the CPU every phase runs on this thread
    assert trainer.step == 2 and "teacher" not in trainer.__dict__ and "step" not in trainer.optimizer.__dict__
