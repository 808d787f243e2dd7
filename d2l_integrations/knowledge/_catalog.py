"""The knowledge base's source of truth: a SQLite catalog (manifest, documents, chunks, journal).

Chroma and the adapter folder are *derived* from this catalog and are reconciled against it after
a crash. Every write is a short ``BEGIN IMMEDIATE`` transaction in WAL mode, so a killed process
leaves either the old or the new rows, never a mix.

States:
    documents.state  ``ready`` (visible) or ``pending`` (first version being written)
    chunks.state     ``ready`` (visible) or ``staged`` (written by ``owner``, not yet committed)
    ops              one row per running write operation; a row whose owner is dead marks an
                     interrupted operation that the next writer rolls back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    source TEXT NOT NULL,
    content_key TEXT NOT NULL,
    metadata TEXT NOT NULL,
    num_chunks INTEGER NOT NULL,
    owner TEXT,
    added_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    doc_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    num_tokens INTEGER NOT NULL,
    state TEXT NOT NULL,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (doc_id, version);
CREATE INDEX IF NOT EXISTS chunks_by_sha ON chunks (sha256);
CREATE INDEX IF NOT EXISTS chunks_by_owner ON chunks (owner);
CREATE TABLE IF NOT EXISTS ops (
    op_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    doc_id TEXT,
    started_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DocumentRow:
    doc_id: str
    state: str
    version: int
    source: str
    content_key: str
    metadata: Mapping[str, Any]
    num_chunks: int
    owner: str | None
    added_at: float
    updated_at: float


@dataclass(frozen=True)
class ChunkRow:
    chunk_id: str
    doc_id: str
    version: int
    index: int
    sha256: str
    text: str
    metadata: Mapping[str, Any]
    num_tokens: int
    state: str


def chunk_id_for(doc_id: str, version: int, index: int) -> str:
    """Chunk ids name their document, its version and their position: ``doc@v#i``."""
    return f"{doc_id}@{version}#{index}"


