"""Content-addressed chunk adapters on disk: one ``LoRAAdapter`` folder per (chunk text, internalizer).

Layout::

    <root>/<internalizer key>/<sha256 of the chunk text>/adapter.safetensors
                                                        /adapter_config.json

The internalizer key is derived from the hypernetwork checkpoint id (or, for checkpoint-free
methods such as distillation, from the method name and a hash of its settings), so changing the
checkpoint or the settings makes every old adapter a miss: they are never reused by mistake.
Identical chunks in different documents share one adapter; re-adding an unchanged chunk finds it
and skips internalization.

Writes are atomic and race-free between processes: an adapter is saved under a temporary name
that contains the writer's owner id, then renamed onto its final name; if another process got
there first, the rename fails and the copy is dropped (both hold the same content).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from d2l_integrations.engine.lora import ADAPTER_CONFIG_NAME, LoRAAdapter
from d2l_integrations.errors import AdapterNotFoundError

logger = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
_TEMP_OWNER = re.compile(r"\.tmp-([0-9a-f]+)-")


def internalizer_key(checkpoint_id: str) -> str:
    """A folder-safe, collision-free key for an internalizer identity string."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint_id).strip("._")[:48] or "internalizer"
    return f"{readable}-{hashlib.sha256(checkpoint_id.encode()).hexdigest()[:12]}"


class AdapterStore:
    """Adapters of one internalizer, keyed by chunk sha256.

    Args:
        root: folder holding one sub-folder per internalizer key.
        checkpoint_id: identity of the internalizer (checkpoint id, or method + settings hash).

    Example:
        >>> store = AdapterStore("kb/adapters", checkpoint_id="d2l-smollm2-v1")
        >>> if not store.has(chunk.sha256):
        ...     store.save(chunk.sha256, adapter, owner="0f3a...")
        >>> adapter = store.load(chunk.sha256)
    """

    def __init__(self, root: str | os.PathLike[str], *, checkpoint_id: str) -> None:
        self.root = Path(root)
        self.checkpoint_id = checkpoint_id
        self.key = internalizer_key(checkpoint_id)
        self.folder = self.root / self.key

    def adapter_id(self, sha256: str) -> str:
        """The adapter handle stored with search results: ``<internalizer key>/<sha256>``."""
        return f"{self.key}/{sha256}"

    def path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            msg = f"Not a sha256 hex digest: {sha256!r}."
            raise ValueError(msg)
        return self.folder / sha256

    def has(self, sha256: str) -> bool:
        return (self.path(sha256) / ADAPTER_CONFIG_NAME).is_file()

    def missing(self, shas: Iterable[str]) -> list[str]:
        """The shas (deduplicated, in first-seen order) that have no adapter yet."""
        return [s for s in dict.fromkeys(shas) if not self.has(s)]

    def save(self, sha256: str, adapter: LoRAAdapter, *, owner: str) -> Path:
        """Store ``adapter`` for chunk ``sha256`` atomically; keep an existing one if present."""
        final = self.path(sha256)
        if self.has(sha256):
            return final
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".tmp-{owner}-{sha256}"
        adapter.save(staging)
        try:
            os.rename(staging, final)
        except OSError:  # another process stored the same content first (ENOTEMPTY/EEXIST)
            shutil.rmtree(staging, ignore_errors=True)
            if not self.has(sha256):
                raise
        return final

    def load(self, sha256: str) -> LoRAAdapter:
        """The adapter of chunk ``sha256``; raises :class:`AdapterNotFoundError` when absent."""
        if not self.has(sha256):
            msg = (
                f"No adapter for chunk {sha256[:12]}... under internalizer {self.checkpoint_id!r} in {str(self.folder)!r}. "
                "Internalize it (KnowledgeBase.adapters_for does so when lazy=True) or re-add its document."
            )
            raise AdapterNotFoundError(msg)
        return LoRAAdapter.load(self.path(sha256))

    def delete(self, sha256: str) -> bool:
        """Remove one adapter; return whether it existed."""
        path = self.path(sha256)
        if not path.exists():
            return False
        trash = path.with_name(f".del-{sha256}-{os.getpid()}")
        os.replace(path, trash)  # atomic: readers never see a half-deleted folder
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def shas(self) -> set[str]:
        """All chunk shas that have an adapter under this internalizer."""
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.iterdir() if _SHA.match(p.name)}

    def temp_entries(self) -> Iterator[tuple[Path, str | None]]:
        """Leftover temporary folders (``.tmp-<owner>-...``, ``.del-...``) with their owner id."""
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if p.name.startswith("."):
                match = _TEMP_OWNER.search(p.name)
                yield p, match.group(1) if match else None

    def other_keys(self) -> list[Path]:
        """Folders of other internalizers (stale after a checkpoint change)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and p.name != self.key]
