"""Content-addressed adapter store: exact round trip, checkpoint keys, atomic first-writer-wins saves."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import AdapterNotFoundError
from d2l_integrations.knowledge.adapter_store import AdapterStore, internalizer_key


def _adapter(engine: D2LEngine, text: str):  # noqa: ANN202
    return engine.internalize_chunks([text])[0]


def test_round_trip_is_exact(tmp_path: Path, engine: D2LEngine) -> None:
    store = AdapterStore(tmp_path, checkpoint_id="ckpt/v1")
    text = "The Zorblax Institute was founded in 1873."
    sha = hashlib.sha256(text.encode()).hexdigest()
    adapter = _adapter(engine, text)
    assert not store.has(sha) and store.missing([sha, sha]) == [sha]
    store.save(sha, adapter, owner="abc123")
    loaded = store.load(sha)
    assert loaded.provenance == adapter.provenance
    for name in adapter.module_names:
        assert torch.equal(loaded.delta_weight(name), adapter.delta_weight(name))
    assert store.shas() == {sha} and store.adapter_id(sha) == f"{store.key}/{sha}"
    assert store.delete(sha) and not store.has(sha) and not store.delete(sha)
    with pytest.raises(AdapterNotFoundError, match="No adapter for chunk"):
        store.load(sha)


def test_checkpoint_id_partitions_the_store(tmp_path: Path, engine: D2LEngine) -> None:
    sha = "a" * 64
    v1 = AdapterStore(tmp_path, checkpoint_id="ckpt/v1")
    v2 = AdapterStore(tmp_path, checkpoint_id="ckpt/v2")
    v1.save(sha, _adapter(engine, "x"), owner="o1")
    assert v1.has(sha) and not v2.has(sha)
    assert v1.key != v2.key and "/" not in v1.key and internalizer_key("ckpt/v1") == v1.key
    assert v2.other_keys() == [v1.folder]


def test_second_writer_keeps_the_first_copy(tmp_path: Path, engine: D2LEngine) -> None:
    store = AdapterStore(tmp_path, checkpoint_id="c")
    sha = "b" * 64
    first, second = _adapter(engine, "first"), _adapter(engine, "second")
    store.save(sha, first, owner="o1")
    store.save(sha, second, owner="o2")  # same key: the stored copy wins, nothing is half-replaced
    assert store.load(sha).provenance == first.provenance
    assert not list(store.temp_entries())
    with pytest.raises(ValueError, match="Not a sha256"):
        store.path("../escape")
