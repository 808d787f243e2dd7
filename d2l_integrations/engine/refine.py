"""The ``refine`` internalizer: the hypernetwork's adapter, refined by context distillation on top of it.

The hypernetwork writes an adapter in one forward pass (milliseconds) but, for the default model,
through a head that can express only part of a document (``benchmarks/results/training_log.md``,
session 11). Distillation (``engine/distill.py``) can express it, but starts from zero. ``refine``
starts distillation *from the hypernetwork's adapter*: that adapter stays fixed, a new LoRA of
``DistillConfig.rank`` is trained on top of it with the same teacher data and settings as
``distill``, and the returned adapter is their sum (the hypernetwork's factors and bias LoRA, then
the trained rank). At step 0 it is exactly the hypernetwork's adapter.

Measured on held-out documents (session 11, H200, ``distill_curve/eval-gpu-latent-refine-s11``; rank
32, ``wh`` questions, cosine lr; 16 SQuAD paragraphs and 8 made-up-fact documents): after 80 steps,
made-up facts 0.525 and SQuAD token F1 0.072, where plain distillation had 0.40 and 0.041 after 80 and
0.575 and 0.085 after 320 (full context 0.725 and 0.107; the hypernetwork alone 0.25 and 0.032). On
CPU with the CPU defaults (40 steps, session 10): SQuAD F1 0.088 against distill's 0.063, but made-up
facts 0.20 against 0.17 for distill and 0.25 for the hypernetwork alone. The defaults are ``distill``'s
(``DistillConfig.for_device``); these eval numbers were not used to choose them.

    engine = D2LEngine.default()
    engine.internalize(text, method="refine")     # hypernetwork adapter + distillation on top
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer, DistillResult
from d2l_integrations.engine.internalizer import ProgressCallback, check_chunks
from d2l_integrations.engine.lora import LoRAAdapter


class RefineInternalizer(DistillInternalizer):
    """Hypernetwork adapter per chunk, then distillation trained on top of it (see module docstring).

    A ``DistillInternalizer`` whose ``distill_chunks`` starts every chunk from the hypernetwork's
    adapter (or from the ``start`` adapters given, e.g. ones already made and stored).

    Args:
        hypernetwork: a ``HypernetworkInternalizer`` for the base model (anything with
            ``internalize_chunks`` and a ``checkpoint_id``).
        config: distillation settings (default ``DistillConfig()``; the engine passes
            ``DistillConfig.for_device``).
        share_teacher_prefix: as ``DistillInternalizer``.

    Example:
        >>> refine = RefineInternalizer(engine.hypernetwork, DistillConfig.gpu(max_steps=80))
        >>> adapters = refine.internalize_chunks(engine.base, chunks)
    """

    name = "refine"

    def __init__(self, hypernetwork: Any, config: DistillConfig | None = None, *, share_teacher_prefix: bool = True) -> None:
        super().__init__(config, share_teacher_prefix=share_teacher_prefix)
        self.hypernetwork = hypernetwork

    @property
    def checkpoint_id(self) -> str:
        """``refine-<hypernetwork checkpoint>-<distill settings hash>``: stores invalidate when either changes."""
        return f"refine-{self.hypernetwork.checkpoint_id}-{self.config.settings_hash()}"

    def distill_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
        on_result: Callable[[int, DistillResult], None] | None = None,
        snapshot_steps: Sequence[int] = (),
        start: Sequence[LoRAAdapter] | None = None,
    ) -> list[DistillResult]:
        """As ``DistillInternalizer.distill_chunks``, starting from ``start`` (default: the hypernetwork's adapters
        of ``chunks``). The results' adapters carry ``method="refine"``."""
        check_chunks(chunks, chunk_ids)
        if start is None:
            start = self.hypernetwork.internalize_chunks(base, chunks, chunk_ids=chunk_ids)
        return super().distill_chunks(base, chunks, chunk_ids=chunk_ids, progress=progress, on_result=on_result,
                                      snapshot_steps=snapshot_steps, start=start)


__all__ = ["RefineInternalizer"]
