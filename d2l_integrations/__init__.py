"""d2l_integrations: Doc-to-LoRA parametric document memory for LangChain and LlamaIndex.

    from d2l_integrations import D2LEngine, KnowledgeBase, Router
    engine = D2LEngine.default()                     # offline, embedded SmolLM2-135M-Instruct
    engine.internalize("The Zorblax Institute was founded in 1873 by Mira Quell.")
    engine.generate([{"role": "user", "content": "Who founded the Zorblax Institute?"}]).text

Framework integrations live in subpackages and are imported explicitly:
``from d2l_integrations.langchain import ChatD2L`` and
``from d2l_integrations.llama_index import D2LQueryEngine``.
Public names load lazily, so ``import d2l_integrations`` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("d2l-integrations")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

_LAZY = {
    "AdapterProvenance": "d2l_integrations.engine.lora",
    "D2LEngine": "d2l_integrations.engine.engine",
    "D2LError": "d2l_integrations.errors",
    "Generation": "d2l_integrations.engine.engine",
    "HypernetworkConfig": "d2l_integrations.engine.config",
    "KnowledgeBase": "d2l_integrations.knowledge.knowledge_base",
    "LoRAAdapter": "d2l_integrations.engine.lora",
    "RouteDecision": "d2l_integrations.routing.decision",
    "Router": "d2l_integrations.routing.router",
    "RouterConfig": "d2l_integrations.routing.config",
    "compose_adapters": "d2l_integrations.engine.lora",
    "load_base_model": "d2l_integrations.engine.base_model",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:
    from d2l_integrations.engine.base_model import load_base_model as load_base_model
    from d2l_integrations.engine.config import HypernetworkConfig as HypernetworkConfig
    from d2l_integrations.engine.engine import D2LEngine as D2LEngine
    from d2l_integrations.engine.engine import Generation as Generation
    from d2l_integrations.engine.lora import AdapterProvenance as AdapterProvenance
    from d2l_integrations.engine.lora import LoRAAdapter as LoRAAdapter
    from d2l_integrations.engine.lora import compose_adapters as compose_adapters
    from d2l_integrations.errors import D2LError as D2LError
    from d2l_integrations.knowledge.knowledge_base import KnowledgeBase as KnowledgeBase
    from d2l_integrations.routing.config import RouterConfig as RouterConfig
    from d2l_integrations.routing.decision import RouteDecision as RouteDecision
    from d2l_integrations.routing.router import Router as Router


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        msg = f"module 'd2l_integrations' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