class Catalog:
    """Typed access to the SQLite catalog. Thread-safe; one connection per instance."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), timeout=120.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=OFF")
        with self._lock:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)."""
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> dict[str, str]:
        return dict(self._query("SELECT key, value FROM manifest"))  # type: ignore[arg-type]

    def get_manifest(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM manifest WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_manifest(self, values: Mapping[str, str]) -> None:
        with self.transaction() as cur:
            cur.executemany("INSERT OR REPLACE INTO manifest (key, value) VALUES (?, ?)", list(values.items()))

    # ------------------------------------------------------------------ documents
    def document(self, doc_id: str) -> DocumentRow | None:
        rows = self._query("SELECT * FROM documents WHERE doc_id = ?", (doc_id,))
        return _document_row(rows[0]) if rows else None

    def documents(self, *, state: str = "ready") -> list[DocumentRow]:
        return [_document_row(r) for r in self._query("SELECT * FROM documents WHERE state = ? ORDER BY added_at, doc_id", (state,))]

    def count_documents(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM documents WHERE state = 'ready'")[0][0])

    # ------------------------------------------------------------------ chunks
    def chunks_of(self, doc_id: str, *, version: int | None = None, state: str = "ready") -> list[ChunkRow]:
        if version is None:
            rows = self._query("SELECT * FROM chunks WHERE doc_id = ? AND state = ? ORDER BY idx", (doc_id, state))
        else:
            rows = self._query(
                "SELECT * FROM chunks WHERE doc_id = ? AND version = ? AND state = ? ORDER BY idx", (doc_id, version, state)
            )
        return [_chunk_row(r) for r in rows]

    def chunks_by_id(self, chunk_ids: Sequence[str], *, state: str | None = "ready") -> dict[str, ChunkRow]:
        found: dict[str, ChunkRow] = {}
        ids = list(chunk_ids)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT * FROM chunks WHERE chunk_id IN ({marks})"
            params: list[Any] = list(part)
            if state is not None:
                sql += " AND state = ?"
                params.append(state)
            for r in self._query(sql, params):
                row = _chunk_row(r)
                found[row.chunk_id] = row
        return found

    def all_chunk_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT chunk_id FROM chunks")}

    def ready_chunk_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT chunk_id FROM chunks WHERE state = 'ready'")}

    def count_chunks(self, *, state: str | None = None) -> int:
        if state is None:
            return int(self._query("SELECT COUNT(*) FROM chunks")[0][0])
        return int(self._query("SELECT COUNT(*) FROM chunks WHERE state = ?", (state,))[0][0])

    def referenced_shas(self) -> set[str]:
        return {r[0] for r in self._query("SELECT DISTINCT sha256 FROM chunks")}

    def ready_chunks(self) -> Iterator[ChunkRow]:
        for r in self._query("SELECT * FROM chunks WHERE state = 'ready' ORDER BY doc_id, idx"):
            yield _chunk_row(r)

    # ------------------------------------------------------------------ write operations
    def begin_op(self, op_id: str, owner: str, kind: str, doc_id: str | None) -> None:
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO ops (op_id, owner, kind, doc_id, started_at) VALUES (?, ?, ?, ?, ?)",
                (op_id, owner, kind, doc_id, time.time()),
            )

    def finish_op(self, op_id: str) -> None:
        with self.transaction() as cur:
            cur.execute("DELETE FROM ops WHERE op_id = ?", (op_id,))

    def active_op_for(self, doc_id: str) -> tuple[str, str] | None:
        rows = self._query("SELECT op_id, owner FROM ops WHERE doc_id = ? LIMIT 1", (doc_id,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def owners_with_work(self) -> set[str]:
        rows = self._query(
            "SELECT owner FROM ops UNION SELECT owner FROM chunks WHERE state = 'staged' "
            "UNION SELECT owner FROM documents WHERE state = 'pending'"
        )
        return {str(r[0]) for r in rows if r[0]}

    def start_document(
        self, doc_id: str, *, version: int, source: str, content_key: str, metadata: Mapping[str, Any], owner: str
    ) -> None:
        """Insert a ``pending`` row for a new document (an existing ready row stays visible)."""
        now = time.time()
        with self.transaction() as cur:
            cur.execute(
                "INSERT OR IGNORE INTO documents (doc_id, state, version, source, content_key, metadata, num_chunks, owner, "
                "added_at, updated_at) VALUES (?, 'pending', ?, ?, ?, ?, 0, ?, ?, ?)",
                (doc_id, version, source, content_key, json.dumps(dict(metadata), sort_keys=True), owner, now, now),
            )

    def stage_chunks(self, rows: Iterable[ChunkRow], *, owner: str) -> None:
        with self.transaction() as cur:
            cur.executemany(
                "INSERT OR REPLACE INTO chunks (chunk_id, doc_id, version, idx, sha256, text, metadata, num_tokens, state, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'staged', ?)",
                [
                    (r.chunk_id, r.doc_id, r.version, r.index, r.sha256, r.text, json.dumps(dict(r.metadata)), r.num_tokens, owner)
                    for r in rows
                ],
            )

    def commit_document(
        self,
        doc_id: str,
        *,
        version: int,
        source: str,
        content_key: str,
        metadata: Mapping[str, Any],
        owner: str,
    ) -> tuple[list[str], set[str]]:
        """Make version ``version`` the visible one; return the replaced chunk ids and their shas."""
        now = time.time()
        with self.transaction() as cur:
            old = cur.execute(
                "SELECT chunk_id, sha256 FROM chunks WHERE doc_id = ? AND version != ?", (doc_id, version)
            ).fetchall()
            cur.execute("DELETE FROM chunks WHERE doc_id = ? AND version != ?", (doc_id, version))
            cur.execute(
                "UPDATE chunks SET state = 'ready', owner = NULL WHERE doc_id = ? AND version = ? AND owner = ?",
                (doc_id, version, owner),
            )
            num_chunks = cur.execute("SELECT COUNT(*) FROM chunks WHERE doc_id = ? AND version = ?", (doc_id, version)).fetchone()[0]
            cur.execute(
                "INSERT INTO documents (doc_id, state, version, source, content_key, metadata, num_chunks, owner, added_at, updated_at) "
                "VALUES (?, 'ready', ?, ?, ?, ?, ?, NULL, ?, ?) ON CONFLICT(doc_id) DO UPDATE SET state = 'ready', "
                "version = excluded.version, source = excluded.source, content_key = excluded.content_key, "
                "metadata = excluded.metadata, num_chunks = excluded.num_chunks, owner = NULL, updated_at = excluded.updated_at",
                (doc_id, version, source, content_key, json.dumps(dict(metadata), sort_keys=True), num_chunks, now, now),
            )
        return [r[0] for r in old], {r[1] for r in old}

    def delete_document(self, doc_id: str) -> tuple[list[str], set[str]]:
        """Remove a document and all its chunks; return the chunk ids and their shas."""
        with self.transaction() as cur:
            rows = cur.execute("SELECT chunk_id, sha256 FROM chunks WHERE doc_id = ?", (doc_id,)).fetchall()
            cur.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            cur.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return [r[0] for r in rows], {r[1] for r in rows}

    def rollback_owner(self, owner: str) -> tuple[list[str], set[str]]:
        """Undo an owner's uncommitted work: staged chunks, pending documents, journal rows."""
        with self.transaction() as cur:
            rows = cur.execute("SELECT chunk_id, sha256 FROM chunks WHERE owner = ? AND state = 'staged'", (owner,)).fetchall()
            cur.execute("DELETE FROM chunks WHERE owner = ? AND state = 'staged'", (owner,))
            cur.execute("DELETE FROM documents WHERE owner = ? AND state = 'pending'", (owner,))
            cur.execute("DELETE FROM ops WHERE owner = ?", (owner,))
        return [r[0] for r in rows], {r[1] for r in rows}

    def unreferenced(self, shas: Iterable[str]) -> list[str]:
        """Those of ``shas`` that no chunk row (ready or staged) refers to any more."""
        candidates = list(dict.fromkeys(shas))
        if not candidates:
            return []
        referenced: set[str] = set()
        for start in range(0, len(candidates), 500):
            part = candidates[start : start + 500]
            marks = ",".join("?" * len(part))
            referenced |= {r[0] for r in self._query(f"SELECT DISTINCT sha256 FROM chunks WHERE sha256 IN ({marks})", part)}
        return [s for s in candidates if s not in referenced]


def _document_row(r: Sequence[Any]) -> DocumentRow:
    return DocumentRow(
        doc_id=r[0], state=r[1], version=int(r[2]), source=r[3], content_key=r[4], metadata=json.loads(r[5]),
        num_chunks=int(r[6]), owner=r[7], added_at=float(r[8]), updated_at=float(r[9]),
    )


def _chunk_row(r: Sequence[Any]) -> ChunkRow:
    return ChunkRow(
        chunk_id=r[0], doc_id=r[1], version=int(r[2]), index=int(r[3]), sha256=r[4], text=r[5],
        metadata=json.loads(r[6]), num_tokens=int(r[7]), state=r[8],
    )
