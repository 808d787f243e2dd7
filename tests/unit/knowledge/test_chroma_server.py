"""Server mode: a real ``chroma run`` on loopback, used through ``HttpClient``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from d2l_integrations.knowledge import ChromaStore
from tests.unit.knowledge.conftest import worker_env
from tests.unit.knowledge.files import FACT

pytestmark = [pytest.mark.server, pytest.mark.enable_socket, pytest.mark.allow_hosts(["127.0.0.1"]),
              pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[str]:
    chroma = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
    if chroma is None:
        pytest.skip("the `chroma` CLI is not installed (it comes with chromadb)")
    port = _free_port()
    proc = subprocess.Popen(
        [chroma, "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=worker_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"chroma server did not start: {err[-2000:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_knowledge_base_on_a_chroma_server(make_kb, chroma_server: str, tmp_path: Path) -> None:  # noqa: ANN001
    kb = make_kb(path=tmp_path / "kb", chroma_url=chroma_server, collection="d2l-server-test")
    kb.add(FACT, doc_id="fact", metadata={"kind": "history"})
    kb.add("Otters hold hands while they sleep.", doc_id="otters", metadata={"kind": "nature"})
    assert not (tmp_path / "kb" / "chroma").exists()  # nothing embedded: the server holds the vectors
    hits = kb.search("Who founded the Zorblax Institute?", k=2)
    assert hits[0].doc_id == "fact" and hits[0].score > hits[1].score
    assert [h.doc_id for h in kb.search("sleep", k=2, where={"kind": "nature"})] == ["otters"]
    kb.adapters_for(hits[:1])
    kb.delete("fact")
    assert [h.doc_id for h in kb.search("Who founded the Zorblax Institute?", k=5)] == ["otters"]
    kb.close()

    # the collection reopens on the server without passing the embedding function (it is registered)
    store = ChromaStore(url=chroma_server, collection="d2l-server-test")
    import chromadb

    host, port = chroma_server.removeprefix("http://").split(":")
    raw = chromadb.HttpClient(host=host, port=int(port)).get_collection("d2l-server-test")
    assert raw.query(query_texts=["otters"], n_results=1)["ids"][0][0].startswith("otters@")
    assert store.count() == 1
    store.close()
    reopened = make_kb(path=tmp_path / "kb", chroma_url=chroma_server, collection="d2l-server-test")
    assert [d.doc_id for d in reopened.list()] == ["otters"]


def test_unreachable_server_is_a_clear_error(make_kb, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ConnectionError, match="Cannot reach the Chroma server.*chroma run"):
        make_kb(path=tmp_path / "kb", chroma_url=f"http://127.0.0.1:{_free_port()}")
