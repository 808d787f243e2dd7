"""``D2LMemory``: agent memory as internalized adapters, shaped like mem0 / LangGraph's store.

    memory = D2LMemory(KnowledgeBase("agent_memory", engine))
    item = memory.remember("Alice's cat is called Pixel.", namespace=("user", "alice"))
    memory.recall("What is Alice's cat called?", namespace=("user", "alice")).answer
    memory.forget(item.id)                       # or memory.forget(namespace=("user", "alice"))
    memory.reset()

Each memory is one document of a ``KnowledgeBase`` (id = memory id, metadata ``namespace`` and
``kind="memory"``): its text is indexed in Chroma and internalized into a LoRA adapter. ``recall``
routes like every other query (D2L adapters of the relevant memories, or RAG). ``forget`` removes
the text, the embedding and the adapter together (``KnowledgeBase.delete``) and verifies it: a
forgotten memory is neither retrievable nor applied afterwards.

Framework-free: the LangChain and LlamaIndex tools (``langchain/tools.py``, ``llama_index/tools.py``)
are thin wrappers over this class.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from d2l_integrations.errors import ConfigError, D2LError, DocumentNotFoundError
from d2l_integrations.routing import RouteDecision, Router, RouterConfig

logger = logging.getLogger(__name__)

Namespace = tuple[str, ...]
MEMORY_KIND = "memory"
DEFAULT_NAMESPACE: Namespace = ("default",)


@dataclass(frozen=True)
class MemoryItem:
    """One stored memory.

    Args:
        id: memory id (also its document id in the knowledge base).
        namespace: e.g. ``("user", "alice")``.
        text: what was remembered.
        score: similarity to the query (``search``/``recall``), 1.0 otherwise.
        metadata: user metadata given to ``remember``.
    """

    id: str
    namespace: Namespace
    text: str
    score: float = 1.0
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recall:
    """The answer to a question about memories, with the memories it came from.

    Args:
        answer: the model's answer.
        memories: memories whose adapters were applied or whose text was in the prompt.
        decision: the route and why.
    """

    answer: str
    memories: tuple[MemoryItem, ...]
    decision: RouteDecision


def parse_namespace(namespace: Namespace | Sequence[str] | str | None) -> Namespace:
    """``"user/alice"`` or ``("user", "alice")`` -> ``("user", "alice")``; None -> ``("default",)``."""
    if namespace is None:
        return DEFAULT_NAMESPACE
    parts = tuple(p for p in namespace.split("/")) if isinstance(namespace, str) else tuple(str(p) for p in namespace)
    if not parts or any(not p or "/" in p for p in parts):
        msg = f"Invalid namespace {namespace!r}: use non-empty labels, e.g. ('user', 'alice') or 'user/alice'."
        raise ConfigError(msg)
    return parts


def namespace_key(namespace: Namespace) -> str:
    return "/".join(namespace)


class D2LMemory:
    """Long-term agent memory: remember / recall / forget / reset, over a ``KnowledgeBase``.

    Args:
        knowledge_base: where memories live (a dedicated folder is best; other documents in it
            are left alone). It must have an engine.
        router_config: routing thresholds for ``recall`` (default: the base model's calibration).
        max_new_tokens: answer length of ``recall``.
    """

    def __init__(self, knowledge_base: Any, *, router_config: RouterConfig | None = None, max_new_tokens: int = 64) -> None:
        if getattr(knowledge_base, "engine", None) is None:
            msg = "D2LMemory needs a KnowledgeBase opened with an engine: KnowledgeBase(path, engine)."
            raise ConfigError(msg)
        self.knowledge_base = knowledge_base
        self.router = Router(knowledge_base.engine, knowledge_base, router_config)
        self.max_new_tokens = max_new_tokens

    # ------------------------------------------------------------------ write
    def remember(
        self,
        text: str,
        namespace: Namespace | Sequence[str] | str | None = None,
        *,
        id: str | None = None,  # noqa: A002 - mem0 / LangGraph store name
        metadata: Mapping[str, Any] | None = None,
    ) -> MemoryItem:
        """Store ``text`` (indexed and internalized); an existing ``id`` is replaced."""
        ns = parse_namespace(namespace)
        memory_id = id or f"mem-{uuid.uuid4().hex[:16]}"
        user_meta = {k: v for k, v in (metadata or {}).items() if k not in ("namespace", "kind")}
        self.knowledge_base.add(
            text, doc_id=memory_id, metadata={**user_meta, "namespace": namespace_key(ns), "kind": MEMORY_KIND}, progress=False
        )
        logger.info("Remembered %s in namespace %s", memory_id, namespace_key(ns))
        return MemoryItem(memory_id, ns, text, 1.0, user_meta)

    def forget(
        self, id: str | Sequence[str] | None = None, *, namespace: Namespace | Sequence[str] | str | None = None  # noqa: A002
    ) -> list[str]:
        """Forget memories by id, or every memory in ``namespace`` (and its sub-namespaces); return their ids.

        Text, embeddings and adapters go together, then the removal is verified.

        Raises:
            ConfigError: neither or both of ``id`` and ``namespace`` given.
            DocumentNotFoundError: an id is not a stored memory.
        """
        if (id is None) == (namespace is None):
            msg = "Pass exactly one of id=... (one or more memory ids) or namespace=... to forget()."
            raise ConfigError(msg)
        if id is not None:
            ids = [id] if isinstance(id, str) else list(id)
            for memory_id in ids:
                self.get(memory_id)  # raises DocumentNotFoundError naming the id
        else:
            ids = [m.id for m in self.list(namespace)]
        for memory_id in ids:
            self.knowledge_base.delete(memory_id)
        self._verify_forgotten(ids)
        logger.info("Forgot %d memories", len(ids))
        return ids

    def reset(self) -> int:
        """Forget every memory (other documents in the knowledge base stay); return how many."""
        ids = [m.id for m in self.list()]
        for memory_id in ids:
            self.knowledge_base.delete(memory_id)
        self._verify_forgotten(ids)
        return len(ids)

    def _verify_forgotten(self, ids: Sequence[str]) -> None:
        left = [i for i in ids if i in self.knowledge_base]
        if left:
            msg = f"Memories {left} are still in the knowledge base after delete(); run KnowledgeBase.repair()."
            raise D2LError(msg)

    # ------------------------------------------------------------------ read
    def get(self, id: str) -> MemoryItem:  # noqa: A002
        """One memory by id. Raises ``DocumentNotFoundError``."""
        info = self.knowledge_base.get(id)
        if info.metadata.get("kind") != MEMORY_KIND:
            msg = f"Document {id!r} is not a memory (it was added to the knowledge base directly)."
            raise DocumentNotFoundError(msg)
        text = "\n".join(c.text for c in self.knowledge_base.chunks(id))
        return _item(info.doc_id, info.metadata, text, 1.0)

    def list(self, namespace: Namespace | Sequence[str] | str | None = None) -> list[MemoryItem]:
        """Memories in ``namespace`` and its sub-namespaces (all memories when None), oldest first."""
        prefix = parse_namespace(namespace) if namespace is not None else ()
        items = []
        for info in self.knowledge_base.list():
            ns = parse_namespace(str(info.metadata.get("namespace", "default")))
            if info.metadata.get("kind") == MEMORY_KIND and ns[: len(prefix)] == prefix and info.doc_id in self.knowledge_base:
                text = "\n".join(c.text for c in self.knowledge_base.chunks(info.doc_id))
                items.append(_item(info.doc_id, info.metadata, text, 1.0))
        return items

    def search(self, query: str, namespace: Namespace | Sequence[str] | str | None = None, *, k: int = 4) -> list[MemoryItem]:
        """The ``k`` memories most similar to ``query`` (one item per memory, best chunk score)."""
        where = self._where(namespace)
        if where is None:
            return []
        best: dict[str, MemoryItem] = {}
        for hit in self.knowledge_base.search(query, k=k, where=where):
            if hit.doc_id not in best:
                best[hit.doc_id] = _item(hit.doc_id, hit.metadata, hit.text, float(hit.score))
        return list(best.values())

    def recall(
        self, query: str, namespace: Namespace | Sequence[str] | str | None = None, *, route: str | None = None
    ) -> Recall:
        """Answer ``query`` from the memories in ``namespace`` (routed: adapters, or RAG when unsure)."""
        where = self._where(namespace)
        messages = [{"role": "user", "content": query}]
        if where is None:  # no memories in scope: the plain model answers, and says so in the decision
            answer = Router(self.router.engine, None, self.router.config).answer(messages, max_new_tokens=self.max_new_tokens)
            return Recall(answer.text, (), answer.decision)
        answer = self.router.answer(messages, route=route, where=where, max_new_tokens=self.max_new_tokens)
        memories = tuple(_item(c.doc_id, c.metadata, c.text, float(c.score)) for c in answer.chunks)
        return Recall(answer.text, memories, answer.decision)

    def _where(self, namespace: Namespace | Sequence[str] | str | None) -> dict[str, Any] | None:
        """Chroma filter for memories under ``namespace``; None when no memory is in scope."""
        if namespace is None:
            return {"kind": MEMORY_KIND}
        keys = sorted({namespace_key(m.namespace) for m in self.list(namespace)})
        if not keys:
            return None
        return {"$and": [{"kind": MEMORY_KIND}, {"namespace": {"$in": keys}}]}


def _item(memory_id: str, metadata: Mapping[str, Any], text: str, score: float) -> MemoryItem:
    ns = parse_namespace(str(metadata.get("namespace", "default")))
    reserved = {"namespace", "kind", "doc_id", "chunk_index", "sha256", "num_tokens", "source", "filetype", "element_type"}
    user = {k: v for k, v in metadata.items() if k not in reserved}
    return MemoryItem(memory_id, ns, text, score, user)


__all__ = ["D2LMemory", "MemoryItem", "Recall", "namespace_key", "parse_namespace"]
