"""LlamaIndex integration: ``D2LQueryEngine``, ``D2LLLM``, ``D2LEmbedding`` and the memory tools.

    from d2l_integrations.llama_index import D2LQueryEngine
"""

from d2l_integrations.llama_index.embeddings import D2LEmbedding
from d2l_integrations.llama_index.llms import D2LLLM
from d2l_integrations.llama_index.query_engine import D2LQueryEngine
from d2l_integrations.llama_index.tools import memory_tools

__all__ = ["D2LLLM", "D2LEmbedding", "D2LQueryEngine", "memory_tools"]
