"""Fixtures of the routing tests: a real D2LEngine over a tiny random Llama (see tiny_engine.py)."""

from __future__ import annotations

import pytest
from tiny_engine import tiny_engine

from d2l_integrations.engine.engine import D2LEngine


@pytest.fixture(scope="session")
def engine() -> D2LEngine:
    return tiny_engine()
