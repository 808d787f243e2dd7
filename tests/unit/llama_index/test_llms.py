"""Parity tests for D2LLLM, modelled on LangChain's standard chat-model tests (sync/async/stream/metadata)."""

from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole
from llama_index.core.llms.custom import CustomLLM

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import InvalidMessagesError, UnsupportedContentError
from d2l_integrations.llama_index import D2LLLM
from d2l_integrations.routing import RouterConfig

FACT = "The Zorblax Institute was founded in 1873 by Mira Quell."
QUESTION = "Who founded the Zorblax Institute?"


@pytest.fixture()
def llm(engine: D2LEngine) -> D2LLLM:
    model = D2LLLM(engine=engine, max_tokens=6, router_config=RouterConfig(min_confidence=-100.0))
    model.internalize(FACT, doc_id="zorblax")
    return model


def test_class(llm: D2LLLM) -> None:
    assert CustomLLM in D2LLLM.__mro__
    assert D2LLLM.class_name() == "D2LLLM"
    meta = llm.metadata
    assert meta.model_name == "tiny-random-llama" and meta.is_chat_model and meta.num_output == 6
    assert meta.context_window == 1024


def test_complete_and_chat_use_the_adapter(llm: D2LLLM, engine: D2LEngine) -> None:
    expected = engine.generate([{"role": "user", "content": QUESTION}], adapters=llm.internalized.adapter, max_new_tokens=6)
    completion = llm.complete(QUESTION)
    assert completion.text == expected.text
    chat = llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
    assert chat.message.content == expected.text
    for response in (completion, chat):
        assert response.raw["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.completion_tokens,
                                         "total_tokens": expected.prompt_tokens + expected.completion_tokens}
        assert response.raw["route_decision"]["route"] == "d2l" and response.raw["route_decision"]["adapter_ids"] == ["zorblax"]
        assert response.raw["prompt_tokens_saved"] > 0 and set(response.raw["timings"]) >= {"generate_s", "total_s"}


def test_stream_matches_complete(llm: D2LLLM) -> None:
    deltas = list(llm.stream_complete(QUESTION))
    assert "".join(d.delta or "" for d in deltas) == deltas[-1].text == llm.complete(QUESTION).text
    assert deltas[-1].raw["route_decision"]["route"] == "d2l"
    chat_deltas = list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content=QUESTION)]))
    assert chat_deltas[-1].message.content == deltas[-1].text


async def test_async_matches_sync(llm: D2LLLM) -> None:
    text = llm.complete(QUESTION).text
    assert (await llm.acomplete(QUESTION)).text == text
    assert (await llm.achat([ChatMessage(role=MessageRole.USER, content=QUESTION)])).message.content == text
    parts = [p async for p in await llm.astream_complete(QUESTION)]
    assert parts[-1].text == text
    chat_parts = [p async for p in await llm.astream_chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])]
    assert chat_parts[-1].message.content == text


def test_stop_and_max_tokens(llm: D2LLLM) -> None:
    long = llm.complete(QUESTION, max_tokens=10)
    assert long.raw["usage"]["completion_tokens"] <= 10 and len(long.text) > 2
    stop = long.text[1:3]
    stopped = llm.complete(QUESTION, max_tokens=10, stop=[stop])
    assert stop not in stopped.text and stopped.raw["finish_reason"] == "stop"


def test_reset_returns_to_the_base_model(llm: D2LLLM, engine: D2LEngine) -> None:
    llm.reset()
    response = llm.complete(QUESTION)
    assert response.raw["route_decision"]["route"] == "base"
    assert response.text == engine.generate([{"role": "user", "content": QUESTION}], adapters=None, max_new_tokens=6).text


def test_bad_input(llm: D2LLLM) -> None:
    with pytest.raises(InvalidMessagesError, match="empty message list"):
        llm.chat([])
    with pytest.raises(InvalidMessagesError, match="only system messages"):
        llm.chat([ChatMessage(role=MessageRole.SYSTEM, content="Be brief.")])
    image = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(url="https://example.com/cat.png")])
    with pytest.raises(UnsupportedContentError, match="ImageBlock.*text only"):
        llm.chat([image])
    with pytest.raises(InvalidMessagesError, match="no tool calling"):
        llm.chat([ChatMessage(role=MessageRole.TOOL, content="42")])
