"""d2l_integrations: Doc-to-LoRA parametric document memory for LangChain and LlamaIndex."""
