"""LangChain's standard unit suite (``ChatModelUnitTests``) on ChatD2L over a tiny random engine."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from d2l_integrations.langchain import ChatD2L
from tests.tiny_models import tiny_engine

_ENGINE = tiny_engine()


class TestChatD2LStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatD2L]:
        return ChatD2L

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": _ENGINE}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"D2L_MODEL": "HuggingFaceTB/SmolLM2-360M-Instruct"}, {}, {"model_name": "HuggingFaceTB/SmolLM2-360M-Instruct"}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the small base models D2L targets have no tool-calling format

    @property
    def has_structured_output(self) -> bool:
        return False  # needs tool calling or JSON mode; neither is implemented
