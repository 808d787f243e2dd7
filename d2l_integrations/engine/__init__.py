"""Framework-free D2L engine: plain torch + transformers + peft + safetensors.

Never imports LangChain, LlamaIndex, chromadb or unstructured (a test enforces it).
"""
