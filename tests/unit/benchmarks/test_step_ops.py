"""benchmarks/step_ops.py: operator calls of one training step, per phase."""

from __future__ import annotations

from benchmarks.step_ops import count_step_ops
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
