"""One loaded ``D2LEngine`` per (base model, device) per process, shared by the integrations.

``ChatD2L(model="default")`` and ``D2LLLM(model="default")`` load their engine lazily on first use
through ``shared_engine``; a second model object with the same name reuses the loaded weights.
Sharing is safe: an engine's base model is frozen, and every request passes its adapters
explicitly (they are applied context-locally), so requests never see each other's documents.
"""

from __future__ import annotations

import logging
import threading

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import KnowledgeBaseMismatchError

logger = logging.getLogger(__name__)

_ENGINES: dict[tuple[str, str | None], D2LEngine] = {}
_LOCK = threading.Lock()


def shared_engine(model: str = "default", *, device: str | None = None) -> D2LEngine:
    """The process's engine for ``model`` on ``device``, loaded on first call.

    Args:
        model: ``"default"`` (embedded SmolLM2-135M-Instruct), a hub id, a folder or a ``.gguf``.
        device: ``"cpu"``, ``"cuda"``, ... (None: CUDA when available).
    """
    key = (model, device)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            logger.info("Loading D2L engine for base model %r (device=%s)", model, device or "auto")
            engine = D2LEngine.default(device=device) if model == "default" else D2LEngine.from_pretrained(model, device=device)
            _ENGINES[key] = engine
        return engine


def check_same_engine(kb_engine: D2LEngine, engine: D2LEngine) -> None:
    """Raise ``KnowledgeBaseMismatchError`` naming both models when a knowledge base was built for another engine."""
    if kb_engine is engine:
        return
    kb_ckpt = getattr(kb_engine.hypernetwork, "checkpoint_id", None)
    ckpt = getattr(engine.hypernetwork, "checkpoint_id", None)
    if kb_engine.base.name != engine.base.name or kb_engine.base.revision != engine.base.revision or kb_ckpt != ckpt:
        msg = (
            f"The knowledge base was built with base model {kb_engine.base.name!r} (revision {kb_engine.base.revision}, "
            f"checkpoint {kb_ckpt}), but this model runs {engine.base.name!r} (revision {engine.base.revision}, "
            f"checkpoint {ckpt}). Its adapters only fit their own model: pass engine=knowledge_base.engine, "
            "or rebuild the knowledge base with this engine."
        )
        raise KnowledgeBaseMismatchError(msg)


__all__ = ["check_same_engine", "shared_engine"]
