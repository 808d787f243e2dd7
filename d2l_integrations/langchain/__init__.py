"""LangChain integration: ``ChatD2L`` (alias ``D2LChatModel``), ``D2LRetriever`` and the memory tools.

    from d2l_integrations.langchain import ChatD2L
"""

from d2l_integrations.langchain.chat_models import ChatD2L, D2LChatModel
from d2l_integrations.langchain.retrievers import D2LRetriever
from d2l_integrations.langchain.tools import memory_tools

__all__ = ["ChatD2L", "D2LChatModel", "D2LRetriever", "memory_tools"]
