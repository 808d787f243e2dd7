"""The ``Internalizer`` protocol: anything that turns document chunks into LoRA adapters.

Two implementations produce the *same* ``LoRAAdapter`` (same targets, composition, save/load and
PEFT export), so everything downstream of the engine is indifferent to how an adapter was made:

- ``hypernetwork`` (``engine/hypernetwork.py``): D2L, one forward pass of a trained hypernetwork.
- ``distill`` (``engine/distill.py``): per-chunk context distillation by gradient descent; works
  for every base model today, with no checkpoint.

See ``docs/ENGINE_CONTRACT.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.lora import LoRAAdapter

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``: called after each finished chunk."""


@runtime_checkable
class Internalizer(Protocol):
    """Turns text chunks into one LoRA adapter per chunk for a frozen base model.

    Attributes:
        name: ``"hypernetwork"`` or ``"distill"``.
        checkpoint_id: part of adapter-store keys, so stored adapters are invalidated when the
            checkpoint or the settings change (None: the store uses ``name`` plus a settings hash).
    """

    name: str
    checkpoint_id: str | None

    def internalize_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[LoRAAdapter]:
        """Return one adapter per chunk, in order.

        ``adapters[i].provenance.source_sha256 == (sha256(chunks[i]),)``, and when ``chunk_ids``
        is given, ``adapters[i].provenance.chunk_ids == (chunk_ids[i],)``.
        """
        ...


__all__ = ["Internalizer", "ProgressCallback"]
