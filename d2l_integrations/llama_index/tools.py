"""Agent memory tools for LlamaIndex: ``remember``, ``recall``, ``forget``, ``reset`` as ``FunctionTool``\\ s.

    from d2l_integrations.llama_index.tools import memory_tools
    tools = memory_tools(D2LMemory(KnowledgeBase("agent_memory", engine)))

Same verbs and JSON results as the LangChain tools (``d2l_integrations.langchain.tools``).
"""

from __future__ import annotations

import json

from llama_index.core.tools import FunctionTool

from d2l_integrations.memory import D2LMemory, namespace_key


def memory_tools(memory: D2LMemory) -> list[FunctionTool]:
    """The four memory tools over ``memory``."""

    def remember(text: str, namespace: str = "default", id: str | None = None) -> str:  # noqa: A002
        """Store a fact (one self-contained sentence) in long-term memory under a slash-separated namespace."""
        item = memory.remember(text, namespace, id=id)
        return json.dumps({"id": item.id, "namespace": namespace_key(item.namespace)})

    def recall(query: str, namespace: str | None = None) -> str:
        """Answer a question from long-term memory (optionally only memories under a namespace)."""
        result = memory.recall(query, namespace)
        return json.dumps({"answer": result.answer, "route": result.decision.route.value,
                           "memory_ids": [m.id for m in result.memories]})

    def forget(id: str | None = None, namespace: str | None = None) -> str:  # noqa: A002
        """Permanently forget one memory by id, or every memory under a namespace."""
        return json.dumps({"forgotten": memory.forget(id, namespace=namespace)})

    def reset() -> str:
        """Forget every memory."""
        return json.dumps({"forgotten": memory.reset()})

    return [FunctionTool.from_defaults(fn=f) for f in (remember, recall, forget, reset)]


__all__ = ["memory_tools"]
