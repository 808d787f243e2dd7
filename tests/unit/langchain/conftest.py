"""Fixtures: a real D2LEngine over a tiny random Llama, shared with tests/unit/routing/tiny_engine.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from d2l_integrations.engine.engine import D2LEngine

_TINY = Path(__file__).parents[1] / "routing" / "tiny_engine.py"
if "tiny_engine" not in sys.modules:  # load the shared helper by path (test folders are not packages)
    _spec = importlib.util.spec_from_file_location("tiny_engine", _TINY)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["tiny_engine"] = _module
    _spec.loader.exec_module(_module)

from tiny_engine import ToyHypernetwork, tiny_engine, toy_adapter  # noqa: E402

__all__ = ["ToyHypernetwork", "tiny_engine", "toy_adapter"]


@pytest.fixture(scope="session")
def engine() -> D2LEngine:
    return tiny_engine()
