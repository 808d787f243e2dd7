"""Routing: answer each query from D2L adapters, RAG, both, or full context, and say why.

Policies are pure functions (``policies.py``) over measured signals; thresholds come from a
calibration file (``RouterConfig``); ``Router`` runs a query end to end on an engine.
"""

from d2l_integrations.routing.config import RouterConfig
from d2l_integrations.routing.decision import POLICIES, Route, RouteDecision, parse_route
from d2l_integrations.routing.policies import ChunkSignal, RoutingSignals, confidence_fallback, decide, query_cues
from d2l_integrations.routing.router import (
    Internalized,
    InternalizedDocument,
    RoutedAnswer,
    RoutePlan,
    Router,
    TokenUsage,
    document_id,
)

__all__ = [
    "POLICIES",
    "ChunkSignal",
    "Internalized",
    "InternalizedDocument",
    "Route",
    "RouteDecision",
    "RoutePlan",
    "RoutedAnswer",
    "Router",
    "RouterConfig",
    "RoutingSignals",
    "TokenUsage",
    "confidence_fallback",
    "decide",
    "document_id",
    "parse_route",
    "query_cues",
]
