"""``D2LQueryEngine``: a LlamaIndex query engine that answers from D2L adapters, RAG, or both."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncGenerator, Generator, Sequence
from functools import partial
from typing import Any

from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import ConfigError
from d2l_integrations.llama_index.llms import raw
from d2l_integrations.routing import RoutedAnswer, Router, RouterConfig
from d2l_integrations.routing.concurrency import iterate_in_thread, run_in_thread
from d2l_integrations.routing.decision import parse_route
from d2l_integrations.routing.engines import check_same_engine, shared_engine
from d2l_integrations.routing.router import RoutePlan


class D2LQueryEngine(CustomQueryEngine):
    """Query engine over a ``KnowledgeBase``: each query routed to adapters (D2L), RAG, hybrid or full context.

    Every route returns the same type (``Response``, or ``StreamingResponse`` with
    ``streaming=True``): ``source_nodes`` are the retrieved chunks for RAG and the chunks whose
    adapters were applied for D2L; ``metadata`` holds ``route``, ``route_decision``, ``usage``,
    ``timings`` and ``prompt_tokens_saved``.

    Build:
        .. code-block:: python

            from llama_index.core import Document
            from d2l_integrations.llama_index import D2LQueryEngine

            qe = D2LQueryEngine.from_documents([Document(text="The Zorblax Institute ...")], persist_dir="kb")
            qe = D2LQueryEngine.from_knowledge_base(kb, route="auto")

    Query:
        .. code-block:: python

            response = qe.query("Who founded the Zorblax Institute?")
            str(response), response.metadata["route"], response.source_nodes[0].node.text
            await qe.aquery("...")
            D2LQueryEngine.from_knowledge_base(kb, streaming=True).query("...").print_response_stream()

    As a tool in a RouterQueryEngine:
        .. code-block:: python

            from llama_index.core.query_engine import RouterQueryEngine
            from llama_index.core.selectors import EmbeddingSingleSelector
            from llama_index.core.tools import QueryEngineTool

            tool = QueryEngineTool.from_defaults(qe, description="Facts about the Zorblax Institute")
            router = RouterQueryEngine(selector=EmbeddingSingleSelector.from_defaults(embed_model=D2LEmbedding()),
                                       query_engine_tools=[tool, other_tool], llm=D2LLLM())
    """

    engine: Any = Field(default=None, exclude=True, description="The D2LEngine (default: the knowledge base's).")
    knowledge_base: Any = Field(default=None, exclude=True, description="The KnowledgeBase to route over.")
    route: str = Field(default="auto", description="auto, d2l, rag, hybrid or full_context.")
    router_config: Any = Field(default=None, exclude=True, description="RouterConfig (default: the calibration).")
    max_tokens: int = Field(default=128, ge=1, description="Most tokens per answer.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    streaming: bool = Field(default=False, description="Return a StreamingResponse (token by token).")
    where: dict[str, Any] | None = Field(default=None, description="Chroma metadata filter for retrieval.")

    _router: Router = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        parse_route(self.route)
        if self.engine is None:
            self.engine = getattr(self.knowledge_base, "engine", None) or shared_engine("default")
        if not isinstance(self.engine, D2LEngine):
            msg = f"engine must be a D2LEngine, got {type(self.engine).__name__}."
            raise ConfigError(msg)
        kb_engine = getattr(self.knowledge_base, "engine", None)
        if isinstance(kb_engine, D2LEngine):
            check_same_engine(kb_engine, self.engine)
        config = self.router_config if isinstance(self.router_config, RouterConfig) else None
        self._router = Router(self.engine, self.knowledge_base, config, policy=self.route)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_knowledge_base(cls, knowledge_base: Any, **kwargs: Any) -> D2LQueryEngine:
        """A query engine over an existing ``KnowledgeBase`` (its engine is used)."""
        return cls(knowledge_base=knowledge_base, **kwargs)

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Any],
        *,
        engine: D2LEngine | None = None,
        persist_dir: str | None = None,
        **kwargs: Any,
    ) -> D2LQueryEngine:
        """Index and internalize LlamaIndex ``Document``\\ s (or texts) into a new ``KnowledgeBase``.

        Args:
            documents: LlamaIndex ``Document``/``TextNode`` objects or strings.
            engine: the engine (default: the shared default engine).
            persist_dir: folder of the knowledge base (default: a new temporary folder).
            kwargs: fields of the query engine (``route``, ``max_tokens``, ``streaming``, ...).
        """
        from d2l_integrations.knowledge import KnowledgeBase

        engine = engine or shared_engine("default")
        knowledge_base = KnowledgeBase(persist_dir or tempfile.mkdtemp(prefix="d2l_kb_"), engine)
        knowledge_base.add(list(documents), progress=False)
        return cls(knowledge_base=knowledge_base, engine=engine, **kwargs)

    # ------------------------------------------------------------------ querying
    @property
    def router(self) -> Router:
        return self._router

    def _settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature}

    def _messages(self, query_str: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": query_str}]

    def custom_query(self, query_str: str) -> Response | StreamingResponse:  # type: ignore[override]
        if self.streaming:
            plan = self._router.plan(self._messages(query_str), where=self.where)
            metadata = _metadata_before(plan)
            return StreamingResponse(response_gen=self._token_gen(plan, metadata), source_nodes=source_nodes(plan.chunks), metadata=metadata)
        answer = self._router.answer(self._messages(query_str), where=self.where, **self._settings())
        return to_response(answer)

    async def acustom_query(self, query_str: str) -> Response | AsyncStreamingResponse:  # type: ignore[override]
        if self.streaming:
            plan = await run_in_thread(self._router.plan, self._messages(query_str), where=self.where)
            metadata = _metadata_before(plan)

            async def agen() -> AsyncGenerator[str, None]:
                async for delta in iterate_in_thread(partial(self._token_gen, plan, metadata)):
                    yield delta

            return AsyncStreamingResponse(response_gen=agen(), source_nodes=source_nodes(plan.chunks), metadata=metadata)
        return await run_in_thread(self.custom_query, query_str)  # type: ignore[arg-type]

    def _token_gen(self, plan: RoutePlan, metadata: dict[str, Any]) -> Generator[str, None, None]:
        """Text deltas of ``plan``; ``metadata`` gets usage and timings when the stream ends."""
        for event in self._router.stream(plan, **self._settings()):
            if event.text:
                yield event.text
            if event.generation is not None:
                metadata.update(_metadata(self._router.finish(plan, event.generation)))


def source_nodes(chunks: Sequence[Any]) -> list[NodeWithScore]:
    """Retrieved chunks (``RetrievedChunk``) as LlamaIndex nodes, scored by retrieval similarity."""
    return [
        NodeWithScore(
            node=TextNode(id_=c.chunk_id, text=c.text, metadata={**dict(c.metadata), "chunk_id": c.chunk_id, "adapter_id": c.adapter_id}),
            score=float(c.score),
        )
        for c in chunks
    ]


def to_response(answer: RoutedAnswer) -> Response:
    """A ``RoutedAnswer`` as a LlamaIndex ``Response`` (same shape on every route)."""
    return Response(response=answer.text, source_nodes=source_nodes(answer.chunks), metadata=_metadata(answer))


def _metadata(answer: RoutedAnswer) -> dict[str, Any]:
    return {"route": answer.decision.route.value, **raw(answer)}


def _metadata_before(plan: RoutePlan) -> dict[str, Any]:
    return {"route": plan.decision.route.value, "route_decision": plan.decision.to_dict()}


__all__ = ["D2LQueryEngine", "source_nodes", "to_response"]
