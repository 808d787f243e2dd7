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


def _spy_internalize(engine: D2LEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of chunks of every ``engine.internalize_chunks`` call."""
    sizes: list[int] = []
    real = engine.internalize_chunks

    def spy(chunks, **kwargs):  # noqa: ANN001, ANN003, ANN202
        sizes.append(len(chunks))
        return real(chunks, **kwargs)

    monkeypatch.setattr(engine, "internalize_chunks", spy)
    return sizes


def test_several_documents_are_internalized_together(make_kb, engine: D2LEngine, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    sizes = _spy_internalize(engine, monkeypatch)
    kb = make_kb()
    ids = [f"d{i}" for i in range(5)]
    assert kb.add([fact(f"batch{d}", 0) for d in range(5)], doc_id=ids) == ids
    chunks = sum(kb.get(i).num_chunks for i in ids)
    assert sizes == [chunks]  # one call for all five documents, not one per document
    assert kb.last_add_stats.internalized == chunks and kb.last_add_stats.documents == 5
    _consistent(kb)
    sizes.clear()
    small = make_kb(kb.path.parent / "small", batch_size=4)
    added = small.add([fact(f"small{d}", 0) for d in range(5)])
    expected, pending = [], 0  # queued chunks are internalized once batch_size (4) of them wait
    for doc_id in added:
        pending += small.get(doc_id).num_chunks
        if pending >= 4:
            expected, pending = [*expected, pending], 0
    assert sizes == [*expected, pending] if pending else expected
    assert len(sizes) < 5 and sum(sizes) == sum(small.get(i).num_chunks for i in added)
    _consistent(small)


def test_documents_added_before_an_error_keep_their_adapters(make_kb, tmp_path: Path) -> None:  # noqa: ANN001
    kb = make_kb()
    bad = tmp_path / "binary.txt"
    bad.write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(CorruptDocumentError, match="binary.txt"):
        kb.add([fact("before", 0), fact("before", 1), bad, fact("after", 0)], doc_id=["a", "b", "bad", "c"])
    assert {d.doc_id for d in kb.list()} == {"a", "b"}
    _consistent(kb)  # a and b have their adapters; nothing of the bad file or of c is stored
    assert kb.add([bad, fact("after", 0)], doc_id=["bad", "c"], on_error="skip") == ["c"]
    _consistent(kb)


def test_an_interrupted_internalization_keeps_the_finished_adapters(
    make_kb, engine: D2LEngine, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from d2l_integrations.engine.distill import DistillationInterrupted

    kb = make_kb()
    kb.add(fact("kept", 0), doc_id="kept")
    real = engine.internalize_chunks

    def interrupted(chunks, **kwargs):  # noqa: ANN001, ANN003, ANN202 - finishes the first chunk, then Ctrl-C
        first = real(chunks[:1], **{**kwargs, "chunk_ids": kwargs["chunk_ids"][:1]})
        raise DistillationInterrupted(first, len(chunks))

    monkeypatch.setattr(engine, "internalize_chunks", interrupted)
    with pytest.raises(DistillationInterrupted):
        kb.add([fact("x", 0), fact("y", 0), fact("z", 0)], doc_id=["x", "y", "z"])
    monkeypatch.undo()
    finished = kb.adapter_store.shas() - {c.metadata["sha256"] for c in kb.chunks("kept")}
    assert len(finished) == 1  # the one chunk finished before the interrupt was stored
    assert {d.doc_id for d in kb.list()} == {"kept", "x", "y", "z"}  # committed; the rest is made on first use
    for doc_id in ("x", "y", "z"):
        assert kb.adapters_for(kb.chunks(doc_id)).num_chunks == kb.get(doc_id).num_chunks
    _consistent(kb)
