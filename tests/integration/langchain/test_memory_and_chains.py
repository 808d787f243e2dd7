"""ChatD2L and the memory tools on the REAL default model (CPU): chains, retriever, verified forgetting.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/langchain -m slow
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.langchain import ChatD2L, D2LRetriever, memory_tools
from d2l_integrations.memory import D2LMemory
from d2l_integrations.routing.engines import shared_engine

pytestmark = pytest.mark.slow

FACT = "The secret code of the Zorblax vault is 7421."
QUESTION = "What is the secret code of the Zorblax vault?"


@pytest.fixture(scope="module")
def engine() -> D2LEngine:
    return shared_engine("default", device="cpu")


@pytest.fixture(scope="module")
def kb(engine: D2LEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    store = KnowledgeBase(tmp_path_factory.mktemp("kb"), engine, lazy=True)  # RAG needs no adapters
    store.add([FACT, "Bananas are yellow fruits grown in Ecuador."], doc_id=["vault", "banana"])
    yield store
    store.close()


def test_rag_chain_with_retriever_over_the_same_store(kb: KnowledgeBase) -> None:
    model = ChatD2L(knowledge_base=kb, route="rag", max_tokens=16)
    docs = D2LRetriever(knowledge_base=kb, k=1).invoke(QUESTION)
    assert docs[0].metadata["doc_id"] == "vault"
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    answer = chain.invoke({"q": QUESTION})
    message = model.invoke(QUESTION)
    assert answer and answer == message.content
    assert message.response_metadata["source_chunk_ids"][0] == docs[0].id  # the retriever's top chunk leads the prompt


def test_forget_is_verified_on_the_real_model(engine: D2LEngine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    kb = KnowledgeBase(tmp_path / "memory", engine)
    tools = {t.name: t for t in memory_tools(D2LMemory(kb, max_new_tokens=16))}
    stored = json.loads(tools["remember"].invoke({"text": FACT, "namespace": "user/alice"}))
    recalled = json.loads(tools["recall"].invoke({"query": QUESTION, "namespace": "user/alice"}))
    assert recalled["memory_ids"] == [stored["id"]] and recalled["route"] in ("d2l", "rag")
    chunks = kb.chunks(stored["id"])
    sha = chunks[0].metadata["sha256"]
    assert kb.adapter_store.has(sha)
    # "Answered": the memory's adapter makes the fact's answer more likely than the base model finds it.
    messages = [{"role": "user", "content": QUESTION}]
    with_memory = engine.score(messages, "The secret code is 7421.", adapters=kb.adapters_for(chunks))
    assert with_memory > engine.score(messages, "The secret code is 7421.", adapters=None)

    assert json.loads(tools["forget"].invoke({"id": stored["id"]})) == {"forgotten": [stored["id"]]}

    assert not kb.adapter_store.has(sha) and kb.search(QUESTION, k=4) == [] and stored["id"] not in kb
    after = json.loads(tools["recall"].invoke({"query": QUESTION, "namespace": "user/alice"}))
    assert "7421" not in after["answer"] and after["memory_ids"] == [] and after["route"] == "base"
    kb.close()
