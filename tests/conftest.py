"""Shared fixtures: a tiny random llama with a real (tiny, trained-on-the-fly) tokenizer.

Unit tests run on CPU with sockets disabled (pyproject addopts). The real default model is
used only by tests marked ``slow``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.tiny_models import make_tiny_base


@pytest.fixture(scope="session")
def tiny_base():
    """A BaseModel wrapping a 2-layer random llama (fp32) and a tiny BPE tokenizer with a chat template."""
    torch.manual_seed(0)
    return make_tiny_base()


@pytest.fixture(scope="session")
def default_base():
    """The real embedded default (SmolLM2-135M-Instruct) on CPU; for tests marked slow."""
    from d2l_integrations.engine.base_model import load_base_model

    return load_base_model("default", device="cpu")
