"""The knowledge store: documents -> chunks -> Chroma (text + embeddings) and per-chunk D2L adapters.

Never imports LangChain or LlamaIndex at import time (their objects are recognised by duck typing).
"""

from d2l_integrations.knowledge.adapter_store import AdapterStore
from d2l_integrations.knowledge.chroma_store import ChromaHit, ChromaStore
from d2l_integrations.knowledge.embeddings import MiniLMEmbeddingFunction
from d2l_integrations.knowledge.ingestion import (
    Chunk,
    Chunker,
    Element,
    SourceDocument,
    configure_unstructured,
    load_source,
)
from d2l_integrations.knowledge.knowledge_base import AddStats, DocumentInfo, KnowledgeBase, RetrievedChunk

__all__ = [
    "AdapterStore",
    "AddStats",
    "ChromaHit",
    "ChromaStore",
    "Chunk",
    "Chunker",
    "DocumentInfo",
    "Element",
    "KnowledgeBase",
    "MiniLMEmbeddingFunction",
    "RetrievedChunk",
    "SourceDocument",
    "configure_unstructured",
    "load_source",
]
