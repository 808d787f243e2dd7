"""Fakes for harness tests: the tiny seeded engine (tests/tiny_models.py) and a bag-of-words embedder (no MiniLM)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
import torch

from tests import tiny_models


def bag_of_words(texts):
    """Hashed bag-of-words unit vectors: enough for retrieval to prefer chunks sharing words."""
    out = []
    for t in texts:
        v = np.zeros(64, dtype=np.float32)
        for w in re.findall(r"\w+", t.lower()):
            v[int(hashlib.md5(w.encode()).hexdigest()[:6], 16) % 64] += 1.0
        out.append(v / max(np.linalg.norm(v), 1e-9))
    return out


@pytest.fixture()
def tiny_engine(tiny_base):
    return tiny_models.tiny_engine(base=tiny_base)


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    """A miniature D2L_DATA_DIR with every file the suites read."""
    import json

    def write(rel, rows):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    squad = [{"id": f"s{i}", "context": f"Paris is the capital of France. It has {i} bridges.", "question": "What is the capital of France?",
              "answers": ["Paris"], "source": "squad"} for i in range(3)]
    write("squad/squad_v1.1_dev_open.jsonl", squad)
    write("squad/squad_v2.0_dev_open.jsonl", squad + [{"id": "imp", "context": squad[0]["context"], "question": "Who is king?", "answers": [], "is_impossible": True}])
    write("ropes_contrast/original.jsonl", [{"id": "r1", "context": "Heat melts ice.\nPot A is hot, pot B is cold.", "question": "Which pot melts ice?", "answers": ["Pot A"]}])
    for b in ("32_128", "128_256"):
        write(f"magic_number_niah/test_{b}.jsonl", [{"id": f"mn-{b}-{i}", "context": f"The sky is blue.\nThe special magic number is {1000 + i}.",
                                                       "question": "What is the special magic number? Reply with only the number.", "answers": [str(1000 + i)],
                                                       "token_bin": b} for i in range(2)])
    essay = " ".join(f"Sentence number {i} talks about startups and essays." for i in range(400))
    write("needle_haystack/paul_graham_essays.jsonl", [{"id": f"pg-{i:02d}", "title": str(i), "text": essay} for i in range(12)])
    monkeypatch.setenv("D2L_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are microseconds; on a loaded 2-core box a second thread only adds spin-waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
