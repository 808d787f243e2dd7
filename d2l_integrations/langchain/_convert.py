"""Translations between LangChain values and the engine's plain ones (shared by the LangChain modules)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from d2l_integrations.engine.engine import validate_messages
from d2l_integrations.errors import InvalidMessagesError, UnsupportedContentError

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_BLOCKS = ("text", "text-plain")


def to_engine_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> ``[{"role", "content"}]`` for the engine.

    Raises:
        InvalidMessagesError: empty list, only system messages, tool messages, unknown roles.
        UnsupportedContentError: image, audio, file or other non-text content blocks.
    """
    if not messages:
        msg = "ChatD2L got an empty message list. Pass at least one HumanMessage (or a string)."
        raise InvalidMessagesError(msg)
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if isinstance(message, ToolMessage) or getattr(message, "type", "") in ("tool", "function"):
            msg = (
                f"Message {i} is a {type(message).__name__}: ChatD2L does not support tool calling, so it cannot read "
                "tool results. Put the tool's output into a HumanMessage instead."
            )
            raise InvalidMessagesError(msg)
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ChatMessage):
            role = _ROLES.get(message.role.lower(), "")
            if not role:
                msg = f"Message {i} has role {message.role!r}. ChatD2L understands {sorted(set(_ROLES))}."
                raise InvalidMessagesError(msg)
        else:
            msg = f"Message {i} is a {type(message).__name__}, which ChatD2L does not support. Use System/Human/AI messages."
            raise InvalidMessagesError(msg)
        out.append({"role": role, "content": content_text(message.content, index=i)})
    validate_messages(out)
    return out


def content_text(content: str | list[Any], *, index: int = 0) -> str:
    """The text of a message's content; non-text blocks raise ``UnsupportedContentError``."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = block.get("type") if isinstance(block, Mapping) else type(block).__name__
        if kind in _TEXT_BLOCKS and isinstance(block, Mapping):
            parts.append(str(block.get("text", "")))
            continue
        msg = (
            f"Message {index} has a {kind!r} content block. The D2L base model reads text only; "
            "remove images, audio and files, or describe them in text."
        )
        raise UnsupportedContentError(msg)
    return "".join(parts)


def document_text(document: str | Document) -> tuple[str, str | None, dict[str, Any]]:
    """``(text, id, metadata)`` of a str or a LangChain ``Document``."""
    if isinstance(document, Document):
        return document.page_content, document.id, dict(document.metadata)
    return document, None, {}
