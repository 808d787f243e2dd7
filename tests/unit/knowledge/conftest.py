"""Fixtures of the knowledge-store tests: the tiny seeded engine (tests/tiny_models.py), a shared embedding model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.knowledge import KnowledgeBase, MiniLMEmbeddingFunction
from tests.tiny_models import tiny_engine

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def engine(tiny_base) -> D2LEngine:  # noqa: ANN001
    return tiny_engine(base=tiny_base)


@pytest.fixture(scope="session")
def embedding_function() -> MiniLMEmbeddingFunction:
    """One embedding model for the session (loading it costs ~1 s)."""
    return MiniLMEmbeddingFunction()


@pytest.fixture
def make_kb(tmp_path: Path, engine: D2LEngine, embedding_function: MiniLMEmbeddingFunction) -> Iterator[Callable[..., KnowledgeBase]]:
    opened: list[KnowledgeBase] = []

    def factory(path: Path | None = None, eng: object = "default", **kwargs: object) -> KnowledgeBase:
        kwargs.setdefault("chunk_tokens", 64)
        kwargs.setdefault("overlap_tokens", 8)
        kb = KnowledgeBase(
            path or tmp_path / "kb", engine if eng == "default" else eng, embedding_function=embedding_function, **kwargs
        )
        opened.append(kb)
        return kb

    yield factory
    for kb in opened:
        kb.close()


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1",
        ANONYMIZED_TELEMETRY="False", UNSTRUCTURED_DISABLE_NOTICE="1", TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


def run_worker(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``tests/unit/knowledge/kb_worker.py`` in a fresh interpreter and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "tests.unit.knowledge.kb_worker", *args],
        cwd=REPO_ROOT, env=worker_env(**env), capture_output=True, text=True, timeout=timeout, check=False,
    )


def start_worker(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.unit.knowledge.kb_worker", *args],
        cwd=REPO_ROOT, env=worker_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
