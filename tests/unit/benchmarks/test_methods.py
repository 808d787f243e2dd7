"""The harness answers through the product's Router (benchmarks/methods.py)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.datasets import Question, Task
from benchmarks.methods import QuestionKnowledge, Workbench
from d2l_integrations.errors import NoAdaptersError
from d2l_integrations.knowledge.knowledge_base import RetrievedChunk
from d2l_integrations.routing.config import RouterConfig
from d2l_integrations.routing.router import Router
from tests.unit.benchmarks.conftest import bag_of_words

DOCS = {
    "zorblax": "Zorblax Industries was founded in 1987 by Mira Quell in the town of Vennick.",
    "oskar": "Oskar Lindqvist works as a botanist and plays the viola on Sundays.",
    "long": " ".join(f"Sentence {i} is about harbours and ships." for i in range(20)),
}


def _bench(engine, config: RouterConfig, *, max_chunks_per_doc=None) -> tuple[Workbench, Task]:
    q1 = Question("t/0", "Who founded Zorblax Industries?", ("Mira Quell",), ("zorblax", "oskar"))
    q2 = Question("t/1", "What are the harbours like?", ("ships",), ("long",))
    task = Task("t", "qa", dict(DOCS), [q1, q2])
    bench = Workbench(engine, [task], embedder=bag_of_words, router=config, chunk_tokens=64,
                      max_chunks_per_doc=max_chunks_per_doc, max_new_tokens=3)
    bench.index()
    bench.internalize()
    return bench, task


def test_question_knowledge_is_a_scoped_knowledge_base(tiny_engine):
    bench, task = _bench(tiny_engine, RouterConfig(), max_chunks_per_doc=1)
    kb = bench.knowledge(("zorblax", "oskar"))
    assert bench.knowledge(("zorblax", "oskar")) is kb  # one view per document set
    hits = kb.search("Who founded Zorblax?", k=4)
    assert all(isinstance(h, RetrievedChunk) for h in hits)
    assert {h.doc_id for h in hits} == {"zorblax", "oskar"}  # never the third document
    assert hits[0].doc_id == "zorblax" and hits[0].adapter_id == hits[0].chunk_id
    assert [d.doc_id for d in kb.list()] == ["zorblax", "oskar"]
    assert all(c.metadata["num_tokens"] > 0 for c in kb.chunks("zorblax"))
    assert kb.adapters_for(hits[:1]).nbytes > 0
    # the long document is over the internalize budget: its chunks have no adapter
    long_kb = bench.knowledge(("long",))
    assert all(h.adapter_id is None for h in long_kb.search("harbours", k=2))
    with pytest.raises(NoAdaptersError):
        long_kb.adapters_for(long_kb.search("harbours", k=1))
    assert isinstance(long_kb, QuestionKnowledge)


@pytest.mark.parametrize("method", ["auto", "rag", "d2l", "hybrid", "full_context"])
def test_every_routed_method_matches_router_answer(tiny_engine, method):
    """The row's answer, route and prompt are what ``Router.answer`` gives a user for the same question."""
    config = RouterConfig(min_relevance=-1.0, adapter_budget=2, confidence_check=False)
    bench, task = _bench(tiny_engine, config)
    q = task.questions[0]
    row = bench.answer(method, task, q)
    router = Router(tiny_engine, bench.knowledge(q.doc_ids), config=config)
    expect = router.answer([{"role": "user", "content": q.question}], route=method, max_new_tokens=3)
    assert row["status"] == "ok"
    assert row["route"] == expect.decision.route.value
    assert row["prediction"] == expect.text
    assert row["prompt_tokens"] == expect.usage.prompt_tokens
    if expect.decision.uses_adapters:
        assert row["n_adapters"] == len(expect.decision.adapter_ids) <= config.adapter_budget


def test_base_has_no_knowledge(tiny_engine):
    bench, task = _bench(tiny_engine, RouterConfig())
    row = bench.answer("base", task, task.questions[0])
    assert row["route"] == "base" and "retrieved" not in row and row["n_adapters"] == 0
    plain = tiny_engine.generate([{"role": "user", "content": task.questions[0].question}], max_new_tokens=3)
    assert row["prompt_tokens"] == plain.prompt_tokens and row["prediction"] == plain.text


def test_auto_confidence_fallback_pays_for_both_generations(tiny_engine):
    # every chunk relevant and any confidence too low: auto picks d2l, then re-answers by RAG
    config = RouterConfig(min_relevance=-1.0, adapter_budget=2, min_confidence=0.0, confidence_check=True)
    bench, task = _bench(tiny_engine, config)
    q = task.questions[0]
    row = bench.answer("auto", task, q)
    assert row["fallback_from"] == "d2l" and row["route"] == "rag"
    assert row["n_adapters"] == 2  # the discarded first answer applied two adapters
    rag = bench.answer("rag", task, q)
    d2l = bench.answer("d2l", task, q)
    assert row["prompt_tokens"] == rag["prompt_tokens"] + d2l["prompt_tokens"]
    assert row["prediction"] == rag["prediction"]


def test_auto_routes_around_chunks_without_adapters(tiny_engine):
    config = RouterConfig(min_relevance=-1.0)
    bench, task = _bench(tiny_engine, config, max_chunks_per_doc=1)
    q = task.questions[1]  # the long document was not internalized
    assert bench.answer("d2l", task, q)["status"] == "skipped"
    row = bench.answer("auto", task, q)
    assert row["status"] == "ok" and row["route"] == "rag" and "no adapter" in row["route_reason"]


def test_sweep_applies_exactly_n_adapters(tiny_engine):
    bench, task = _bench(tiny_engine, dataclasses.replace(RouterConfig(), adapter_budget=1))
    q = task.questions[0]
    rows = [bench.answer_with_n_adapters(task, q, n) for n in (1, 2)]
    assert [r["n_adapters"] for r in rows] == [1, 2]  # the router's budget does not cap the curve
    assert rows[0]["chunk_ids"] == bench.doc_chunks["zorblax"][:1]
