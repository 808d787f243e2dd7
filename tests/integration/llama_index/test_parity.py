"""D2LQueryEngine and D2LLLM on the REAL default model (CPU): sync/async/stream/metadata parity.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/llama_index -m slow
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llama_index.core import Document
from llama_index.core.base.response.schema import Response, StreamingResponse

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.llama_index import D2LLLM, D2LQueryEngine
from d2l_integrations.routing.engines import shared_engine

pytestmark = pytest.mark.slow

QUESTION = "What is the secret code of the Zorblax vault?"


@pytest.fixture(scope="module")
def engine() -> D2LEngine:
    return shared_engine("default", device="cpu")


@pytest.fixture(scope="module")
def kb(engine: D2LEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    store = KnowledgeBase(tmp_path_factory.mktemp("kb"), engine, lazy=True)
    store.add([Document(text="The secret code of the Zorblax vault is 7421.", id_="vault"),
               Document(text="Bananas are yellow fruits grown in Ecuador.", id_="banana")])
    yield store
    store.close()


def test_query_aquery_stream_agree(kb: KnowledgeBase) -> None:
    qe = D2LQueryEngine.from_knowledge_base(kb, route="rag", max_tokens=16)
    response = qe.query(QUESTION)
    assert isinstance(response, Response) and response.response
    assert response.source_nodes[0].node.metadata["doc_id"] == "vault"
    assert response.source_nodes[0].node.text == "The secret code of the Zorblax vault is 7421."
    assert response.metadata["route"] == "rag" and response.metadata["usage"]["prompt_tokens"] > 0
    streaming = D2LQueryEngine.from_knowledge_base(kb, route="rag", max_tokens=16, streaming=True).query(QUESTION)
    assert isinstance(streaming, StreamingResponse) and "".join(streaming.response_gen) == response.response


async def test_aquery(kb: KnowledgeBase) -> None:
    qe = D2LQueryEngine.from_knowledge_base(kb, route="rag", max_tokens=16)
    assert (await qe.aquery(QUESTION)).response == qe.query(QUESTION).response


async def test_llm_complete_stream_async(engine: D2LEngine) -> None:
    llm = D2LLLM(engine=engine, max_tokens=12)
    text = llm.complete("Hello").text
    assert text and llm.metadata.model_name == engine.base.name
    assert list(llm.stream_complete("Hello"))[-1].text == text
    assert (await llm.acomplete("Hello")).text == text
