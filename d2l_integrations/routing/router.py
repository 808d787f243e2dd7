"""``Router``: answer a query end to end on the route a policy picks, and account for its cost.

    router = Router(engine, knowledge_base)            # or Router(engine) with an Internalized
    answer = router.answer([{"role": "user", "content": "Who founded Zorblax?"}])
    answer.text, answer.decision.route, answer.usage.prompt_tokens_saved, answer.timings

A query runs in three steps, each usable on its own (the integrations stream through them):
``plan`` measures the signals (retrieval), asks ``policies.decide`` for a route, fetches the chunk
adapters and builds the prompt; the engine generates (``generate`` or ``stream``) with the plan's
adapter passed explicitly; ``finish`` turns the engine's ``Generation`` into a ``RoutedAnswer``.
The router holds no per-request state, so one router serves concurrent requests.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from d2l_integrations.engine.engine import D2LEngine, Generation, TokenEvent, validate_messages
from d2l_integrations.engine.lora import LoRAAdapter, compose_adapters
from d2l_integrations.errors import ConfigError, InvalidMessagesError
from d2l_integrations.routing.config import RouterConfig
from d2l_integrations.routing.decision import Route, RouteDecision, parse_route
from d2l_integrations.routing.policies import ChunkSignal, RoutingSignals, confidence_fallback, decide

logger = logging.getLogger(__name__)

Message = Mapping[str, str]


@runtime_checkable
class RetrievedChunkLike(Protocol):
    """A retrieved chunk as ``KnowledgeBase.search`` returns it."""

    chunk_id: str
    doc_id: str
    text: str
    score: float
    metadata: Mapping[str, Any]
    adapter_id: str | None


class KnowledgeSource(Protocol):
    """What the router needs from a knowledge base (``d2l_integrations.knowledge.KnowledgeBase``)."""

    def search(self, query: str, k: int = ..., where: Mapping[str, Any] | None = ...) -> Sequence[Any]: ...

    def adapters_for(self, chunks: Sequence[Any]) -> LoRAAdapter: ...


@dataclass(frozen=True)
class InternalizedDocument:
    """One document internalized outside a knowledge base (``ChatD2L.internalize``).

    Args:
        doc_id: caller-given id, or the first 16 hex digits of the text's sha256.
        text: the document text (kept for the ``full_context`` route and token accounting).
        adapter: its adapter (chunks composed).
        tokens: tokens of ``text``.
        internalize_s: seconds internalization took.
    """

    doc_id: str
    text: str
    adapter: LoRAAdapter
    tokens: int
    internalize_s: float


@dataclass(frozen=True)
class Internalized:
    """An immutable set of internalized documents; ``add`` returns a new set.

    The integrations swap one ``Internalized`` for another on ``internalize``/``reset``, and each
    request reads it once at its start, so concurrent requests never see a half-updated set.
    """

    documents: tuple[InternalizedDocument, ...] = ()
    adapter: LoRAAdapter | None = None

    def add(self, document: InternalizedDocument) -> Internalized:
        docs = (*self.documents, document)
        adapter = document.adapter if self.adapter is None else compose_adapters([self.adapter, document.adapter])
        return Internalized(docs, adapter)

    def remove(self, doc_ids: Sequence[str]) -> Internalized:
        """A set without ``doc_ids`` (the adapter is recomposed from the remaining documents)."""
        docs = tuple(d for d in self.documents if d.doc_id not in set(doc_ids))
        return Internalized(docs, compose_adapters([d.adapter for d in docs]) if docs else None)

    @property
    def doc_ids(self) -> tuple[str, ...]:
        return tuple(d.doc_id for d in self.documents)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.documents)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(d.text for d in self.documents)


def document_id(text: str) -> str:
    """Stable id of a text: the first 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of one answer.

    Args:
        prompt_tokens: tokens the model actually read.
        completion_tokens: tokens it generated.
        full_context_prompt_tokens: tokens the prompt would have with every document in it.
        prompt_tokens_saved: ``full_context_prompt_tokens - prompt_tokens`` (never negative).
    """

    prompt_tokens: int
    completion_tokens: int
    full_context_prompt_tokens: int
    prompt_tokens_saved: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RoutePlan:
    """A decided route, ready to generate: what the engine sees and with which adapter.

    Args:
        decision: the route and why.
        messages: the conversation as the engine receives it (retrieved text inserted for RAG routes).
        adapter: the adapter to pass to the engine (None for RAG, full context and base).
        chunks: chunks whose text is in the prompt or whose adapters are applied.
        retrieved: every retrieved chunk, best first.
        signals: the signals the decision was made from.
        base_prompt_tokens: prompt tokens of the caller's messages alone.
        timings: ``retrieve_s`` and ``internalize_s`` (fetching/composing adapters) so far.
    """

    decision: RouteDecision
    messages: tuple[Message, ...]
    adapter: LoRAAdapter | None
    chunks: tuple[Any, ...]
    retrieved: tuple[Any, ...]
    signals: RoutingSignals
    base_prompt_tokens: int
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutedAnswer:
    """An answer with its route, sources, cost and timings.

    Args:
        text: the answer.
        decision: the route that produced it (after any confidence fallback).
        generation: the engine's ``Generation`` of that route.
        chunks: the source chunks (retrieved text for RAG routes, adapter chunks for D2L).
        usage: token counts, including prompt tokens saved against full context.
        timings: seconds: ``retrieve_s``, ``internalize_s``, ``generate_s``, ``total_s`` (+ the engine's).
    """

    text: str
    decision: RouteDecision
    generation: Generation
    chunks: tuple[Any, ...]
    usage: TokenUsage
    timings: Mapping[str, float]


class Router:
    """Routes each query to D2L adapters, RAG, both, or full context, and runs it on an engine.

    Args:
        engine: the D2L engine (its base model answers every route).
        knowledge_base: a ``KnowledgeBase`` (or anything with ``search`` and ``adapters_for``), or None.
        config: thresholds; default: ``RouterConfig.default(engine.base.name)`` (the calibration).
        policy: default policy: ``auto``, ``d2l``, ``rag``, ``hybrid`` or ``full_context``.

    Example:
        >>> router = Router(D2LEngine.default(), kb)
        >>> answer = router.answer([{"role": "user", "content": "When was Zorblax founded?"}])
        >>> answer.decision.route, answer.usage.prompt_tokens_saved
    """

    def __init__(
        self,
        engine: D2LEngine,
        knowledge_base: KnowledgeSource | None = None,
        config: RouterConfig | None = None,
        *,
        policy: Route | str = Route.AUTO,
    ) -> None:
        self.engine = engine
        self.knowledge_base = knowledge_base
        self.config = config if config is not None else RouterConfig.default(engine.base.name)
        self.policy = parse_route(policy)

    # ------------------------------------------------------------------ planning
    def plan(
        self,
        messages: Sequence[Message],
        *,
        route: Route | str | None = None,
        internalized: Internalized | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> RoutePlan:
        """Measure, decide, fetch adapters and build the prompt for ``messages``.

        Args:
            messages: ``[{"role": ..., "content": str}, ...]``, ending with the question.
            route: policy for this query (default: the router's).
            internalized: documents internalized outside the knowledge base, if any.
            where: metadata filter passed to the knowledge base's search.
        """
        policy = parse_route(route) if route is not None else self.policy
        validate_messages(messages)
        messages = tuple(dict(m) for m in messages)
        query = last_user_text(messages)
        base_prompt_tokens = len(self.engine.base.chat_ids(messages))
        timings: dict[str, float] = {"retrieve_s": 0.0, "internalize_s": 0.0}
        retrieved: tuple[Any, ...] = ()
        if self.knowledge_base is not None:
            t0 = time.perf_counter()
            k = max(self.config.top_k, self.config.adapter_budget)
            retrieved = tuple(self.knowledge_base.search(query, k=k, where=where))
            timings["retrieve_s"] = time.perf_counter() - t0
        signals = RoutingSignals(
            query=query,
            chunks=tuple(ChunkSignal(c.chunk_id, float(c.score), getattr(c, "adapter_id", None)) for c in retrieved),
            has_knowledge_base=self.knowledge_base is not None,
            internalized=bool(internalized and internalized.adapter is not None),
            knowledge_tokens=self._knowledge_tokens(internalized),
            context_window=self.engine.base.context_window,
        )
        decision = decide(policy, signals, self.config)
        return self._realize(decision, messages, query, signals, retrieved, internalized, base_prompt_tokens, timings)

    def _realize(
        self,
        decision: RouteDecision,
        messages: tuple[Message, ...],
        query: str,
        signals: RoutingSignals,
        retrieved: tuple[Any, ...],
        internalized: Internalized | None,
        base_prompt_tokens: int,
        timings: dict[str, float],
    ) -> RoutePlan:
        """Turn a decision into engine inputs: the adapter to apply and the prompt."""
        timings = dict(timings)
        by_id = {c.chunk_id: c for c in retrieved}
        chunks = tuple(by_id[i] for i in decision.chunk_ids if i in by_id)
        adapter: LoRAAdapter | None = None
        if decision.uses_adapters:
            t0 = time.perf_counter()
            if self.knowledge_base is not None and chunks:
                adapter = self.knowledge_base.adapters_for(list(chunks))
            elif internalized is not None and internalized.adapter is not None:
                adapter = internalized.adapter
                decision = replace(decision, chunk_ids=internalized.doc_ids, adapter_ids=internalized.doc_ids)
            timings["internalize_s"] = time.perf_counter() - t0
        if decision.route in (Route.RAG, Route.HYBRID):
            context = "\n\n".join(f"[{i + 1}] {c.text}" for i, c in enumerate(chunks))
            messages = with_context(messages, query, context, self.config.context_template)
        elif decision.route is Route.FULL_CONTEXT:
            texts = self._all_texts(internalized)
            if not texts:
                msg = "Route 'full_context' needs documents, but nothing is internalized and the knowledge base is empty. Add documents first."
                raise ConfigError(msg)
            context = "\n\n".join(texts)
            messages = with_context(messages, query, context, self.config.context_template)
        return RoutePlan(decision, messages, adapter, chunks, retrieved, signals, base_prompt_tokens, timings)

    # ------------------------------------------------------------------ running
    def answer(
        self,
        messages: Sequence[Message],
        *,
        route: Route | str | None = None,
        internalized: Internalized | None = None,
        where: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> RoutedAnswer:
        """Plan, generate and (for ``auto`` D2L answers) check confidence, falling back when low.

        ``settings`` go to the engine: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``.
        """
        t0 = time.perf_counter()
        plan = self.plan(messages, route=route, internalized=internalized, where=where)
        generation = self.engine.generate(plan.messages, adapters=plan.adapter, **settings)
        answer = self.finish(plan, generation, started=t0)
        return self.fall_back_if_unsure(answer, plan, messages, internalized, started=t0, **settings)

    def answer_batch(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        route: Route | str | None = None,
        internalized: Sequence[Internalized | None] | Internalized | None = None,
        where: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> list[RoutedAnswer]:
        """Answer several conversations in one engine batch, each row with its own route and adapter."""
        if not conversations:
            return []
        rows = list(internalized) if isinstance(internalized, Sequence) else [internalized] * len(conversations)
        if len(rows) != len(conversations):
            msg = f"Got {len(rows)} internalized sets for {len(conversations)} conversations; pass one (or None) per row."
            raise ConfigError(msg)
        t0 = time.perf_counter()
        plans = [self.plan(c, route=route, internalized=r, where=where) for c, r in zip(conversations, rows, strict=True)]
        generations = self.engine.generate_batch([p.messages for p in plans], adapters=[p.adapter for p in plans], **settings)
        answers = []
        for plan, generation, messages, row in zip(plans, generations, conversations, rows, strict=True):
            answer = self.finish(plan, generation, started=t0)
            answers.append(self.fall_back_if_unsure(answer, plan, messages, row, started=t0, **settings))
        return answers

    def stream(self, plan: RoutePlan, **settings: Any) -> Iterator[TokenEvent]:
        """Stream the engine's tokens for ``plan`` (its adapter passed explicitly). No confidence fallback:
        tokens already sent cannot be taken back. Pass the final event's ``generation`` to ``finish``."""
        # Each stream runs in its own context: the engine applies adapters through a ContextVar set
        # inside its generator, so two streams interleaved in one thread must not share a context.
        context = contextvars.copy_context()
        events = self.engine.stream(plan.messages, adapters=plan.adapter, **settings)
        while True:
            try:
                event = context.run(next, events)
            except StopIteration:
                return
            yield event

    def finish(self, plan: RoutePlan, generation: Generation, *, started: float | None = None) -> RoutedAnswer:
        """Attach decision, sources, token accounting and timings to a finished ``Generation``."""
        full = plan.base_prompt_tokens + plan.signals.knowledge_tokens
        usage = TokenUsage(
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            full_context_prompt_tokens=full,
            prompt_tokens_saved=max(0, full - generation.prompt_tokens),
        )
        generate_s = float(generation.timings.get("total_s", 0.0))
        timings = {**plan.timings, "generate_s": generate_s, **{f"engine_{k}": float(v) for k, v in generation.timings.items()}}
        timings["total_s"] = (time.perf_counter() - started) if started is not None else sum(
            timings.get(k, 0.0) for k in ("retrieve_s", "internalize_s", "generate_s")
        )
        decision = plan.decision.with_scores(mean_logprob=generation.mean_logprob)
        return RoutedAnswer(generation.text, decision, generation, plan.chunks, usage, timings)

    def fall_back_if_unsure(
        self,
        answer: RoutedAnswer,
        plan: RoutePlan,
        messages: Sequence[Message],
        internalized: Internalized | None,
        *,
        started: float,
        **settings: Any,
    ) -> RoutedAnswer:
        """Re-answer on the fallback route when an ``auto`` D2L answer's confidence is below threshold.

        Returns ``answer`` unchanged when no fallback applies (see ``policies.confidence_fallback``).
        """
        fallback = confidence_fallback(plan.decision, answer.generation.mean_logprob, self.config, plan.signals)
        if fallback is None:
            return answer
        logger.info("Confidence fallback: %s", fallback.reason)
        query = last_user_text(plan.messages)
        second = self._realize(
            fallback, tuple(dict(m) for m in messages), query, plan.signals, plan.retrieved, internalized,
            plan.base_prompt_tokens, dict(plan.timings),
        )
        generation = self.engine.generate(second.messages, adapters=second.adapter, **settings)
        result = self.finish(second, generation, started=started)
        first_s = answer.timings["generate_s"]
        return replace(result, timings={**result.timings, "generate_s": result.timings["generate_s"] + first_s, "first_attempt_generate_s": first_s})

    # ------------------------------------------------------------------ knowledge size
    def _knowledge_tokens(self, internalized: Internalized | None) -> int:
        tokens = internalized.tokens if internalized is not None else 0
        if self.knowledge_base is not None:
            tokens += knowledge_base_tokens(self.knowledge_base, self.engine)
        return tokens

    def _all_texts(self, internalized: Internalized | None) -> list[str]:
        texts = list(internalized.texts) if internalized is not None else []
        if self.knowledge_base is not None:
            texts.extend(knowledge_base_texts(self.knowledge_base))
        return texts


def knowledge_base_texts(knowledge_base: Any) -> list[str]:
    """Every document's text in ``knowledge_base`` (its chunks joined), oldest document first."""
    from d2l_integrations.errors import DocumentNotFoundError

    texts = []
    for info in knowledge_base.list():
        try:
            chunks = knowledge_base.chunks(info.doc_id)
        except DocumentNotFoundError:  # being written or deleted by another process right now
            continue
        texts.append("\n".join(c.text for c in chunks))
    return texts


def knowledge_base_tokens(knowledge_base: Any, engine: D2LEngine) -> int:
    """Tokens of all documents in ``knowledge_base`` (what ``full_context`` would put in the prompt).

    Uses each chunk's stored ``num_tokens`` when present; cached on the knowledge base object per
    set of document versions, so it is recomputed only after ``add``/``update``/``delete``.
    """
    from d2l_integrations.errors import DocumentNotFoundError

    infos = knowledge_base.list()
    key = tuple((i.doc_id, getattr(i, "content_key", None), getattr(i, "updated_at", None)) for i in infos)
    cached = _KB_TOKENS.get(id(knowledge_base))
    if cached is not None and cached[0] == key:
        return cached[1]
    total = 0
    for info in infos:
        try:
            chunks = knowledge_base.chunks(info.doc_id)
        except DocumentNotFoundError:
            continue
        total += sum(int(c.metadata.get("num_tokens") or engine.count_tokens(c.text)) for c in chunks)
    _KB_TOKENS[id(knowledge_base)] = (key, total)
    return total


_KB_TOKENS: dict[int, tuple[tuple[Any, ...], int]] = {}


def last_user_text(messages: Sequence[Message]) -> str:
    """The content of the last user message (what retrieval searches for)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    msg = "The conversation has no user message. Add one with the question to answer."
    raise InvalidMessagesError(msg)


def with_context(messages: Sequence[Message], question: str, context: str, template: str) -> tuple[Message, ...]:
    """``messages`` with the last user message replaced by ``template`` filled with context and question."""
    out = [dict(m) for m in messages]
    for i in range(len(out) - 1, -1, -1):
        if out[i]["role"] == "user":
            out[i] = {"role": "user", "content": template.format(context=context, question=question)}
            break
    return tuple(out)


__all__ = [
    "Internalized",
    "InternalizedDocument",
    "KnowledgeSource",
    "RetrievedChunkLike",
    "RoutePlan",
    "RoutedAnswer",
    "Router",
    "TokenUsage",
    "document_id",
    "last_user_text",
    "with_context",
]
