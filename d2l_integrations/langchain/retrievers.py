"""``D2LRetriever``: a LangChain retriever over a ``KnowledgeBase`` (the same store ``ChatD2L`` routes over)."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field


class D2LRetriever(BaseRetriever):
    """Retrieve chunks of a ``KnowledgeBase`` as LangChain ``Document``\\ s.

    Each document's ``id`` is the chunk id and its metadata carries ``chunk_id``, ``doc_id``,
    ``score`` (cosine similarity) and ``adapter_id``, so a chain can hand the same chunks to
    ``ChatD2L`` (``model.invoke(q, route="rag")``) or to ``KnowledgeBase.adapters_for``.

    Instantiate:
        .. code-block:: python

            from d2l_integrations.langchain.retrievers import D2LRetriever

            retriever = D2LRetriever(knowledge_base=kb, k=4)
            retriever.invoke("Who founded Zorblax?")
            # [Document(id='zorblax@0#0', page_content='The Zorblax ...', metadata={'score': 0.81, ...})]

    Use in a chain:
        .. code-block:: python

            chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | ChatD2L() | StrOutputParser()
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    knowledge_base: Any = Field(exclude=True)
    """The ``KnowledgeBase`` to search."""
    k: int = Field(default=4, ge=1)
    """Chunks to return."""
    where: dict[str, Any] | None = None
    """Chroma metadata filter, e.g. ``{"doc_id": "handbook"}``."""
    score_threshold: float | None = None
    """Drop chunks scoring below this cosine similarity (None keeps all ``k``)."""

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.knowledge_base.search(query, k=self.k, where=self.where)
        return [
            Document(
                id=h.chunk_id,
                page_content=h.text,
                metadata={**dict(h.metadata), "chunk_id": h.chunk_id, "doc_id": h.doc_id, "score": float(h.score), "adapter_id": h.adapter_id},
            )
            for h in hits
            if self.score_threshold is None or h.score >= self.score_threshold
        ]


__all__ = ["D2LRetriever"]
