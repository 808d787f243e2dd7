"""The chunk index in Chroma: text, metadata and embeddings, queried by cosine similarity.

Embedded (``chromadb.PersistentClient(path)``) by default; a Chroma server
(``chromadb.HttpClient(host, port)``) when a URL is given. The collection uses cosine distance and
:class:`~d2l_integrations.knowledge.embeddings.MiniLMEmbeddingFunction`; scores returned are cosine
*similarities* (``1 - distance``, higher is better, at most 1).

Embedded Chroma is not multi-process safe: two processes that keep clients open on one folder
corrupt each other's in-memory index ("Error finding id"). :class:`ChromaStore` therefore lets the
caller (the knowledge base, which holds a file lock) :meth:`~ChromaStore.reopen` the client after
another process has written; a fresh client re-reads the folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from d2l_integrations.errors import ConfigError
from d2l_integrations.knowledge.embeddings import MiniLMEmbeddingFunction

logger = logging.getLogger(__name__)

Where = Mapping[str, Any]


@dataclass(frozen=True)
class ChromaHit:
    """One query result: chunk id, text, metadata and cosine similarity."""

    chunk_id: str
    text: str
    metadata: Mapping[str, Any]
    score: float


def parse_chroma_url(url: str) -> tuple[str, int, bool]:
    """``http://host:port`` -> ``(host, port, ssl)``; the port defaults to 8000 (443 for https)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        msg = f"Invalid Chroma URL {url!r}. Use http://HOST:PORT, e.g. http://127.0.0.1:8000."
        raise ConfigError(msg)
    ssl = parsed.scheme == "https"
    return parsed.hostname, parsed.port or (443 if ssl else 8000), ssl


class ChromaStore:
    """One Chroma collection holding the chunks of a knowledge base.

    Args:
        path: folder of the embedded database (used when ``url`` is None).
        url: ``http://host:port`` of a Chroma server (``chroma run --path DIR --port 8000``).
        collection: collection name (3-512 characters of ``[a-zA-Z0-9._-]``).
        embedding_function: default :class:`MiniLMEmbeddingFunction` (packaged model, offline).

    Example:
        >>> store = ChromaStore(path="kb/chroma", collection="d2l")
        >>> store.upsert(["a#0"], ["The sky is green on Zorblax."], [{"doc_id": "a"}])
        >>> store.query("What colour is the sky?", k=1)[0].score   # cosine similarity
    """

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        url: str | None = None,
        collection: str = "d2l",
        embedding_function: MiniLMEmbeddingFunction | None = None,
    ) -> None:
        if (path is None) == (url is None):
            msg = f"Pass exactly one of path= (embedded Chroma) and url= (Chroma server); got path={path!r}, url={url!r}."
            raise ConfigError(msg)
        self.path = Path(path) if path is not None else None
        self.url = url
        self.collection_name = collection
        self.embedding_function = embedding_function or MiniLMEmbeddingFunction()
        self._client: Any = None
        self._collection: Any = None

    @property
    def is_embedded(self) -> bool:
        return self.url is None

    # ---------------------------------------------------------------- client lifecycle
    def _connect(self) -> None:
        import chromadb
        from chromadb.config import Settings

        settings = Settings(anonymized_telemetry=False)
        if self.url is None:
            assert self.path is not None
            self.path.mkdir(parents=True, exist_ok=True)
            self._client = chromadb.PersistentClient(path=str(self.path), settings=settings)
        else:
            host, port, ssl = parse_chroma_url(self.url)
            try:
                self._client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=settings)
            except Exception as exc:  # httpx/chromadb raise several types for a dead server
                msg = f"Cannot reach the Chroma server at {self.url} ({exc}). Start it with `chroma run --path DIR --port {port}`."
                raise ConnectionError(msg) from exc
        try:
            self._collection = self._client.get_or_create_collection(
                self.collection_name,
                embedding_function=self.embedding_function,
                configuration={"hnsw": {"space": "cosine"}},
            )
        except ValueError as exc:
            msg = f"Cannot open Chroma collection {self.collection_name!r}: {exc}"
            raise ConfigError(msg) from exc

    @property
    def collection(self) -> Any:
        """The underlying ``chromadb`` collection (connects on first use)."""
        if self._collection is None:
            self._connect()
        return self._collection

    def reopen(self) -> None:
        """Drop the embedded client and its cached system so the next call re-reads the folder."""
        self.close()

    def close(self) -> None:
        """Release the client. For embedded Chroma this stops its system (files stay)."""
        client, self._client, self._collection = self._client, None, None
        if client is None or not self.is_embedded:
            return
        from chromadb.api.shared_system_client import SharedSystemClient

        identifier = getattr(client, "_identifier", None)
        with SharedSystemClient._refcount_lock:
            system = SharedSystemClient._identifier_to_system.pop(identifier, None) if identifier else None
            SharedSystemClient._identifier_to_refcount.pop(identifier, None)
        if system is not None:
            try:
                system.stop()
            except Exception:  # stopping twice or during interpreter shutdown is harmless
                logger.debug("Ignoring error while stopping the Chroma system", exc_info=True)

    # ---------------------------------------------------------------- data
    def embed(self, texts: Sequence[str]) -> list[Any]:
        """Embed texts with the collection's embedding function."""
        return list(self.embedding_function(list(texts)))

    def upsert(
        self,
        ids: Sequence[str],
        texts: Sequence[str],
        metadatas: Sequence[Mapping[str, Any]],
        embeddings: Sequence[Any] | None = None,
    ) -> None:
        """Insert or replace chunks (embedded here when ``embeddings`` is None)."""
        if not ids:
            return
        if embeddings is None:
            embeddings = self.embed(texts)
        self.collection.upsert(
            ids=list(ids), documents=list(texts), metadatas=[dict(m) for m in metadatas], embeddings=list(embeddings)
        )

    def delete(self, ids: Sequence[str]) -> None:
        """Delete chunks by id (unknown ids are ignored)."""
        for start in range(0, len(ids), 1000):
            self.collection.delete(ids=list(ids[start : start + 1000]))

    def ids(self, *, page_size: int = 5000) -> set[str]:
        """All chunk ids in the collection."""
        found: set[str] = set()
        offset = 0
        while True:
            page = self.collection.get(include=[], limit=page_size, offset=offset)
            found.update(page["ids"])
            if len(page["ids"]) < page_size:
                return found
            offset += page_size

    def count(self) -> int:
        return int(self.collection.count())

    def query(
        self,
        query: str | Sequence[float],
        k: int = 4,
        *,
        where: Where | None = None,
    ) -> list[ChromaHit]:
        """The ``k`` chunks most similar to ``query`` (text or embedding), best first.

        ``where`` is passed to Chroma unchanged, e.g. ``{"doc_id": "a"}`` or
        ``{"$and": [{"page": {"$gte": 2}}, {"filetype": "pdf"}]}``.
        """
        if k < 1:
            msg = f"k must be at least 1; got {k}."
            raise ConfigError(msg)
        embedding = np.asarray(self.embed([query])[0] if isinstance(query, str) else query, dtype=np.float32)
        n = self.count()
        if n == 0:
            return []
        result = self.collection.query(
            query_embeddings=[embedding],
            n_results=min(k, n),
            where=dict(where) if where else None,
            include=["documents", "metadatas", "distances"],
        )
        hits = []
        for chunk_id, text, meta, dist in zip(
            result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0], strict=True
        ):
            hits.append(ChromaHit(chunk_id=chunk_id, text=text or "", metadata=dict(meta or {}), score=1.0 - float(dist)))
        return hits
