"""The six ways to answer a question from documents, measured the same way.

    base          the plain model, no document anywhere (what the model already knows)
    full_context  every document of the question in the prompt (the baseline D2L saves tokens against)
    rag           the top-k retrieved chunks in the prompt (Chroma, all-MiniLM-L6-v2)
    d2l           chunk adapters summed and applied, only the question in the prompt
    hybrid        those adapters and the retrieved chunks' text
    auto          the router's ``auto`` policy (routing/policies.py) picks one of the above per question,
                  with its confidence fallback from d2l to rag

Every method runs through the product's ``Router`` (``d2l_integrations.routing.router``), with the
same calibration file (``RouterConfig.default``): ``auto`` as the policy, the others as forced routes
(``base``: a router without a knowledge base), so prompts, chunk and adapter selection, the confidence
fallback and its cost are what a user of ``Router``/``ChatD2L`` gets. The router sees a
``QuestionKnowledge``: the benchmark's chunks and adapters of the question's documents, behind the
``KnowledgeBase`` methods the router calls (``search``, ``adapters_for``, ``list``, ``chunks``). Only
the summed-adapters curve (``answer_with_n_adapters``) bypasses the router, since it applies chosen
adapters on purpose.

``Workbench`` holds what the methods share: the engine, the chunks, one Chroma collection, and the
chunk adapters (internalized once per document, before any question). ``Workbench.answer`` returns
one plain dict per question: the prediction, tokens, timings and route.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.datasets import Question, Task
from d2l_integrations.engine.lora import LoRAAdapter, compose_adapters
from d2l_integrations.errors import ContextLengthError, NoAdaptersError
from d2l_integrations.routing.config import RouterConfig
from d2l_integrations.routing.decision import Route
from d2l_integrations.routing.router import Router

logger = logging.getLogger(__name__)

METHODS = ("base", "full_context", "rag", "d2l", "hybrid", "auto")
ADAPTER_METHODS = ("d2l", "hybrid", "auto")


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    text: str


@dataclass
class DocCost:
    """One-off cost of internalizing one document."""

    doc_id: str
    task: str
    n_chunks: int
    internalize_s: float = 0.0
    adapter_bytes: int = 0
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""


@dataclass
class Workbench:
    """Shared state of one benchmark run.

    Args:
        engine: a ``D2LEngine``.
        tasks: the tasks whose documents are indexed and internalized.
        embedder: callable texts -> unit vectors (default: the knowledge base's MiniLM function).
        router: thresholds and the context template (``RouterConfig.default`` for the engine's model).
        chunk_tokens: chunk length, shared by retrieval and internalization so a chunk's text and
            its adapter are the same unit.
        internalize_method: ``auto`` | ``distill`` | ``hypernetwork`` (``D2LEngine.internalizer``).
        max_chunks_per_doc: documents with more chunks are not internalized (d2l then reports
            ``skipped``); None internalizes everything.
        max_new_tokens: answer length cap for every method.
    """

    engine: Any
    tasks: Sequence[Task]
    embedder: Callable[[list[str]], Any] | None = None
    router: RouterConfig | None = None
    chunk_tokens: int | None = None
    internalize_method: str = "auto"
    max_chunks_per_doc: int | None = None
    max_new_tokens: int = 24
    chunks: dict[str, Chunk] = field(default_factory=dict)
    doc_chunks: dict[str, list[str]] = field(default_factory=dict)
    adapters: dict[str, LoRAAdapter] = field(default_factory=dict)
    doc_costs: dict[str, DocCost] = field(default_factory=dict)
    internalizer_name: str | None = None
    internalizer_checkpoint: str | None = None
    index_s: float = 0.0

    def __post_init__(self) -> None:
        self.router = self.router or RouterConfig.default(self.engine.base.name)
        if self.embedder is None:
            from d2l_integrations.knowledge.embeddings import MiniLMEmbeddingFunction

            self.embedder = MiniLMEmbeddingFunction()
        self.documents = {d: t for task in self.tasks for d, t in task.documents.items()}
        self.doc_task = {d: task.name for task in self.tasks for d in task.documents}
        self._collection = None
        self._views: dict[tuple[str, ...], QuestionKnowledge] = {}
        self._num_tokens: dict[str, int] = {}

    def chunk_num_tokens(self, chunk_id: str) -> int:
        """Tokens of one chunk (cached)."""
        if chunk_id not in self._num_tokens:
            self._num_tokens[chunk_id] = self.engine.count_tokens(self.chunks[chunk_id].text)
        return self._num_tokens[chunk_id]

    # ------------------------------------------------------------------ index (rag)
    def index(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Chunk every document and put the chunks in an in-memory Chroma collection."""
        import chromadb
        from chromadb.config import Settings

        t0 = time.perf_counter()
        for i, (doc_id, text) in enumerate(self.documents.items()):
            ids = []
            for j, chunk in enumerate(self.engine.chunk(text, chunk_tokens=self.chunk_tokens)):
                chunk_id = f"{doc_id}#{j}"
                self.chunks[chunk_id] = Chunk(chunk_id, doc_id, chunk)
                ids.append(chunk_id)
            self.doc_chunks[doc_id] = ids
            if progress:
                progress(i + 1, len(self.documents))
        client = chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False, allow_reset=True))
        name = f"bench-{id(self)}"
        self._collection = client.get_or_create_collection(name, metadata={"hnsw:space": "cosine"}, embedding_function=None)
        ids = list(self.chunks)
        for start in range(0, len(ids), 256):
            batch = ids[start : start + 256]
            texts = [self.chunks[c].text for c in batch]
            self._collection.add(
                ids=batch, documents=texts, embeddings=[list(map(float, v)) for v in self.embedder(texts)],
                metadatas=[{"doc_id": self.chunks[c].doc_id} for c in batch],
            )
        self.index_s = time.perf_counter() - t0

    def retrieve(self, query: str, doc_ids: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The ``k`` chunks of ``doc_ids`` most similar to ``query``: (chunk id, cosine similarity), best first."""
        pool = sum(len(self.doc_chunks[d]) for d in doc_ids)
        where = {"doc_id": doc_ids[0]} if len(doc_ids) == 1 else {"doc_id": {"$in": list(doc_ids)}}
        result = self._collection.query(
            query_embeddings=[list(map(float, self.embedder([query])[0]))], n_results=max(1, min(k, pool)),
            where=where, include=["distances"],
        )
        return [(c, 1.0 - float(d)) for c, d in zip(result["ids"][0], result["distances"][0], strict=True)]

    # ------------------------------------------------------------------ internalize (d2l)
    def internalize(self, progress: Callable[[int, int], None] | None = None) -> None:
        """One adapter per chunk of every document within the budget.

        All chunks go to the internalizer in one call, so it can batch them (distill trains
        ``chunks_per_batch`` chunks together); a document's ``internalize_s`` is the call's wall time
        times the document's share of the chunks (the amortised one-off cost per document).
        """
        internalizer = self.engine.internalizer(self.internalize_method)
        self.internalizer_name = internalizer.name
        self.internalizer_checkpoint = getattr(internalizer, "checkpoint_id", None)
        todo: list[str] = []
        for doc_id in self.documents:
            chunk_ids = self.doc_chunks[doc_id]
            cost = DocCost(doc_id, self.doc_task[doc_id], len(chunk_ids))
            self.doc_costs[doc_id] = cost
            if self.max_chunks_per_doc is not None and len(chunk_ids) > self.max_chunks_per_doc:
                cost.status = "skipped"
                cost.reason = f"{len(chunk_ids)} chunks > this suite's internalize budget of {self.max_chunks_per_doc} per document"
            else:
                todo.append(doc_id)
        chunk_ids = [c for d in todo for c in self.doc_chunks[d]]
        if not chunk_ids:
            return
        t0 = time.perf_counter()
        try:
            made = self.engine.internalize_chunks([self.chunks[c].text for c in chunk_ids], method=self.internalize_method,
                                                  chunk_ids=chunk_ids, progress=progress)
        except Exception as err:  # noqa: BLE001 - reported per document; the other methods still run
            logger.warning("Internalization failed: %s", err)
            for d in todo:
                self.doc_costs[d].status, self.doc_costs[d].reason = "failed", f"{type(err).__name__}: {err}"
            return
        per_chunk_s = (time.perf_counter() - t0) / len(chunk_ids)
        self.adapters.update(zip(chunk_ids, made, strict=True))
        for d in todo:
            cost = self.doc_costs[d]
            cost.internalize_s = per_chunk_s * cost.n_chunks
            cost.adapter_bytes = sum(self.adapters[c].nbytes for c in self.doc_chunks[d])
            cost.status = "ok"

    # ------------------------------------------------------------------ answering
    def answer(self, method: str, task: Task, q: Question) -> dict[str, Any]:
        """Answer ``q`` with ``method``; a plain dict with the prediction, its cost and how it was made."""
        t0 = time.perf_counter()
        row: dict[str, Any] = {"method": method, "task": task.name, "kind": task.kind, "id": q.id, "question": q.question,
                               "answers": list(q.answers), "meta": dict(q.meta), "status": "ok", "route": method,
                               "retrieve_s": 0.0, "n_adapters": 0, "chunk_ids": []}
        try:
            self._routed(method, q, row)
        except ContextLengthError as err:
            row.update(status="over_context", prediction="", reason=str(err))
        except NoAdaptersError as err:
            row.update(status="skipped", prediction="", reason=str(err))
        row["latency_s"] = time.perf_counter() - t0
        return row

    def knowledge(self, doc_ids: Sequence[str]) -> QuestionKnowledge:
        """The router's view of ``doc_ids`` (one per distinct set, so its token count is cached)."""
        key = tuple(doc_ids)
        if key not in self._views:
            self._views[key] = QuestionKnowledge(self, key)
        return self._views[key]

    def _routed(self, method: str, q: Question, row: dict[str, Any]) -> None:
        """Answer through the product's ``Router``, exactly as ``Router.answer`` does (plan, generate,
        finish, confidence fallback), keeping the first generation's cost when the fallback re-answers."""
        knowledge = None if method == "base" else self.knowledge(q.doc_ids)
        router = Router(self.engine, knowledge, config=self.router)
        messages = [{"role": "user", "content": q.question}]
        settings = {"max_new_tokens": self.max_new_tokens}
        t0 = time.perf_counter()
        # ``base``: no knowledge base and nothing internalized, so ``auto`` decides the plain model
        plan = router.plan(messages, route=Route.AUTO if method in ("auto", "base") else method)
        row["route"], row["route_reason"] = plan.decision.route.value, plan.decision.reason  # kept if generation fails
        row["retrieve_s"] = plan.timings.get("retrieve_s", 0.0)
        row["compose_s"] = plan.timings.get("internalize_s", 0.0)
        if plan.retrieved:
            row["retrieved"] = [[c.chunk_id, round(float(c.score), 4)] for c in plan.retrieved]
        if method == "full_context":
            row["prompt_tokens_needed"] = plan.signals.knowledge_tokens
        first = self.engine.generate(plan.messages, adapters=plan.adapter, **settings)
        answer = router.finish(plan, first, started=t0)
        final = router.fall_back_if_unsure(answer, plan, messages, None, started=t0, **settings)
        gen, decision = final.generation, final.decision
        chunk_ids = set(decision.chunk_ids)
        if plan.decision.uses_adapters:
            row["n_adapters"] = len(plan.decision.adapter_ids)
            chunk_ids |= set(plan.decision.chunk_ids)
        row.update(
            route=decision.route.value, route_reason=decision.reason, chunk_ids=sorted(chunk_ids),
            prediction=gen.text, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
            mean_logprob=gen.mean_logprob, finish_reason=gen.finish_reason,
            ttft_s=row["retrieve_s"] + row["compose_s"] + gen.timings.get("first_token_s", 0.0),
            generate_s=final.timings.get("generate_s", 0.0),
        )
        if final is not answer:  # the confidence fallback re-answered: both generations were paid for
            row["fallback_from"] = plan.decision.route.value
            row["prompt_tokens"] += first.prompt_tokens
            row["completion_tokens"] += first.completion_tokens
            row["ttft_s"] += first.timings.get("total_s", 0.0)  # the first answer was generated and discarded first

    # ------------------------------------------------------------------ the summed-adapters curve
    def answer_with_n_adapters(self, task: Task, q: Question, n: int) -> dict[str, Any]:
        """d2l with the gold document's chunk adapters plus distractor documents' up to ``n`` adapters.

        Bypasses the router on purpose (the router would pick adapters by relevance and its budget):
        only the question is in the prompt and exactly these ``n`` adapters are summed.
        """
        gold = q.meta.get("gold_doc", q.doc_ids[0])
        others = [d for d in q.doc_ids if d != gold]
        chunk_ids = [c for d in [gold, *others] for c in self.doc_chunks[d]][:n]
        t0 = time.perf_counter()
        row: dict[str, Any] = {"method": "d2l_sum", "task": task.name, "kind": task.kind, "id": q.id, "question": q.question,
                               "answers": list(q.answers), "meta": dict(q.meta), "status": "ok", "route": "d2l",
                               "retrieve_s": 0.0, "n_adapters": 0, "chunk_ids": []}
        try:
            missing = [c for c in chunk_ids if c not in self.adapters]
            if missing:
                msg = f"{len(missing)} of {len(chunk_ids)} chunks have no adapter."
                raise NoAdaptersError(msg)
            t1 = time.perf_counter()
            adapter = compose_adapters([self.adapters[c] for c in chunk_ids])
            row.update(compose_s=time.perf_counter() - t1, n_adapters=len(chunk_ids), chunk_ids=sorted(chunk_ids))
            gen = self.engine.generate([{"role": "user", "content": q.question}], adapters=adapter, max_new_tokens=self.max_new_tokens)
            row.update(
                prediction=gen.text, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                mean_logprob=gen.mean_logprob, finish_reason=gen.finish_reason,
                ttft_s=row["compose_s"] + gen.timings.get("first_token_s", 0.0), generate_s=gen.timings.get("total_s", 0.0),
            )
        except NoAdaptersError as err:
            row.update(status="skipped", prediction="", reason=str(err))
        row["latency_s"] = time.perf_counter() - t0
        return row


class QuestionKnowledge:
    """The knowledge of one question (its documents' chunks and adapters), as the router sees a
    ``KnowledgeBase``: ``search``, ``adapters_for``, ``list`` and ``chunks`` with the same return types.

    Scores are cosine similarities from the same embedder as the knowledge base's, so the router's
    calibrated ``min_relevance`` means the same here. A chunk's ``adapter_id`` is its chunk id when it
    was internalized, else None (as in a lazy knowledge base, which the router then routes around).
    """

    def __init__(self, bench: Workbench, doc_ids: Sequence[str]) -> None:
        self.bench = bench
        self.doc_ids = tuple(doc_ids)

    def search(self, query: str, k: int = 4, where: Any = None) -> list[Any]:  # noqa: ARG002 - scoped already
        return [self._chunk(c, score) for c, score in self.bench.retrieve(query, self.doc_ids, k)]

    def adapters_for(self, chunks: Sequence[Any]) -> LoRAAdapter:
        ids = list(dict.fromkeys(getattr(c, "chunk_id", c) for c in chunks))
        missing = [c for c in ids if c not in self.bench.adapters]
        if missing:
            msg = f"{len(missing)} of {len(ids)} chunks have no adapter (not internalized in this run)."
            raise NoAdaptersError(msg)
        return compose_adapters([self.bench.adapters[c] for c in ids])

    def list(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(doc_id=d, content_key=d, updated_at=0.0) for d in self.doc_ids]

    def chunks(self, doc_id: str) -> list[Any]:
        return [self._chunk(c, 1.0) for c in self.bench.doc_chunks[doc_id]]

    def _chunk(self, chunk_id: str, score: float) -> Any:
        from d2l_integrations.knowledge.knowledge_base import RetrievedChunk

        chunk = self.bench.chunks[chunk_id]
        return RetrievedChunk(
            chunk_id=chunk_id, doc_id=chunk.doc_id, text=chunk.text, score=float(score),
            metadata={"doc_id": chunk.doc_id, "num_tokens": self.bench.chunk_num_tokens(chunk_id)},
            adapter_id=chunk_id if chunk_id in self.bench.adapters else None,
        )


__all__ = ["ADAPTER_METHODS", "METHODS", "Chunk", "DocCost", "QuestionKnowledge", "Workbench"]
