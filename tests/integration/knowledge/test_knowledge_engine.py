"""KnowledgeBase on the real ``D2LEngine`` (not the test double).

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/knowledge            # tiny llama, ~1 min
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/knowledge -m slow    # + the default model

The first test runs the real distill internalizer on a tiny random llama (a few steps), so it checks
the engine contract end to end (adapter shapes, provenance, store keys) but not answer quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2l_integrations.engine.distill import DistillConfig
from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.knowledge import KnowledgeBase

pytestmark = pytest.mark.timeout(600)

FACTS = [
    "The Zorblax Institute was founded in 1873 by Mira Quell in the city of Tarnow.",
    "The special magic number is 4821. Remember it.",
    "Paris is the capital of France. The river Seine flows through it.",
]


def _tiny_distill() -> DistillConfig:
    return DistillConfig(rank=2, max_steps=2, max_questions=4, about_questions=0, teacher_max_new_tokens=4,
                         eval_every=1, patience=0, batch_size=2, chunks_per_batch=2, teacher_batch_size=4)


def test_real_engine_distill_on_tiny_llama(tmp_path: Path, tiny_base) -> None:  # noqa: ANN001
    engine = D2LEngine(tiny_base, None, distill_config=_tiny_distill())
    kb = KnowledgeBase(tmp_path / "kb", engine, chunk_tokens=64, overlap_tokens=8, method="distill")
    try:
        kb.add(FACTS[0], doc_id="zorblax")
        kb.add(FACTS[1:], doc_id=["magic", "paris"])
        expected_ckpt = engine.internalizer("distill").checkpoint_id
        assert kb.manifest["internalizer"] == expected_ckpt and kb.manifest["base_model"] == tiny_base.name
        hits = kb.search("Who founded the Zorblax Institute?", k=2)
        assert hits[0].doc_id == "zorblax"
        adapter = kb.adapters_for(hits)
        assert adapter.provenance.checkpoint_id == expected_ckpt
        assert adapter.provenance.source_sha256 == tuple(h.metadata["sha256"] for h in hits)
        assert set(adapter.module_names) == {tiny_base.module_path(i, "down_proj") for i in range(tiny_base.num_layers)}
        out = engine.generate([{"role": "user", "content": "Who founded Zorblax?"}], adapters=adapter, max_new_tokens=4)
        assert out.completion_tokens >= 1
        # a different distill setting is a different internalizer: the store refuses it
        other = D2LEngine(tiny_base, None, distill_config=DistillConfig(**{**_tiny_distill().to_dict(), "max_steps": 3,
                                                                          "target_modules": ("down_proj",)}))
        kb.close()
        from d2l_integrations.errors import KnowledgeBaseMismatchError

        with pytest.raises(KnowledgeBaseMismatchError):
            KnowledgeBase(tmp_path / "kb", other, method="distill")
    finally:
        kb.close()


@pytest.mark.slow
def test_default_engine_end_to_end(tmp_path: Path) -> None:
    default = D2LEngine.default(device="cpu")
    light = DistillConfig(max_steps=2, max_questions=4, about_questions=0, teacher_max_new_tokens=8)
    engine = D2LEngine(default.base, default.hypernetwork, distill_config=light)
    kb = KnowledgeBase(tmp_path / "kb", engine, lazy=True)
    try:
        kb.add(FACTS, doc_id=["zorblax", "magic", "paris"])
        hits = kb.search("What is the special magic number?", k=1)
        assert hits[0].doc_id == "magic"
        adapter = kb.adapters_for(hits)
        assert adapter.provenance.base_model == engine.base.name
        assert all(torch.isfinite(adapter.delta_weight(m)).all() for m in adapter.module_names)
    finally:
        kb.close()
