"""Fixtures of the routing tests: a real D2LEngine over a tiny random Llama (tests/tiny_models.py)."""

from __future__ import annotations

import pytest

from d2l_integrations.engine.engine import D2LEngine
from tests.tiny_models import tiny_engine


@pytest.fixture(scope="session")
def engine() -> D2LEngine:
    return tiny_engine()
