"""Agent memory tools for LangChain: ``remember``, ``recall``, ``forget``, ``reset`` (StructuredTools).

    from d2l_integrations.memory import D2LMemory
    from d2l_integrations.langchain.tools import memory_tools

    tools = memory_tools(D2LMemory(KnowledgeBase("agent_memory", engine)))
    agent_model = some_tool_calling_chat_model.bind_tools(tools)

Namespaces are slash-separated strings in the tool arguments (``"user/alice"``), tuples in
``D2LMemory``. Tool results are JSON strings an agent can read back.
"""

from __future__ import annotations

import json

from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from d2l_integrations.memory import D2LMemory, namespace_key


class RememberInput(BaseModel):
    text: str = Field(description="The fact to remember, as one self-contained sentence.")
    namespace: str = Field(default="default", description="Slash-separated scope, e.g. 'user/alice'.")
    id: str | None = Field(default=None, description="Memory id to create or replace (default: a new id).")


class RecallInput(BaseModel):
    query: str = Field(description="The question to answer from memory.")
    namespace: str | None = Field(default=None, description="Only memories under this scope (default: all).")


class ForgetInput(BaseModel):
    id: str | None = Field(default=None, description="Id of the memory to forget.")
    namespace: str | None = Field(default=None, description="Forget every memory under this scope instead.")


class ResetInput(BaseModel):
    pass


def memory_tools(memory: D2LMemory) -> list[StructuredTool]:
    """The four memory tools over ``memory``: remember, recall, forget, reset."""

    def remember(text: str, namespace: str = "default", id: str | None = None) -> str:  # noqa: A002
        item = memory.remember(text, namespace, id=id)
        return json.dumps({"id": item.id, "namespace": namespace_key(item.namespace)})

    def recall(query: str, namespace: str | None = None) -> str:
        result = memory.recall(query, namespace)
        return json.dumps({
            "answer": result.answer,
            "route": result.decision.route.value,
            "memory_ids": [m.id for m in result.memories],
        })

    def forget(id: str | None = None, namespace: str | None = None) -> str:  # noqa: A002
        return json.dumps({"forgotten": memory.forget(id, namespace=namespace)})

    def reset() -> str:
        return json.dumps({"forgotten": memory.reset()})

    return [
        StructuredTool.from_function(remember, name="remember", args_schema=RememberInput,
                                     description="Store a fact in long-term memory (internalized into the model's adapters)."),
        StructuredTool.from_function(recall, name="recall", args_schema=RecallInput,
                                     description="Answer a question from long-term memory."),
        StructuredTool.from_function(forget, name="forget", args_schema=ForgetInput,
                                     description="Permanently forget one memory by id, or every memory in a namespace."),
        StructuredTool.from_function(reset, name="reset", args_schema=ResetInput,
                                     description="Forget every memory."),
    ]


__all__ = ["memory_tools"]
