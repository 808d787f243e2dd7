"""ChatD2L behaviour beyond the standard suite, on a real D2LEngine over a tiny random Llama."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import (
    InvalidMessagesError,
    KnowledgeBaseMismatchError,
    NoAdaptersError,
    UnsupportedContentError,
)
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.langchain import ChatD2L, D2LChatModel, D2LRetriever
from d2l_integrations.routing import RouteDecision, RouterConfig
from tests.tiny_models import tiny_engine

FACT = "The Zorblax Institute was founded in 1873 by Mira Quell."
QUESTION = "Who founded the Zorblax Institute?"
CONFIG = RouterConfig(min_relevance=0.5, adapter_budget=2, min_confidence=-100.0)


@pytest.fixture()
def model(engine: D2LEngine) -> ChatD2L:
    chat = ChatD2L(engine=engine, max_tokens=6, router_config=CONFIG)
    chat.internalize(FACT, ids=["zorblax"])
    return chat


@pytest.fixture(scope="module")
def kb(engine: D2LEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    store = KnowledgeBase(tmp_path_factory.mktemp("kb"), engine)
    store.add([FACT, "Bananas are yellow fruits grown in Ecuador."], doc_id=["zorblax", "banana"])
    yield store
    store.close()


def test_alias_and_identity(model: ChatD2L) -> None:
    assert D2LChatModel is ChatD2L
    assert model._llm_type == "d2l-chat"
    assert model.model_name == "tiny-random-llama"
    params = model._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "d2l" and params["ls_max_tokens"] == 6 and params["ls_stop"] == ["x"]


def test_invoke_applies_the_internalized_adapter(model: ChatD2L, engine: D2LEngine) -> None:
    message = model.invoke(QUESTION)
    adapter = model.internalized.adapter
    expected = engine.generate([{"role": "user", "content": QUESTION}], adapters=adapter, max_new_tokens=6)
    assert message.content == expected.text
    meta = message.response_metadata
    assert meta["model_name"] == "tiny-random-llama" and meta["route"] == "d2l"
    assert RouteDecision.from_dict(meta["route_decision"]).adapter_ids == ("zorblax",)
    assert set(meta["timings"]) >= {"internalize_s", "retrieve_s", "generate_s", "total_s"}
    assert meta["prompt_tokens_saved"] == meta["full_context_prompt_tokens"] - expected.prompt_tokens > 0
    assert message.usage_metadata == {
        "input_tokens": expected.prompt_tokens, "output_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
    }


def test_reset_forgets(model: ChatD2L, engine: D2LEngine) -> None:
    model.reset()
    message = model.invoke(QUESTION)
    assert message.response_metadata["route"] == "base"
    assert message.content == engine.generate([{"role": "user", "content": QUESTION}], adapters=None, max_new_tokens=6).text
    with pytest.raises(NoAdaptersError, match="nothing is internalized"):
        model.invoke(QUESTION, route="d2l")


def test_internalize_documents_and_forget_one(engine: D2LEngine) -> None:
    chat = ChatD2L(engine=engine, max_tokens=4, router_config=CONFIG)
    ids = chat.internalize([Document(page_content=FACT, id="a"), "Bananas are yellow."])
    assert ids[0] == "a" and len(ids) == 2
    chat.forget(["a"])
    assert chat.internalized.doc_ids == (ids[1],)


def test_stream_token_by_token_with_usage_on_every_chunk(model: ChatD2L) -> None:
    chunks = list(model.stream(QUESTION))
    assert all(isinstance(c, AIMessageChunk) and c.usage_metadata is not None for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    invoked = model.invoke(QUESTION)
    assert full.content == invoked.content
    assert full.usage_metadata == invoked.usage_metadata
    assert chunks[-1].chunk_position == "last" and chunks[-1].response_metadata["route"] == "d2l"
    assert len(chunks) >= 2  # token deltas, then the final chunk


async def test_async_matches_sync(model: ChatD2L) -> None:
    invoked = model.invoke(QUESTION)
    assert (await model.ainvoke(QUESTION)).content == invoked.content
    parts = [c async for c in model.astream(QUESTION)]
    assert "".join(str(c.content) for c in parts) == invoked.content
    assert parts[-1].response_metadata["route"] == "d2l"


def test_stop_max_tokens_temperature(model: ChatD2L) -> None:
    long = model.invoke(QUESTION, max_tokens=10)
    assert long.usage_metadata["output_tokens"] <= 10
    assert len(str(long.content)) > 2
    stop = str(long.content)[1:3]
    stopped = model.invoke(QUESTION, max_tokens=10, stop=[stop])
    assert stop not in stopped.content and stopped.response_metadata["finish_reason"] == "stop"
    a = model.invoke(QUESTION, temperature=1.5, seed=7)
    b = model.invoke(QUESTION, temperature=1.5, seed=7)
    assert a.content == b.content


def test_batch_with_one_adapter_per_row(engine: D2LEngine) -> None:
    chat = ChatD2L(engine=engine, max_tokens=6, router_config=CONFIG)
    adapters = [engine.internalize(t, activate=False) for t in ("Fact one.", "Fact two.", "Fact three.")]
    batch = chat.batch([QUESTION] * 3, adapters=adapters)
    single = [chat.invoke(QUESTION, adapter=a) for a in adapters]
    assert [m.content for m in batch] == [m.content for m in single]
    assert len({str(m.content) for m in batch}) > 1  # different adapters, different answers
    assert all(m.response_metadata["route"] == "d2l" and m.usage_metadata for m in batch)


async def test_abatch(model: ChatD2L) -> None:
    results = await model.abatch([QUESTION, "Hello"])
    assert results[0].content == model.invoke(QUESTION).content and len(results) == 2


def test_lcel_chain(model: ChatD2L) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{q}")])
    chain = prompt | model | StrOutputParser()
    direct = model.invoke([SystemMessage("Answer briefly."), HumanMessage(QUESTION)])
    assert chain.invoke({"q": QUESTION}) == direct.content


def test_tokens_use_the_base_models_tokenizer(model: ChatD2L, engine: D2LEngine) -> None:
    assert model.get_num_tokens(FACT) == engine.count_tokens(FACT) > 0
    assert model.get_token_ids(FACT) == engine.base.tokenizer(FACT, add_special_tokens=False)["input_ids"]
    assert model.get_num_tokens_from_messages([HumanMessage(QUESTION)]) == len(
        engine.base.chat_ids([{"role": "user", "content": QUESTION}])
    )


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ([], InvalidMessagesError, "empty message list"),
        ([SystemMessage("You are helpful.")], InvalidMessagesError, "only system messages"),
        ([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])],
         UnsupportedContentError, "'image_url' content block.*text only"),
        ([HumanMessage(content=[{"type": "image", "base64": "AAAA", "mime_type": "image/png"}])], UnsupportedContentError, "'image'"),
        ([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")], InvalidMessagesError, "does not support tool calling"),
    ],
)
def test_bad_input_raises_typed_errors(model: ChatD2L, messages: list, error: type, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=match):
        model.invoke(messages)


def test_unknown_call_argument_is_named(model: ChatD2L) -> None:
    with pytest.raises(ValueError, match=r"Unknown ChatD2L call arguments \['max_new_token'\]"):
        model.invoke(QUESTION, max_new_token=3)


def test_knowledge_base_routes_and_retriever_share_the_store(engine: D2LEngine, kb: KnowledgeBase) -> None:
    chat = ChatD2L(knowledge_base=kb, max_tokens=6, router_config=CONFIG)
    assert chat.get_engine() is engine
    message = chat.invoke(QUESTION)
    decision = RouteDecision.from_dict(message.response_metadata["route_decision"])
    assert decision.route.value == "d2l" and decision.chunk_ids == ("zorblax@0#0",)
    expected = engine.generate([{"role": "user", "content": QUESTION}], adapters=kb.adapters_for(["zorblax@0#0"]), max_new_tokens=6)
    assert message.content == expected.text
    rag = chat.invoke(QUESTION, route="rag")
    assert rag.response_metadata["route"] == "rag" and rag.usage_metadata["input_tokens"] > message.usage_metadata["input_tokens"]
    docs = D2LRetriever(knowledge_base=kb, k=1).invoke(QUESTION)
    assert docs[0].id == "zorblax@0#0" and docs[0].metadata["adapter_id"] == decision.adapter_ids[0]


def test_from_knowledge_base_matches_the_constructor(engine: D2LEngine, kb: KnowledgeBase) -> None:
    chat = ChatD2L.from_knowledge_base(kb, max_tokens=6, router_config=CONFIG)
    assert chat.knowledge_base is kb and chat.get_engine() is engine and chat.max_tokens == 6
    assert chat.invoke(QUESTION).content == ChatD2L(knowledge_base=kb, max_tokens=6, router_config=CONFIG).invoke(QUESTION).content


def test_knowledge_base_of_another_model_is_refused(kb: KnowledgeBase) -> None:
    other = tiny_engine(seed=1)  # same architecture, other weights: another revision
    with pytest.raises(KnowledgeBaseMismatchError, match="tiny-seed-0.*tiny-seed-1"):
        ChatD2L(engine=other, knowledge_base=kb)


async def test_50_concurrent_requests_each_use_only_their_own_adapters(engine: D2LEngine) -> None:
    models = []
    for i in range(50):
        chat = ChatD2L(engine=engine, max_tokens=5, router_config=CONFIG)
        chat.internalize(f"Document number {i}: the secret code is {i * 7919 % 1000}.")
        models.append(chat)
    sequential = [m.invoke(QUESTION) for m in models]
    concurrent = await asyncio.gather(*(m.ainvoke(QUESTION) for m in models))
    assert [c.content for c in concurrent] == [s.content for s in sequential]
    assert [c.response_metadata["route_decision"]["adapter_ids"] for c in concurrent] == [list(m.internalized.doc_ids) for m in models]
    assert len({str(s.content) for s in sequential}) > 25  # the adapters really differ, so a leak would show
