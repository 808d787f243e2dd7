"""The engine must import without LangChain, LlamaIndex, chromadb or unstructured (it runs on the GPU box)."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("langchain", "langchain_core", "llama_index", "chromadb", "unstructured")

SCRIPT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked in the engine: ' + name)
        return None
sys.meta_path.insert(0, Block())
import d2l_integrations.engine.engine, d2l_integrations.engine.lora, d2l_integrations.engine.apply
import d2l_integrations.engine.base_model, d2l_integrations.engine.config
import d2l_integrations.engine.hypernetwork, d2l_integrations.engine.checkpoint
import d2l_integrations.engine.distill, d2l_integrations.engine.training
print('ok')
"""


def test_engine_imports_without_framework_packages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
