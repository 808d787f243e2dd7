"""Memory tools (LangChain StructuredTools and LlamaIndex FunctionTools) over D2LMemory, with verified forgetting."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import ConfigError, DocumentNotFoundError
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.langchain.tools import memory_tools
from d2l_integrations.memory import D2LMemory, parse_namespace
from d2l_integrations.routing import RouterConfig

FACT = "Alice's cat is called Pixel and sleeps in the blue basket."
QUESTION = "What is Alice's cat called?"
CONFIG = RouterConfig(min_relevance=0.3, adapter_budget=3, min_confidence=-100.0)


@pytest.fixture()
def kb(engine: D2LEngine, tmp_path) -> Iterator[KnowledgeBase]:  # type: ignore[no-untyped-def]
    store = KnowledgeBase(tmp_path / "memory", engine)
    yield store
    store.close()


@pytest.fixture()
def memory(kb: KnowledgeBase) -> D2LMemory:
    return D2LMemory(kb, router_config=CONFIG, max_new_tokens=6)


def test_forget_is_verified_in_both_stores(memory: D2LMemory, kb: KnowledgeBase, engine: D2LEngine) -> None:
    item = memory.remember(FACT, ("user", "alice"))
    recall = memory.recall(QUESTION, "user/alice")
    assert recall.decision.route.value == "d2l" and [m.id for m in recall.memories] == [item.id]
    chunk = kb.chunks(item.id)[0]
    with_fact = engine.generate([{"role": "user", "content": QUESTION}], adapters=kb.adapters_for([chunk]), max_new_tokens=6)
    assert recall.answer == with_fact.text  # answered from the memory's own adapter
    sha = chunk.metadata["sha256"]
    assert kb.adapter_store.has(sha) and kb.search(QUESTION, k=1)[0].doc_id == item.id

    assert memory.forget(item.id) == [item.id]

    assert item.id not in kb and memory.list() == []
    assert not kb.adapter_store.has(sha) and not kb.adapter_store.path(sha).exists()  # adapter gone
    assert kb.search(QUESTION, k=4) == []  # text and embedding gone from Chroma
    after = memory.recall(QUESTION, "user/alice")
    base = engine.generate([{"role": "user", "content": QUESTION}], adapters=None, max_new_tokens=6)
    assert after.memories == () and after.decision.route.value == "base" and after.answer == base.text
    with pytest.raises(DocumentNotFoundError):
        memory.forget(item.id)


def test_namespaces_scope_recall_and_forget(memory: D2LMemory) -> None:
    a = memory.remember(FACT, "user/alice")
    b1 = memory.remember("Bob likes green tea.", "user/bob")
    b2 = memory.remember("Bob lives in Vell.", ("user", "bob"), id="bob-home", metadata={"source": "chat"})
    assert b2.id == "bob-home"
    assert {m.id for m in memory.list("user")} == {a.id, b1.id, b2.id}
    assert {m.id for m in memory.list(("user", "bob"))} == {b1.id, b2.id}
    assert all(m.namespace == ("user", "bob") for m in memory.search("tea", "user/bob"))
    assert memory.recall("What does Bob like?", "user/alice").memories[0].id == a.id  # never sees Bob's memories
    assert sorted(memory.forget(namespace="user/bob")) == sorted([b1.id, b2.id])
    assert [m.id for m in memory.list()] == [a.id]
    assert memory.reset() == 1 and memory.list() == []


def test_remember_replaces_an_existing_id(memory: D2LMemory) -> None:
    memory.remember("Bob likes tea.", "user/bob", id="bob-drink")
    memory.remember("Bob likes coffee.", "user/bob", id="bob-drink")
    assert [m.text for m in memory.list()] == ["Bob likes coffee."]


def test_bad_arguments(memory: D2LMemory) -> None:
    with pytest.raises(ConfigError, match="exactly one of id"):
        memory.forget()
    with pytest.raises(ConfigError, match="Invalid namespace"):
        parse_namespace("user//alice")


def test_langchain_tools(memory: D2LMemory) -> None:
    tools = {t.name: t for t in memory_tools(memory)}
    assert sorted(tools) == ["forget", "recall", "remember", "reset"]
    stored = json.loads(tools["remember"].invoke({"text": FACT, "namespace": "user/alice"}))
    recalled = json.loads(tools["recall"].invoke({"query": QUESTION, "namespace": "user/alice"}))
    assert recalled["memory_ids"] == [stored["id"]] and recalled["route"] == "d2l"
    assert json.loads(tools["forget"].invoke({"id": stored["id"]})) == {"forgotten": [stored["id"]]}
    assert json.loads(tools["reset"].invoke({})) == {"forgotten": 0}


def test_llama_index_tools(memory: D2LMemory) -> None:
    from d2l_integrations.llama_index.tools import memory_tools as li_memory_tools

    tools = {t.metadata.name: t for t in li_memory_tools(memory)}
    assert sorted(tools) == ["forget", "recall", "remember", "reset"]
    stored = json.loads(tools["remember"](text=FACT, namespace="user/alice").content)
    recalled = json.loads(tools["recall"](query=QUESTION).content)
    assert recalled["memory_ids"] == [stored["id"]]
    assert json.loads(tools["forget"](namespace="user").content) == {"forgotten": [stored["id"]]}
