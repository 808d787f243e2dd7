"""LangChain's standard integration suite (``ChatModelIntegrationTests``) on the REAL default model, on CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/langchain -m slow

Skipped features are the ones the suite itself marks optional (flags below, each with its reason).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from d2l_integrations.langchain import ChatD2L
from d2l_integrations.routing.engines import shared_engine

pytestmark = pytest.mark.slow


class TestChatD2LIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatD2L]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # One engine for the whole class (loading is ~2 s, generating is the cost); few tokens keep it fast.
        return {"engine": shared_engine("default", device="cpu"), "max_tokens": 12}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return {**super().standard_chat_model_params, "max_tokens": 12}

    @property
    def has_tool_calling(self) -> bool:
        return False  # SmolLM2-135M has no tool-calling format; the suite marks tool calling optional

    @property
    def has_structured_output(self) -> bool:
        return False  # needs tool calling or JSON mode, neither implemented

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True
