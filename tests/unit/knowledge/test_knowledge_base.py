"""KnowledgeBase in one process: add/search/delete/update, dedupe, adapters, lazy mode, manifest, errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.lora import compose_adapters
from d2l_integrations.errors import (
    AdapterNotFoundError,
    ConfigError,
    CorruptDocumentError,
    DocumentNotFoundError,
    KnowledgeBaseMismatchError,
)
from d2l_integrations.knowledge import KnowledgeBase, RetrievedChunk
from tests.tiny_models import tiny_engine
from tests.unit.knowledge.files import FACT, WRITERS
from tests.unit.knowledge.kb_worker import fact


def _consistent(kb: KnowledgeBase) -> None:
    """Chroma holds exactly the committed chunks; every chunk has its adapter unless lazy; no orphans."""
    catalog = kb._catalog
    with kb._chroma_read() as chroma:
        assert chroma.ids() == catalog.ready_chunk_ids() == catalog.all_chunk_ids()
    shas = catalog.referenced_shas()
    if not kb.lazy:
        assert kb.adapter_store.shas() == shas
    else:
        assert kb.adapter_store.shas() <= shas
    assert not list(kb.adapter_store.temp_entries())


def test_add_search_adapters_delete(make_kb, engine: D2LEngine, tmp_path: Path) -> None:  # noqa: ANN001
    kb = make_kb()
    files = [WRITERS[s](tmp_path / f"doc{s}") for s in (".md", ".pdf")]
    ids = kb.add(files, metadata={"team": "ops"})
    assert ids == [str(f.resolve()) for f in files]
    text_id = kb.add("Paris is the capital of France. The Seine flows through it.", doc_id="paris")[0]
    assert [d.doc_id for d in kb.list()] == [*ids, "paris"]
    assert kb.get("paris").num_chunks == 1 and "paris" in kb and len(kb) == 3

    hits = kb.search("What is the capital of France?", k=2)
    assert isinstance(hits[0], RetrievedChunk)
    assert hits[0].doc_id == text_id and 0.3 < hits[0].score <= 1.0 and hits[0].score >= hits[1].score
    assert hits[0].adapter_id and hits[0].adapter_id.endswith(hits[0].metadata["sha256"])

    filtered = kb.search("capital of France", k=5, where={"team": "ops"})
    assert filtered and all(h.metadata["team"] == "ops" for h in filtered)
    pdf_only = kb.search("Zorblax", k=5, where={"$and": [{"filetype": "pdf"}, {"page": 2}]})
    assert pdf_only and all(h.metadata["page"] == 2 for h in pdf_only)

    adapter = kb.adapters_for(hits)  # the deltas of both chunks summed, bias once
    parts = [kb.adapter_store.load(h.metadata["sha256"]) for h in hits]
    expected = compose_adapters(parts)
    for name in expected.module_names:
        assert torch.equal(adapter.delta_weight(name), expected.delta_weight(name))
    assert adapter.rank == 2 * parts[0].rank
    assert kb.adapters_for([hits[0], hits[0].chunk_id]).rank == parts[0].rank  # duplicates count once
    _consistent(kb)

    kb.delete("paris")  # delete-then-search
    assert "paris" not in kb
    assert all(h.doc_id != "paris" for h in kb.search("What is the capital of France?", k=10))
    assert hits[0].metadata["sha256"] not in kb.adapter_store.shas()
    with pytest.raises(DocumentNotFoundError, match="not in the knowledge base"):
        kb.adapters_for(hits[:1])
    with pytest.raises(DocumentNotFoundError, match="No document 'paris'.*Known ids"):
        kb.delete("paris")
    _consistent(kb)


def test_readd_unchanged_and_duplicates_do_not_reinternalize(make_kb, engine: D2LEngine) -> None:  # noqa: ANN001
    kb = make_kb()
    text = "\n\n".join(fact("dup", i) for i in range(6))
    kb.add(text, doc_id="a")
    calls = len(engine.hypernetwork.calls)
    assert kb.add(text, doc_id="a") == ["a"]
    assert kb.last_add_stats.skipped == 1 and len(engine.hypernetwork.calls) == calls
    kb.add(text, doc_id="b")  # same content, another id: adapters are shared
    assert len(engine.hypernetwork.calls) == calls and kb.last_add_stats.internalized == 0
    kb.delete("a")  # b still uses the shared adapters
    assert kb.adapters_for(kb.chunks("b")).num_chunks == kb.get("b").num_chunks
    _consistent(kb)


def test_changed_file_replaces_old_version(make_kb, engine: D2LEngine, tmp_path: Path) -> None:  # noqa: ANN001
    kb = make_kb()
    path = tmp_path / "notes.txt"
    keep = "\n\n".join(fact("keep", i) for i in range(4))
    path.write_text(keep + "\n\nThe password of the vault is swordfish.")
    doc = kb.add(path)[0]
    old_chunks = {c.chunk_id for c in kb.chunks(doc)}
    calls = len(engine.hypernetwork.calls)
    path.write_text(keep + "\n\nThe password of the vault is marlin.")
    assert kb.add(path) == [doc]
    new_chunks = kb.chunks(doc)
    assert not old_chunks & {c.chunk_id for c in new_chunks}
    assert len(engine.hypernetwork.calls) - calls < len(new_chunks)  # unchanged chunks kept their adapters
    texts = " ".join(h.text for h in kb.search("vault password", k=10))
    assert "marlin" in texts and "swordfish" not in texts
    kb.update(doc, "Replaced entirely by a short note about otters.")
    assert [c.text for c in kb.chunks(doc)] == ["Replaced entirely by a short note about otters."]
    with pytest.raises(DocumentNotFoundError):
        kb.update("missing", "x")
    _consistent(kb)


def test_bad_input_keeps_the_store(make_kb, tmp_path: Path) -> None:  # noqa: ANN001
    kb = make_kb()
    kb.add(FACT, doc_id="fact")
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(CorruptDocumentError, match="binary.txt"):
        kb.add([Path(WRITERS[".txt"](tmp_path / "ok.txt")), bad])
    assert {d.doc_id for d in kb.list()} == {"fact", str((tmp_path / "ok.txt").resolve())}
    assert kb.add([bad, "otters hold hands"], on_error="skip", doc_id=["x", "otters"]) == ["otters"]
    assert kb.search("Who holds hands?", k=1)[0].doc_id == "otters"
    with pytest.raises(ConfigError, match="reserved"):
        kb.add("x y z", metadata={"doc_id": "evil"})
    with pytest.raises(ConfigError, match="must be str, int, float or bool"):
        kb.add("x y z", metadata={"tags": ["a"]})
    _consistent(kb)


def test_lazy_internalizes_on_first_use(make_kb, engine: D2LEngine) -> None:  # noqa: ANN001
    kb = make_kb(lazy=True)
    calls = len(engine.hypernetwork.calls)
    kb.add("\n\n".join(fact("lazy", i) for i in range(5)), doc_id="lazy")
    assert len(engine.hypernetwork.calls) == calls and not kb.adapter_store.shas()
    hits = kb.search("Who keeps sector lazy3?", k=1)
    adapter = kb.adapters_for(hits)
    assert len(engine.hypernetwork.calls) == calls + 1 and kb.adapter_store.shas() == {hits[0].metadata["sha256"]}
    assert adapter.provenance.checkpoint_id == "seeded-test-v1"
    kb.adapters_for(hits)
    assert len(engine.hypernetwork.calls) == calls + 1  # stored, not recomputed
    _consistent(kb)


def test_manifest_refuses_another_engine(make_kb, tmp_path: Path, tiny_base) -> None:  # noqa: ANN001
    kb = make_kb()
    kb.add(FACT, doc_id="fact")
    old_key = kb.adapter_store.key
    kb.close()
    other = tiny_engine(base=tiny_base, checkpoint_id="seeded-test-v2")
    with pytest.raises(KnowledgeBaseMismatchError, match="seeded-test-v1.*seeded-test-v2.*reinternalize=True"):
        make_kb(eng=other)
    renamed = tiny_engine(base=tiny_base, base_name="another-base")
    with pytest.raises(KnowledgeBaseMismatchError, match="'tiny-random-llama'.*'another-base'"):
        make_kb(eng=renamed)
    kb2 = make_kb(eng=other, reinternalize=True)  # keeps text + embeddings, rebuilds adapters
    assert kb2.adapter_store.key != old_key
    assert kb2.search("Who founded Zorblax?", k=1)[0].doc_id == "fact"
    assert not (tmp_path / "kb" / "adapters" / old_key).exists()
    _consistent(kb2)
    kb2.close()
    read_only = make_kb(eng=None)  # no engine: search works, adapters need one
    assert read_only.search("Zorblax founder", k=1)[0].doc_id == "fact"
    with pytest.raises(ConfigError, match="without an engine"):
        read_only.add("x")
    with pytest.raises(ConfigError, match="collection"):
        make_kb(eng=None, collection="other-collection")


def test_missing_adapter_without_engine_is_a_clear_error(make_kb) -> None:  # noqa: ANN001
    kb = make_kb(lazy=True)
    kb.add(FACT, doc_id="fact")
    kb.close()
    ro = make_kb(eng=None, lazy=True)
    with pytest.raises(AdapterNotFoundError, match="no adapter yet.*engine"):
        ro.adapters_for(ro.chunks("fact"))


def test_no_network_is_needed(make_kb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    """Sockets are disabled (pytest-socket) and every attempt is recorded: ingest all formats, search, internalize."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "__new__", lambda cls, *a, **k: refuse(*a))  # any new socket
    kb = make_kb(path=tmp_path / "offline")
    ids = kb.add([WRITERS[s](tmp_path / f"f{s}") for s in sorted(WRITERS)])
    assert len(ids) == 5
    hits = kb.search("Who founded the Zorblax Institute?", k=2)
    assert hits[0].score > 0.4
    kb.adapters_for(hits)
    assert attempts == []


def test_chroma_is_reconciled_with_the_catalog(make_kb) -> None:  # noqa: ANN001
    kb = make_kb()
    assert kb.add((t for t in ["Otters hold hands.", "Cats sit on mats."]), doc_id=["otters", "cats"]) == ["otters", "cats"]
    otter_chunk = kb.chunks("otters")[0].chunk_id
    with kb._lock.exclusive(), kb._chroma_write() as chroma:
        chroma.delete([otter_chunk])  # an embedding lost ...
        chroma.upsert(["ghost@0#0"], ["Otters ghost text"], [{"doc_id": "ghost"}])  # ... and one without a chunk
    report = kb.repair()
    assert report["removed_embeddings"] == 1 and report["added_embeddings"] == 1
    assert kb.search("Who holds hands?", k=1)[0].chunk_id == otter_chunk
    _consistent(kb)
    with kb._lock.exclusive(), kb._chroma_write() as chroma:
        chroma.delete([otter_chunk])
    kb.close()
    reopened = make_kb()  # opening notices the count mismatch and repairs
    assert reopened.search("Who holds hands?", k=1)[0].chunk_id == otter_chunk
    _consistent(reopened)
