"""A small real internalizer for knowledge-store tests (a test double for the expensive model).

``SeededEngine`` has the engine surface the knowledge base uses (``base``, ``internalizer()``,
``internalize_chunks()``) over a tiny random llama and a real tokenizer. Its internalizer makes a
deterministic ``LoRAAdapter`` per chunk, seeded by the chunk's sha256, with the tiny llama's
``down_proj`` shapes and a fixed bias LoRA, so adapters can be compared exactly. It records every
chunk it internalizes (in memory and, if ``D2L_TEST_INTERNALIZE_LOG`` is set, appended to that file,
so counts survive subprocesses) and can sleep per chunk (``delay_s``) so tests can kill a process
in the middle of an ``add``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence

import torch

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights
from tests.tiny_models import make_tiny_base


class SeededInternalizer:
    """One deterministic adapter per chunk text; ``checkpoint_id`` keys the adapter store."""

    name = "hypernetwork"

    def __init__(self, checkpoint_id: str = "seeded-test-v1", *, rank: int = 2, delay_s: float = 0.0) -> None:
        self.checkpoint_id = checkpoint_id
        self.rank = rank
        self.delay_s = delay_s
        self.calls: list[str] = []

    def _factors(self, base: BaseModel, seed: int, rank: int) -> dict[str, LoRAWeights]:
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for layer in range(base.num_layers):
            path = base.module_path(layer, "down_proj")
            lin = base.model.get_submodule(path)
            a = torch.randn(rank, lin.in_features, generator=gen) * 0.01
            b = torch.randn(lin.out_features, rank, generator=gen) * 0.01
            weights[path] = LoRAWeights(a, b, 2.0)
        return weights

    def internalize_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        log = os.environ.get("D2L_TEST_INTERNALIZE_LOG")
        bias = self._factors(base, 0, 1)
        adapters = []
        for i, text in enumerate(chunks):
            if self.delay_s:
                time.sleep(self.delay_s)
            sha = hashlib.sha256(text.encode()).hexdigest()
            self.calls.append(sha)
            if log:
                with open(log, "a") as fh:
                    fh.write(sha + "\n")
            provenance = AdapterProvenance(
                base_model=base.name, base_model_revision=base.revision, checkpoint_id=self.checkpoint_id,
                method=self.name, source_sha256=(sha,), chunk_ids=(chunk_ids[i],) if chunk_ids else (),
            )
            adapters.append(LoRAAdapter(self._factors(base, int(sha[:12], 16), self.rank), provenance, bias))
            if progress:
                progress(i + 1, len(chunks))
        return adapters


class SeededEngine:
    """The part of ``D2LEngine`` the knowledge base needs, over a tiny random llama."""

    def __init__(
        self,
        *,
        checkpoint_id: str = "seeded-test-v1",
        base_name: str = "tiny-random-llama",
        delay_s: float = 0.0,
        base: BaseModel | None = None,
    ) -> None:
        base = base or make_tiny_base()
        self.base = BaseModel(model=base.model, tokenizer=base.tokenizer, name=base_name, revision=base.revision)
        self._internalizer = SeededInternalizer(checkpoint_id, delay_s=delay_s)

    @property
    def calls(self) -> list[str]:
        """sha256 of every chunk internalized so far, in order."""
        return self._internalizer.calls

    def internalizer(self, method: str = "auto") -> SeededInternalizer:
        return self._internalizer

    def internalize_chunks(
        self,
        chunks: Sequence[str],
        *,
        method: str = "auto",
        chunk_ids: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[LoRAAdapter]:
        return self._internalizer.internalize_chunks(self.base, chunks, chunk_ids=chunk_ids, progress=progress)

    def count_tokens(self, text: str) -> int:
        return self.base.count_tokens(text)
