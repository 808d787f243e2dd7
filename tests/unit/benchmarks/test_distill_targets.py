"""benchmarks/distill_targets.py: documents with their questions, and distill adapters as trainer targets."""

from __future__ import annotations

import torch

from benchmarks.distill_targets import adapter_factors, draw_documents
from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer
from d2l_integrations.engine.training import delta_cosine, load_target, save_target


def test_documents_are_drawn_reproducibly_with_their_questions():
    rows = draw_documents("facts_varied", 5, 3)
    assert rows == draw_documents("facts_varied", 5, 3)  # a pure function of (seed, i): re-running resumes
    assert len({r["target"] for r in rows}) == 5
    for r in rows:
        assert 1 <= len(r["questions"]) <= 3 and all(a in r["doc"] for _, a in r["questions"])
    assert draw_documents("facts_varied", 5, 3, seed=1) != rows


def test_a_distill_adapter_becomes_a_target_with_the_same_delta(tiny_base, tmp_path):
    config = DistillConfig(max_steps=2, batch_size=2, teacher_max_new_tokens=3, max_questions=4, about_questions=1,
                           eval_every=1, lr=1e-2, chunks_per_batch=1, teacher_logprob_dtype="float32", rank=3)
    doc = draw_documents("facts_varied", 1, 2)[0]["doc"]
    adapter = DistillInternalizer(config).distill_chunks(tiny_base, [doc])[0].adapter
    factors = adapter_factors(adapter, tiny_base)
    a, b = factors["down_proj"]
    assert a.shape[:2] == b.shape[:2] == (tiny_base.num_layers, 3)
    for layer in range(tiny_base.num_layers):
        w = adapter.weights[tiny_base.module_path(layer, "down_proj")]
        assert torch.allclose(b[layer].T @ a[layer], w.delta_weight(), atol=1e-5)  # scaling folded into B
    save_target(tmp_path / "t.safetensors", factors)
    loaded = load_target(tmp_path / "t.safetensors")
    # bf16 on disk: the stored target points where the adapter's delta does
    as_rows = {"down_proj": (a.unsqueeze(0), b.unsqueeze(0))}
    assert delta_cosine(as_rows, [0], [loaded]).item() > 0.999
