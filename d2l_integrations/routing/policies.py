"""Routing policies as pure functions over measured signals.

Nothing here touches a model or a store: ``decide(policy, signals, config)`` maps what was
measured before generation (retrieval scores, which chunks have adapters, query cues, sizes) to a
``RouteDecision``; ``confidence_fallback`` maps the D2L answer's mean log-probability to a fallback
decision or None. ``Router`` (router.py) measures the signals and runs the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

from d2l_integrations.errors import ConfigError, NoAdaptersError
from d2l_integrations.routing.config import RouterConfig
from d2l_integrations.routing.decision import Route, RouteDecision


@dataclass(frozen=True)
class ChunkSignal:
    """What routing needs to know about one retrieved chunk.

    Args:
        chunk_id: the knowledge base's chunk id.
        score: retrieval score (higher = more similar).
        adapter_id: id of the chunk's stored adapter, or None when it has none yet.
    """

    chunk_id: str
    score: float
    adapter_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class RoutingSignals:
    """Everything measured about a query before generation.

    Args:
        query: the text retrieval ran on (the last user message).
        chunks: retrieved chunks, best first (empty without a knowledge base).
        has_knowledge_base: whether there is a store to retrieve from.
        internalized: whether an adapter is held outside the knowledge base (``ChatD2L.internalize``).
        knowledge_tokens: tokens of all documents together (what ``full_context`` puts in the prompt).
        context_window: the base model's context window.
    """

    query: str
    chunks: tuple[ChunkSignal, ...] = ()
    has_knowledge_base: bool = False
    internalized: bool = False
    knowledge_tokens: int = 0
    context_window: int = 2048

    @property
    def top_score(self) -> float | None:
        return max((c.score for c in self.chunks), default=None)


def query_cues(query: str, config: RouterConfig) -> tuple[str, ...]:
    """Names of the cue groups ``query`` matches: ``"verbatim"`` and/or ``"broad"``."""
    found = []
    if any(_compiled(p).search(query) for p in config.rag_cues):
        found.append("verbatim")
    if any(_compiled(p).search(query) for p in config.broad_cues):
        found.append("broad")
    return tuple(found)


def relevant_chunks(chunks: tuple[ChunkSignal, ...], config: RouterConfig) -> tuple[ChunkSignal, ...]:
    """Distinct chunks scoring at least ``min_relevance``, best first."""
    seen: set[str] = set()
    kept = []
    for c in sorted(chunks, key=lambda c: -c.score):
        if c.score >= config.min_relevance and c.chunk_id not in seen:
            seen.add(c.chunk_id)
            kept.append(c)
    return tuple(kept)


def decide(policy: Route | str, signals: RoutingSignals, config: RouterConfig) -> RouteDecision:
    """The route for a query under ``policy`` (``auto`` or a forced route).

    Raises:
        NoAdaptersError: ``d2l`` or ``hybrid`` was forced but there is no adapter to apply.
        ConfigError: ``rag`` or ``hybrid`` was forced without a knowledge base.
    """
    policy = Route(policy)
    relevant = relevant_chunks(signals.chunks, config)
    scores = _scores(signals, relevant)
    if policy is Route.AUTO:
        return _decide_auto(signals, relevant, scores, config)
    if policy is Route.BASE:
        return RouteDecision(route=Route.BASE, policy=policy, reason="The caller asked for the plain base model.", scores=scores)
    if policy is Route.FULL_CONTEXT:
        return RouteDecision(
            route=Route.FULL_CONTEXT, policy=policy, scores=scores,
            reason="Forced by the caller: every document's text is in the prompt.",
        )
    if policy is Route.RAG:
        if not signals.has_knowledge_base:
            msg = (
                "Route 'rag' needs a knowledge base to retrieve from, but none is attached. Build the model "
                "from a KnowledgeBase, or use route='full_context' (all internalized text in the prompt) or 'd2l'."
            )
            raise ConfigError(msg)
        picked = signals.chunks[: config.top_k]
        return RouteDecision(
            route=Route.RAG, policy=policy, scores=scores, chunk_ids=tuple(c.chunk_id for c in picked),
            reason=f"Forced by the caller: the top {len(picked)} retrieved chunks are in the prompt.",
        )
    # d2l / hybrid
    if policy is Route.HYBRID and not signals.has_knowledge_base:
        msg = "Route 'hybrid' needs a knowledge base (chunk text goes into the prompt). Use route='d2l' or build the model from a KnowledgeBase."
        raise ConfigError(msg)
    if signals.has_knowledge_base:
        with_adapters = [c for c in (relevant or signals.chunks) if c.adapter_id is not None]
        picked = tuple(with_adapters[: config.adapter_budget])
        if not picked:
            msg = _no_adapters_message(policy, signals, config)
            raise NoAdaptersError(msg)
        which = "relevant" if relevant else "top retrieved (none reached min_relevance)"
        return RouteDecision(
            route=policy, policy=policy, scores=scores,
            chunk_ids=tuple(c.chunk_id for c in picked), adapter_ids=tuple(str(c.adapter_id) for c in picked),
            reason=f"Forced by the caller: adapters of the {len(picked)} {which} chunks applied"
            + (" and their text in the prompt." if policy is Route.HYBRID else "."),
        )
    if not signals.internalized:
        raise NoAdaptersError(_no_adapters_message(policy, signals, config))
    return RouteDecision(route=policy, policy=policy, scores=scores, reason="Forced by the caller: the internalized adapter is applied.")


def _decide_auto(
    signals: RoutingSignals, relevant: tuple[ChunkSignal, ...], scores: dict[str, float], config: RouterConfig
) -> RouteDecision:
    auto = Route.AUTO
    if not signals.has_knowledge_base:
        if signals.internalized:
            return RouteDecision(route=Route.D2L, policy=auto, scores=scores, reason="No knowledge base: the internalized adapter answers.")
        return RouteDecision(route=Route.BASE, policy=auto, scores=scores, reason="Nothing is internalized and no knowledge base is attached: the base model answers.")
    if not signals.chunks:
        return RouteDecision(route=Route.BASE, policy=auto, scores=scores, reason="The knowledge base returned no chunks (it is empty): the base model answers.")
    if 0 < signals.knowledge_tokens <= config.full_context_max_tokens:
        return RouteDecision(
            route=Route.FULL_CONTEXT, policy=auto, scores=scores,
            reason=f"All documents fit in {signals.knowledge_tokens} <= full_context_max_tokens={config.full_context_max_tokens} tokens.",
        )
    rag = RouteDecision(route=Route.RAG, policy=auto, scores=scores, chunk_ids=rag_chunk_ids(signals, relevant, config), reason="")
    cues = query_cues(signals.query, config)
    if "verbatim" in cues:
        return replace(rag, reason="The query asks for exact wording (a cue in rag_cues); adapters store facts, not verbatim text.")
    if "broad" in cues:
        return replace(rag, reason="The query needs many chunks at once (a cue in broad_cues); RAG shows them side by side.")
    if not relevant:
        return replace(
            rag,
            reason=f"No chunk reached min_relevance={config.min_relevance:g} (best {scores['top_score']:.3f}); RAG shows the best matches.",
        )
    if len(relevant) > config.adapter_budget:
        return replace(
            rag,
            reason=f"{len(relevant)} distinct chunks are relevant, over the adapter budget of {config.adapter_budget}; summing that many deltas degrades answers.",
        )
    missing = [c.chunk_id for c in relevant if c.adapter_id is None]
    if missing:
        return replace(rag, reason=f"Relevant chunks {missing} have no adapter yet (not internalized); RAG answers.")
    return RouteDecision(
        route=Route.D2L, policy=auto, scores=scores,
        chunk_ids=tuple(c.chunk_id for c in relevant), adapter_ids=tuple(str(c.adapter_id) for c in relevant),
        reason=f"{len(relevant)} relevant chunk(s) (best score {scores['top_score']:.3f} >= {config.min_relevance:g}) within the adapter budget of {config.adapter_budget}.",
    )


def confidence_fallback(
    decision: RouteDecision, mean_logprob: float, config: RouterConfig, signals: RoutingSignals
) -> RouteDecision | None:
    """The decision to re-answer with when an ``auto`` D2L answer is not confident enough, else None.

    Falls back to RAG with a knowledge base, or to ``full_context`` without one (the internalized
    text in the prompt) when that text fits the context window.
    """
    if decision.policy is not Route.AUTO or decision.route is not Route.D2L or not config.confidence_check:
        return None
    if mean_logprob >= config.min_confidence:
        return None
    scores = {**decision.scores, "d2l_mean_logprob": float(mean_logprob)}
    why = f"The D2L answer's mean log-prob {mean_logprob:.3f} is below min_confidence={config.min_confidence:g}"
    if signals.has_knowledge_base:
        relevant = relevant_chunks(signals.chunks, config)
        return RouteDecision(
            route=Route.RAG, policy=Route.AUTO, scores=scores, chunk_ids=rag_chunk_ids(signals, relevant, config),
            fallback_from=Route.D2L, reason=f"{why}; re-answered by RAG.",
        )
    if 0 < signals.knowledge_tokens < signals.context_window // 2:
        return RouteDecision(
            route=Route.FULL_CONTEXT, policy=Route.AUTO, scores=scores, fallback_from=Route.D2L,
            reason=f"{why}; re-answered with the internalized text in the prompt.",
        )
    return None


def rag_chunk_ids(signals: RoutingSignals, relevant: tuple[ChunkSignal, ...], config: RouterConfig) -> tuple[str, ...]:
    """Chunks RAG puts in the prompt: the relevant ones (else the best retrieved), at most ``top_k``."""
    return tuple(c.chunk_id for c in (relevant or signals.chunks)[: config.top_k])


def _scores(signals: RoutingSignals, relevant: tuple[ChunkSignal, ...]) -> dict[str, float]:
    scores: dict[str, float] = {"retrieved_chunks": float(len(signals.chunks)), "relevant_chunks": float(len(relevant))}
    if signals.top_score is not None:
        scores["top_score"] = float(signals.top_score)
    if signals.knowledge_tokens:
        scores["knowledge_tokens"] = float(signals.knowledge_tokens)
    return scores


def _no_adapters_message(policy: Route, signals: RoutingSignals, config: RouterConfig) -> str:
    if signals.has_knowledge_base and not signals.chunks:
        why = "the knowledge base returned no chunks (it is empty)"
    elif signals.has_knowledge_base:
        why = f"none of the {len(signals.chunks)} retrieved chunks has an adapter (their documents were added without internalization)"
    else:
        why = "nothing is internalized and no knowledge base is attached"
    return (
        f"Route {policy.value!r} was forced, but there are no adapters to apply: {why}. "
        "Internalize documents first (ChatD2L.internalize(...) or KnowledgeBase.add(..., internalize=True)), "
        "or use route='auto' or 'rag'."
    )


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


__all__ = ["ChunkSignal", "RoutingSignals", "confidence_fallback", "decide", "query_cues", "rag_chunk_ids", "relevant_chunks"]
