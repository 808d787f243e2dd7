"""``D2LLLM``: a LlamaIndex ``CustomLLM`` that generates with internalized documents as LoRA adapters."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    achat_to_completion_decorator,
    astream_chat_to_completion_decorator,
    chat_to_completion_decorator,
    stream_chat_to_completion_decorator,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.lora import LoRAAdapter
from d2l_integrations.errors import ConfigError, InvalidMessagesError, UnsupportedContentError
from d2l_integrations.routing import Internalized, InternalizedDocument, RoutedAnswer, Router, RouterConfig, document_id
from d2l_integrations.routing.concurrency import iterate_in_thread, run_in_thread
from d2l_integrations.routing.engines import shared_engine

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant", MessageRole.DEVELOPER: "system"}


class D2LLLM(CustomLLM):
    """Doc-to-LoRA LLM for LlamaIndex: answers with internalized documents applied as adapters.

    ``chat`` and ``stream_chat`` are written once; ``complete`` and the async and streaming
    variants derive from them. Token counts, the route decision and the timings are in
    ``response.raw``.

    Setup:
        .. code-block:: python

            from llama_index.core import Settings
            from d2l_integrations.llama_index import D2LLLM, D2LEmbedding

            Settings.llm = D2LLLM()              # never the OpenAI default (offline)
            Settings.embed_model = D2LEmbedding()

    Internalize and ask:
        .. code-block:: python

            llm = D2LLLM(max_tokens=48)
            llm.internalize("The Zorblax Institute was founded in 1873 by Mira Quell.")
            llm.complete("Who founded the Zorblax Institute?").text
            llm.complete("...").raw["route_decision"]["route"]       # 'd2l'
            llm.reset()

    Args:
        model: base model name (``"default"``: the embedded SmolLM2-135M-Instruct).
        max_tokens: most tokens per answer.
        temperature: 0 is greedy.
        engine: a loaded ``D2LEngine`` to share (default: the process's engine for ``model``).
    """

    model: str = Field(default="default", description="Base model: 'default', a hub id, a folder or a .gguf.")
    max_tokens: int = Field(default=128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (temperature > 0).")
    seed: int | None = Field(default=None, description="Seed for sampling.")
    device: str | None = Field(default=None, description="Device of the shared engine (None: CUDA when available).")
    internalize_method: str = Field(default="auto", description="auto, hypernetwork, distill or refine.")

    _engine: D2LEngine | None = PrivateAttr(default=None)
    _router_config: RouterConfig | None = PrivateAttr(default=None)
    _internalized: Internalized = PrivateAttr(default_factory=Internalized)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, *, engine: D2LEngine | None = None, router_config: RouterConfig | None = None, **kwargs: Any) -> None:
        if engine is not None and "model" not in kwargs:
            kwargs["model"] = engine.base.name
        super().__init__(**kwargs)
        self._engine = engine
        self._router_config = router_config

    @classmethod
    def class_name(cls) -> str:
        return "D2LLLM"

    @property
    def engine(self) -> D2LEngine:
        """The engine (loaded on first use)."""
        if self._engine is None:
            self._engine = shared_engine(self.model, device=self.device)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        engine = self._engine
        return LLMMetadata(
            context_window=engine.base.context_window if engine is not None else 8192,
            num_output=self.max_tokens,
            is_chat_model=True,
            model_name=engine.base.name if engine is not None else self.model,
        )

    # ------------------------------------------------------------------ knowledge
    @property
    def internalized(self) -> Internalized:
        return self._internalized

    def internalize(self, text: str, *, doc_id: str | None = None) -> str:
        """Internalize ``text`` into an adapter used by every later call; return its id."""
        import time

        t0 = time.perf_counter()
        adapter = self.engine.internalize(text, method=self.internalize_method, activate=False)
        doc_id = doc_id or document_id(text)
        document = InternalizedDocument(doc_id, text, adapter, self.engine.count_tokens(text), time.perf_counter() - t0)
        with self._lock:
            self._internalized = self._internalized.remove([doc_id]).add(document)
        return doc_id

    def reset(self) -> None:
        """Forget everything internalized into this LLM."""
        with self._lock:
            self._internalized = Internalized()

    # ------------------------------------------------------------------ chat (the one implementation)
    def _settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.pop("formatted", None)
        unknown = set(kwargs) - {"max_tokens", "temperature", "top_p", "seed", "stop", "adapter", "route"}
        if unknown:
            msg = f"Unknown D2LLLM arguments {sorted(unknown)}. Use max_tokens, temperature, top_p, seed, stop, adapter, route."
            raise ConfigError(msg)
        stop = kwargs.get("stop") or ()
        return {
            "max_new_tokens": int(kwargs.get("max_tokens", self.max_tokens)),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "seed": kwargs.get("seed", self.seed),
            "stop": (stop,) if isinstance(stop, str) else tuple(stop),
        }

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> tuple[Router, Any, dict[str, Any], Any]:
        internalized = self._internalized
        adapter = kwargs.pop("adapter", None)
        if adapter is not None:
            if not isinstance(adapter, LoRAAdapter):
                msg = f"adapter must be a LoRAAdapter, got {type(adapter).__name__}."
                raise ConfigError(msg)
            internalized = Internalized((InternalizedDocument("adapter", "", adapter, 0, 0.0),), adapter)
        route = kwargs.pop("route", None)
        settings = self._settings(kwargs)
        router = Router(self.engine, None, self._router_config, policy="auto")
        plan = router.plan(to_engine_messages(messages), route=route, internalized=internalized)
        return router, plan, settings, internalized

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        router, plan, settings, internalized = self._request(messages, kwargs)
        generation = router.engine.generate(plan.messages, adapters=plan.adapter, **settings)
        answer = router.finish(plan, generation)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=answer.text), raw=raw(answer))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        router, plan, settings, _ = self._request(messages, kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for event in router.stream(plan, **settings):
                text += event.text
                if event.generation is not None:
                    answer = router.finish(plan, event.generation)
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=event.text, raw=raw(answer))
                elif event.text:
                    yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=event.text)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await run_in_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(partial(self.stream_chat, messages, **kwargs))  # type: ignore[return-value]

    # ------------------------------------------------------------------ completion: derived from chat
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return chat_to_completion_decorator(self.chat)(prompt, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return stream_chat_to_completion_decorator(self.stream_chat)(prompt, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await achat_to_completion_decorator(self.achat)(prompt, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return await astream_chat_to_completion_decorator(self.astream_chat)(prompt, **kwargs)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex ``ChatMessage``\\ s -> engine messages; non-text blocks raise ``UnsupportedContentError``."""
    if not messages:
        msg = "D2LLLM got an empty message list. Pass at least one user message."
        raise InvalidMessagesError(msg)
    out = []
    for i, message in enumerate(messages):
        role = _ROLES.get(MessageRole(message.role))
        if role is None:
            msg = f"Message {i} has role {message.role!r}; D2LLLM supports system, user and assistant (no tool calling)."
            raise InvalidMessagesError(msg)
        parts = []
        for block in message.blocks:
            if not isinstance(block, TextBlock):
                msg = (
                    f"Message {i} has a {type(block).__name__}. The D2L base model reads text only; "
                    "remove images, audio and documents, or describe them in text."
                )
                raise UnsupportedContentError(msg)
            parts.append(block.text)
        out.append({"role": role, "content": "".join(parts)})
    return out


def raw(answer: RoutedAnswer) -> dict[str, Any]:
    """What ``response.raw`` carries: usage (OpenAI-style keys), route decision, timings, savings."""
    return {
        "usage": {
            "prompt_tokens": answer.usage.prompt_tokens,
            "completion_tokens": answer.usage.completion_tokens,
            "total_tokens": answer.usage.total_tokens,
        },
        "finish_reason": answer.generation.finish_reason,
        "route_decision": answer.decision.to_dict(),
        "timings": dict(answer.timings),
        "prompt_tokens_saved": answer.usage.prompt_tokens_saved,
        "full_context_prompt_tokens": answer.usage.full_context_prompt_tokens,
    }


__all__ = ["D2LLLM"]
