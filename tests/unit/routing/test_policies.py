"""The routing policies are pure functions: each signal that decides a route is tested on its own."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from d2l_integrations.errors import ConfigError, NoAdaptersError
from d2l_integrations.routing import (
    ChunkSignal,
    Route,
    RouteDecision,
    RouterConfig,
    RoutingSignals,
    confidence_fallback,
    decide,
    parse_route,
    query_cues,
)

CONFIG = RouterConfig(top_k=3, min_relevance=0.5, adapter_budget=2, min_confidence=-1.0)


def kb_signals(*scores: float, query: str = "Who founded Zorblax?", adapters: bool = True) -> RoutingSignals:
    chunks = tuple(ChunkSignal(f"c{i}", s, f"a{i}" if adapters else None) for i, s in enumerate(scores))
    return RoutingSignals(query=query, chunks=chunks, has_knowledge_base=True, knowledge_tokens=5000)


def test_auto_picks_d2l_for_few_relevant_chunks_with_adapters() -> None:
    decision = decide("auto", kb_signals(0.9, 0.6, 0.1), CONFIG)
    assert decision.route is Route.D2L and decision.policy is Route.AUTO
    assert decision.chunk_ids == ("c0", "c1") and decision.adapter_ids == ("a0", "a1")
    assert decision.scores["relevant_chunks"] == 2 and decision.scores["top_score"] == pytest.approx(0.9)


def test_auto_picks_rag_over_the_adapter_budget() -> None:
    decision = decide("auto", kb_signals(0.9, 0.8, 0.7, 0.2), CONFIG)
    assert decision.route is Route.RAG
    assert "adapter budget of 2" in decision.reason
    assert decision.chunk_ids == ("c0", "c1", "c2") and decision.adapter_ids == ()


def test_auto_picks_rag_when_nothing_is_relevant_and_shows_best_matches() -> None:
    decision = decide("auto", kb_signals(0.3, 0.2), CONFIG)
    assert decision.route is Route.RAG and "min_relevance=0.5" in decision.reason
    assert decision.chunk_ids == ("c0", "c1")


@pytest.mark.parametrize(
    ("query", "cue"),
    [("Quote the founding charter verbatim.", "verbatim"), ("List all the founders.", "broad"), ("Summarize the report", "broad")],
)
def test_query_cues_send_to_rag(query: str, cue: str) -> None:
    assert cue in query_cues(query, CONFIG)
    decision = decide("auto", kb_signals(0.9, query=query), CONFIG)
    assert decision.route is Route.RAG and "cue" in decision.reason


def test_plain_questions_have_no_cues() -> None:
    assert query_cues("Who founded the Zorblax Institute?", CONFIG) == ()


def test_auto_picks_rag_when_relevant_chunks_lack_adapters() -> None:
    decision = decide("auto", kb_signals(0.9, adapters=False), CONFIG)
    assert decision.route is Route.RAG and "no adapter" in decision.reason


def test_auto_without_knowledge_base() -> None:
    assert decide("auto", RoutingSignals(query="q", internalized=True), CONFIG).route is Route.D2L
    assert decide("auto", RoutingSignals(query="q"), CONFIG).route is Route.BASE
    empty_kb = RoutingSignals(query="q", has_knowledge_base=True)
    assert decide("auto", empty_kb, CONFIG).route is Route.BASE


def test_auto_uses_full_context_when_everything_fits() -> None:
    config = dataclasses.replace(CONFIG, full_context_max_tokens=6000)
    assert decide("auto", kb_signals(0.9), config).route is Route.FULL_CONTEXT


def test_forced_d2l_is_capped_at_the_budget_and_uses_top_chunks_if_none_relevant() -> None:
    decision = decide("d2l", kb_signals(0.9, 0.8, 0.7), CONFIG)
    assert decision.route is Route.D2L and decision.policy is Route.D2L and decision.adapter_ids == ("a0", "a1")
    weak = decide("d2l", kb_signals(0.2, 0.1), CONFIG)
    assert weak.chunk_ids == ("c0", "c1") and "none reached min_relevance" in weak.reason


def test_forced_d2l_without_adapters_explains() -> None:
    with pytest.raises(NoAdaptersError, match="forced.*nothing is internalized.*Internalize documents first"):
        decide("d2l", RoutingSignals(query="q"), CONFIG)
    with pytest.raises(NoAdaptersError, match="knowledge base returned no chunks"):
        decide("hybrid", RoutingSignals(query="q", has_knowledge_base=True), CONFIG)
    with pytest.raises(NoAdaptersError, match="none of the 1 retrieved chunks has an adapter"):
        decide("d2l", kb_signals(0.9, adapters=False), CONFIG)


def test_forced_rag_needs_a_knowledge_base() -> None:
    with pytest.raises(ConfigError, match="needs a knowledge base"):
        decide("rag", RoutingSignals(query="q", internalized=True), CONFIG)
    assert decide("rag", kb_signals(0.9, 0.1, 0.1, 0.1), CONFIG).chunk_ids == ("c0", "c1", "c2")


def test_unknown_route_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"Unknown route 'fast'.*'d2l', 'rag', 'hybrid', 'full_context', 'auto'"):
        parse_route("fast")
    with pytest.raises(ConfigError):
        parse_route("base")  # a result, not a policy a caller may force
    assert parse_route("D2L") is Route.D2L


def test_confidence_fallback() -> None:
    signals = kb_signals(0.9, 0.2)
    d2l = decide("auto", signals, CONFIG)
    fallback = confidence_fallback(d2l, -2.5, CONFIG, signals)
    assert fallback is not None and fallback.route is Route.RAG and fallback.fallback_from is Route.D2L
    assert fallback.scores["d2l_mean_logprob"] == -2.5 and fallback.chunk_ids == ("c0",)
    assert confidence_fallback(d2l, -0.5, CONFIG, signals) is None
    forced = decide("d2l", signals, CONFIG)
    assert confidence_fallback(forced, -9.0, CONFIG, signals) is None  # a forced route is never overridden
    off = dataclasses.replace(CONFIG, confidence_check=False)
    assert confidence_fallback(d2l, -9.0, off, signals) is None


def test_confidence_fallback_without_knowledge_base_uses_full_context_when_it_fits() -> None:
    small = RoutingSignals(query="q", internalized=True, knowledge_tokens=100, context_window=2048)
    d2l = decide("auto", small, CONFIG)
    fallback = confidence_fallback(d2l, -3.0, CONFIG, small)
    assert fallback is not None and fallback.route is Route.FULL_CONTEXT
    big = dataclasses.replace(small, knowledge_tokens=5000)
    assert confidence_fallback(d2l, -3.0, CONFIG, big) is None


def test_route_decision_is_frozen_and_round_trips() -> None:
    decision = decide("auto", kb_signals(0.9), CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.route = Route.RAG  # type: ignore[misc]
    data = json.loads(json.dumps(decision.to_dict()))
    assert RouteDecision.from_dict(data) == decision
    assert data["route"] == "d2l" and data["adapter_ids"] == ["a0"]


def test_router_config_round_trips_and_validates(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    config = RouterConfig(min_relevance=0.42, adapter_budget=3, calibrated_on="squad dev: A, B", measurements={"d2l_acc": 0.5})
    path = config.save(tmp_path / "router.json")
    assert RouterConfig.load(path) == config
    data = json.loads(path.read_text())
    assert list(data) == sorted(data)
    data["from_the_future"] = 1
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        assert RouterConfig.load(path) == config
    assert "from_the_future" in caplog.text
    with pytest.raises(ConfigError, match="calibrate_router.py"):
        RouterConfig.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="adapter_budget must be >= 1"):
        RouterConfig(adapter_budget=0)
    with pytest.raises(ConfigError, match="context_template"):
        RouterConfig(context_template="no placeholders")


def test_router_config_default_reads_env(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = RouterConfig(min_confidence=-0.7, calibrated_on="test").save(tmp_path / "c.json")
    monkeypatch.setenv("D2L_ROUTER_CONFIG", str(path))
    assert RouterConfig.default("any").min_confidence == -0.7
    monkeypatch.delenv("D2L_ROUTER_CONFIG")
    uncalibrated = RouterConfig.default("no-such-model")
    assert not uncalibrated.is_calibrated and uncalibrated.base_model == "no-such-model"
