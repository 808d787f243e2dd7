"""The knowledge base across processes: a SIGKILL in the middle of add (and persistence of what was
committed before), concurrent adds, and a 50 MB text file streamed in bounded memory."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.unit.knowledge.conftest import run_worker, start_worker
from tests.unit.knowledge.kb_worker import fact
from tests.unit.knowledge.test_knowledge_base import _consistent

pytestmark = pytest.mark.timeout(300)


def test_sigkill_in_the_middle_of_add_leaves_a_consistent_store(make_kb, tmp_path: Path, engine) -> None:  # noqa: ANN001
    store = tmp_path / "kb"
    keep = tmp_path / "keep.txt"
    keep.write_text(fact("keep", 1))
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(fact("big", i) for i in range(60)))
    log = tmp_path / "internalized.log"
    proc = start_worker("add", str(store), str(keep), str(big), "--delay", "0.05", "--batch-size", "4",
                        D2L_TEST_INTERNALIZE_LOG=str(log))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until `big` is half-staged: keep (1) + >= 2 batches of big
            if log.exists() and len(log.read_text().split()) >= 10:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        else:
            pytest.fail("the worker never started internalizing")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (store / "catalog.sqlite").exists()

    kb = make_kb(path=store)  # another process; reopening repairs: the unfinished document is rolled back
    assert [d.doc_id for d in kb.list()] == [str(keep.resolve())]  # what the killed process committed persists
    hit = kb.search("Who is the vault keeper of sector keep1?", k=1)[0]
    assert "KeeperKEEP1" in hit.text
    assert kb.adapters_for([hit]).provenance.source_sha256 == (hit.metadata["sha256"],)
    _consistent(kb)
    assert kb._catalog.count_chunks(state="staged") == 0 and not kb._catalog.owners_with_work()
    assert kb.add(big) == [str(big.resolve())]  # and the document can be added again
    assert "KeeperBIG42" in kb.search("vault keeper of sector big42", k=1)[0].text
    _consistent(kb)


def test_concurrent_adds_from_two_processes(make_kb, tmp_path: Path) -> None:  # noqa: ANN001
    store, barrier = tmp_path / "kb", tmp_path / "barrier"
    barrier.mkdir()
    procs = [start_worker("add-texts", str(store), prefix, "4", "--barrier", str(barrier)) for prefix in ("a", "b")]
    times = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        times.append(json.loads(out.strip().splitlines()[-1])["times"])
    (a_first, a_last), (b_first, b_last) = [(t[0], t[-1]) for t in times]
    assert a_first < b_last and b_first < a_last, "the two workers did not overlap"
    kb = make_kb(path=store)
    assert sorted(d.doc_id for d in kb.list()) == sorted(f"{p}-{i}" for p in "ab" for i in range(4))
    for p in "ab":
        for i in (0, 3):
            assert kb.search(f"Who is the vault keeper of sector {p}{i}?", k=1)[0].doc_id == f"{p}-{i}"
    _consistent(kb)


def test_fifty_megabyte_text_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    """All 50 MB are read, decoded and split into elements; chunking is lazy (the first 300 chunks are taken
    without touching the rest). Peak RSS must grow by far less than the file size."""
    big = tmp_path / "big.txt"
    paragraph = "The vault keeper counts the amber crates of every sector twice a day and writes the totals down. " * 3
    with open(big, "w") as fh:
        i = 0
        while fh.tell() < 50 * 1024 * 1024:
            fh.write(f"Paragraph {i}. {paragraph}\n\n")
            i += 1
    size_mb = big.stat().st_size / 2**20
    result = run_worker("stream", str(big), "--chunks", "300", timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["elements"] == i and report["chunks"] == 300
    grew_mb = (report["rss_after_kb"] - report["rss_before_kb"]) / 1024
    assert grew_mb < 0.4 * size_mb, f"peak RSS grew by {grew_mb:.0f} MB for a {size_mb:.0f} MB file"
    os.remove(big)
