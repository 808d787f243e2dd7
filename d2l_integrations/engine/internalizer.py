"""The ``Internalizer`` protocol: anything that turns document chunks into LoRA adapters.

Three implementations produce the *same* ``LoRAAdapter`` (same targets, composition, save/load and
PEFT export), so everything downstream of the engine is indifferent to how an adapter was made:

- ``hypernetwork`` (``engine/hypernetwork.py``): D2L, one forward pass of a trained hypernetwork.
- ``distill`` (``engine/distill.py``): per-chunk context distillation by gradient descent; works
  for every base model today, with no checkpoint.
- ``refine`` (``engine/refine.py``): the hypernetwork's adapter with distillation trained on top of it.

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
        name: ``"hypernetwork"``, ``"distill"`` or ``"refine"``.
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


def check_chunks(chunks: Sequence[str], chunk_ids: Sequence[str] | None) -> None:
    """Validate ``internalize_chunks`` arguments the same way for every internalizer.

    Raises:
        InvalidDocumentError: a single str instead of a sequence, or an empty / non-text chunk.
        ConfigError: ``chunk_ids`` does not have one id per chunk.
    """
    from d2l_integrations.errors import ConfigError, InvalidDocumentError

    if isinstance(chunks, str):
        msg = "internalize_chunks takes a sequence of chunk strings, got a single str. Wrap it in a list."
        raise InvalidDocumentError(msg)
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, str) or not chunk.strip():
            kind = "empty or whitespace only" if isinstance(chunk, str) else type(chunk).__name__
            msg = f"Chunk {index} is {kind}; pass non-empty text."
            raise InvalidDocumentError(msg)
    if chunk_ids is not None and len(chunk_ids) != len(chunks):
        msg = f"Got {len(chunk_ids)} chunk_ids for {len(chunks)} chunks; pass one id per chunk or none."
        raise ConfigError(msg)


__all__ = ["Internalizer", "ProgressCallback", "check_chunks"]
