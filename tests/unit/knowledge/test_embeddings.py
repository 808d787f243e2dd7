"""The packaged MiniLM embedding function and the Chroma store in embedded mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d2l_integrations.errors import ConfigError
from d2l_integrations.knowledge import ChromaStore, MiniLMEmbeddingFunction
from d2l_integrations.knowledge.chroma_store import parse_chroma_url
from d2l_integrations.knowledge.embeddings import EMBEDDING_FUNCTION_NAME


def test_vectors_are_unit_norm_and_semantic(embedding_function: MiniLMEmbeddingFunction) -> None:
    a, b, c = (np.asarray(v) for v in embedding_function(["A cat sits on the mat.", "A kitten rests on a rug.",
                                                           "Quarterly tax filing deadlines for companies."]))
    assert a.shape == (384,) and a.dtype == np.float32
    assert np.allclose([np.linalg.norm(v) for v in (a, b, c)], 1.0, atol=1e-5)
    assert a @ b > a @ c + 0.2
    batched = MiniLMEmbeddingFunction(batch_size=1)(["A cat sits on the mat."])[0]
    assert np.allclose(batched, a, atol=1e-5)  # padding in a batch does not change a vector


def test_config_round_trip_and_registration(embedding_function: MiniLMEmbeddingFunction) -> None:
    from chromadb.utils.embedding_functions import known_embedding_functions

    assert known_embedding_functions[EMBEDDING_FUNCTION_NAME] is MiniLMEmbeddingFunction
    rebuilt = MiniLMEmbeddingFunction.build_from_config(embedding_function.get_config())
    assert rebuilt.get_config() == embedding_function.get_config() and rebuilt.default_space() == "cosine"
    with pytest.raises(ConfigError):
        MiniLMEmbeddingFunction(batch_size=0)


def test_embedded_store_reopens_without_passing_the_function(tmp_path: Path, embedding_function) -> None:  # noqa: ANN001
    store = ChromaStore(path=tmp_path / "db", collection="docs", embedding_function=embedding_function)
    store.upsert(["zorblax", "otters"], ["The Zorblax Institute was founded in 1873.", "Otters hold hands."],
                 [{"kind": "history"}, {"kind": "nature"}])
    hits = store.query("When was the Zorblax Institute founded?", k=2)
    assert [h.chunk_id for h in hits] == ["zorblax", "otters"] and -1 <= hits[1].score < hits[0].score <= 1
    assert [h.chunk_id for h in store.query("founded", k=2, where={"kind": "nature"})] == ["otters"]
    assert store.ids() == {"zorblax", "otters"}
    store.close()

    import chromadb

    client = chromadb.PersistentClient(path=str(tmp_path / "db"))
    collection = client.get_collection("docs")  # no embedding_function argument
    assert type(collection.configuration["embedding_function"]) is MiniLMEmbeddingFunction
    # with sockets disabled, chromadb's default (a downloaded ONNX model) would fail here
    assert collection.query(query_texts=["hands"], n_results=1)["ids"] == [["otters"]]


def test_store_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one of path= .* and url="):
        ChromaStore()
    assert parse_chroma_url("http://127.0.0.1:9000") == ("127.0.0.1", 9000, False)
    assert parse_chroma_url("https://chroma.example") == ("chroma.example", 443, True)
    assert parse_chroma_url("localhost") == ("localhost", 8000, False)
    with pytest.raises(ConfigError, match="Invalid Chroma URL"):
        parse_chroma_url("ftp://x")
