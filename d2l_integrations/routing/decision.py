"""The value every routed answer carries: which route answered, why, and from what.

``RouteDecision`` is frozen and plain (strings, floats, tuples), so it can go into LangChain's
``response_metadata`` or a LlamaIndex ``Response.metadata`` as ``decision.to_dict()`` and come back
with ``RouteDecision.from_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class Route(StrEnum):
    """How a query is answered.

    ``auto`` is a *policy* (it picks one of the others per query); a decision never has it.
    """

    D2L = "d2l"
    """Adapters of the relevant chunks applied, no document text in the prompt."""
    RAG = "rag"
    """Retrieved chunk text in the prompt, no adapters."""
    HYBRID = "hybrid"
    """Adapters of the relevant chunks *and* their text in the prompt."""
    FULL_CONTEXT = "full_context"
    """Every document's text in the prompt (the baseline D2L saves tokens against)."""
    BASE = "base"
    """The plain base model: nothing internalized and no knowledge base to retrieve from."""
    AUTO = "auto"
    """Policy only: decide per query from retrieval scores, the adapter budget, cues and confidence."""


POLICIES: tuple[str, ...] = tuple(r.value for r in Route if r is not Route.BASE)
"""The values a caller may force (``route=...``)."""


def parse_route(route: str | Route) -> Route:
    """``"d2l"`` -> ``Route.D2L``; raise ``ConfigError`` listing the valid routes otherwise."""
    from d2l_integrations.errors import ConfigError

    try:
        parsed = Route(str(route).lower())
    except ValueError:
        parsed = None
    if parsed is None or parsed is Route.BASE:
        msg = f"Unknown route {route!r}. Choose one of {list(POLICIES)}."
        raise ConfigError(msg)
    return parsed


@dataclass(frozen=True, kw_only=True)
class RouteDecision:
    """Which route answered a query and why.

    Args:
        route: the route that produced the answer (never ``auto``).
        reason: one human-readable sentence naming the signal that decided.
        policy: the policy asked for (``auto`` or the forced route).
        scores: the measured signals, e.g. ``top_score``, ``relevant_chunks``, ``mean_logprob``.
        chunk_ids: chunks whose text was in the prompt or whose adapters were applied.
        adapter_ids: ids of the applied chunk adapters (empty when no adapter was used).
        fallback_from: the route tried first when a confidence check fell back (else None).
    """

    route: Route
    reason: str
    policy: Route = Route.AUTO
    scores: Mapping[str, float] = field(default_factory=dict)
    chunk_ids: tuple[str, ...] = ()
    adapter_ids: tuple[str, ...] = ()
    fallback_from: Route | None = None

    @property
    def uses_adapters(self) -> bool:
        return self.route in (Route.D2L, Route.HYBRID)

    def with_scores(self, **scores: float) -> RouteDecision:
        """A copy with ``scores`` added (or replaced)."""
        return replace(self, scores={**self.scores, **scores})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (sorted scores, lists for tuples)."""
        return {
            "route": self.route.value,
            "reason": self.reason,
            "policy": self.policy.value,
            "scores": {k: float(v) for k, v in sorted(self.scores.items())},
            "chunk_ids": list(self.chunk_ids),
            "adapter_ids": list(self.adapter_ids),
            "fallback_from": self.fallback_from.value if self.fallback_from else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteDecision:
        fallback = data.get("fallback_from")
        return cls(
            route=Route(data["route"]),
            reason=str(data["reason"]),
            policy=Route(data.get("policy", "auto")),
            scores={str(k): float(v) for k, v in dict(data.get("scores", {})).items()},
            chunk_ids=tuple(data.get("chunk_ids", ())),
            adapter_ids=tuple(data.get("adapter_ids", ())),
            fallback_from=Route(fallback) if fallback else None,
        )


__all__ = ["POLICIES", "Route", "RouteDecision", "parse_route"]
