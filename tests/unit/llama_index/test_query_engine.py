"""Parity tests for D2LQueryEngine (sync/async/stream/metadata, same response type on every route)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llama_index.core import Document
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.query_engine import CustomQueryEngine, RouterQueryEngine
from llama_index.core.selectors import EmbeddingSingleSelector
from llama_index.core.tools import QueryEngineTool

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import KnowledgeBaseMismatchError, NoAdaptersError
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.llama_index import D2LLLM, D2LEmbedding, D2LQueryEngine
from d2l_integrations.routing import RouterConfig
from tests.tiny_models import tiny_engine

DOCS = [
    Document(text="The Zorblax Institute was founded in 1873 by Mira Quell.", id_="zorblax"),
    Document(text="Bananas are yellow fruits grown in Ecuador and shipped in cold boats.", id_="banana"),
]
QUESTION = "Who founded the Zorblax Institute?"
CONFIG = RouterConfig(min_relevance=0.5, adapter_budget=2, min_confidence=-100.0)


@pytest.fixture(scope="module")
def kb(engine: D2LEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    store = KnowledgeBase(tmp_path_factory.mktemp("kb"), engine)
    store.add(DOCS)
    yield store
    store.close()


def engine_for(kb: KnowledgeBase, **kwargs: object) -> D2LQueryEngine:
    return D2LQueryEngine.from_knowledge_base(kb, router_config=CONFIG, max_tokens=6, **kwargs)


def test_class() -> None:
    assert CustomQueryEngine in D2LQueryEngine.__mro__


@pytest.mark.parametrize("route", ["d2l", "rag", "hybrid", "full_context", "auto"])
def test_same_response_type_on_every_route(kb: KnowledgeBase, route: str) -> None:
    response = engine_for(kb, route=route).query(QUESTION)
    assert isinstance(response, Response) and isinstance(response.response, str)
    meta = response.metadata or {}
    assert meta["route"] == meta["route_decision"]["route"]
    assert set(meta) >= {"usage", "timings", "prompt_tokens_saved", "route_decision"}
    assert [n.node.node_id for n in response.source_nodes] == meta["route_decision"]["chunk_ids"]


def test_d2l_sources_are_the_chunks_whose_adapters_were_used(kb: KnowledgeBase, engine: D2LEngine) -> None:
    response = engine_for(kb, route="d2l").query(QUESTION)
    assert [n.node.node_id for n in response.source_nodes] == ["zorblax@0#0"]
    assert response.source_nodes[0].node.metadata["adapter_id"] == response.metadata["route_decision"]["adapter_ids"][0]
    expected = engine.generate([{"role": "user", "content": QUESTION}], adapters=kb.adapters_for(["zorblax@0#0"]), max_new_tokens=6)
    assert response.response == expected.text


def test_rag_sources_are_the_retrieved_chunks(kb: KnowledgeBase) -> None:
    response = engine_for(kb, route="rag").query(QUESTION)
    assert response.source_nodes[0].node.node_id == "zorblax@0#0"
    assert response.source_nodes[0].score == pytest.approx(kb.search(QUESTION, k=1)[0].score)


async def test_aquery_matches_query(kb: KnowledgeBase) -> None:
    qe = engine_for(kb)
    sync = qe.query(QUESTION)
    result = await qe.aquery(QUESTION)
    assert result.response == sync.response and result.metadata["route_decision"] == sync.metadata["route_decision"]


def test_streaming_matches_query_and_fills_metadata(kb: KnowledgeBase) -> None:
    text = engine_for(kb, route="d2l").query(QUESTION).response
    streaming = engine_for(kb, route="d2l", streaming=True).query(QUESTION)
    assert isinstance(streaming, StreamingResponse)
    assert streaming.metadata["route"] == "d2l" and "usage" not in streaming.metadata
    assert "".join(streaming.response_gen) == text
    assert streaming.metadata["usage"]["completion_tokens"] > 0


async def test_async_streaming(kb: KnowledgeBase) -> None:
    text = engine_for(kb, route="d2l").query(QUESTION).response
    streaming = await engine_for(kb, route="d2l", streaming=True).aquery(QUESTION)
    assert isinstance(streaming, AsyncStreamingResponse)
    assert "".join([d async for d in streaming.async_response_gen()]) == text


def test_from_documents(engine: D2LEngine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qe = D2LQueryEngine.from_documents(DOCS[:1], engine=engine, persist_dir=str(tmp_path / "kb"), route="d2l",
                                       router_config=CONFIG, max_tokens=4)
    assert qe.query(QUESTION).metadata["route_decision"]["chunk_ids"] == ["zorblax@0#0"]
    qe.knowledge_base.close()


def test_forced_d2l_on_an_empty_store_explains(engine: D2LEngine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = KnowledgeBase(tmp_path / "empty", engine)
    with pytest.raises(NoAdaptersError, match="knowledge base returned no chunks"):
        D2LQueryEngine.from_knowledge_base(empty, route="d2l").query(QUESTION)
    empty.close()


def test_knowledge_base_of_another_model_is_refused(kb: KnowledgeBase) -> None:
    with pytest.raises(KnowledgeBaseMismatchError, match="tiny-seed-0.*tiny-seed-1"):
        D2LQueryEngine(knowledge_base=kb, engine=tiny_engine(seed=1))


def test_usable_as_a_tool_in_router_query_engine(kb: KnowledgeBase, engine: D2LEngine) -> None:
    zorblax = QueryEngineTool.from_defaults(engine_for(kb, route="d2l"), name="zorblax", description="History of the Zorblax Institute and who founded it")
    fruit = QueryEngineTool.from_defaults(engine_for(kb, route="rag"), name="fruit", description="Bananas, fruit and farming in Ecuador")
    router = RouterQueryEngine(
        selector=EmbeddingSingleSelector.from_defaults(embed_model=D2LEmbedding()),
        query_engine_tools=[zorblax, fruit],
        llm=D2LLLM(engine=engine, max_tokens=4),
    )
    response = router.query(QUESTION)
    assert response.metadata["route"] == "d2l" and response.metadata["selector_result"].ind == 0
    banana = router.query("Where are bananas grown?")
    assert banana.metadata["route"] == "rag"
