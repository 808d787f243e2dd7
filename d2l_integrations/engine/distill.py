"""Per-chunk context distillation into a LoRA: the ``distill`` internalizer.

For each chunk, a fresh rank-r LoRA (default: ``down_proj`` of every layer) is optimised so that
the base model *without* the chunk answers like the base model *with* it:

    teacher(q) = base( chat[user: chunk + "\\n\\n" + q] )          frozen, no gradient
    student(q) = base + LoRA( chat[user: q] )                      only the LoRA learns
    loss       = KL( teacher || student ) over the full vocabulary, on the response tokens

The questions ``q`` come from the chunk's own text (``engine/questions.py``: clozes of numbers,
dates, names and noun phrases, "What is X?" and "what does the text say about X"), worded
identically for teacher and student. The responses are the teacher's own greedy answers, plus the
gold cloze span. This is the "context distillation" (CD) baseline of the Doc-to-LoRA paper and
PRAG's per-passage LoRA; it needs no hypernetwork checkpoint, so it works for every base model.

Several chunks are trained at once: each has its own LoRA, stacked on a leading chunk axis, and
each batch row uses its chunk's factors (per-row adapters). Losses are summed over chunks, so
each chunk's gradient (and AdamW state, which is element-wise) is exactly what it would be alone.

Budget by steps and/or seconds; early stopping on held-out questions of the same chunk.

The teacher reads each chunk once: its prompts share the token prefix through the chunk, which is
prefilled once and its KV cache reused for every question (``_Teacher``; about 3x less teacher time
on CPU); ``DistillInternalizer(share_teacher_prefix=False)`` runs every prompt in full.

Interrupts and failures:
    - ``KeyboardInterrupt`` during a multi-chunk call raises ``DistillationInterrupted`` (a
      ``KeyboardInterrupt``) whose ``adapters`` are the chunks finished so far, in order (a prefix
      of the input).
    - A non-finite loss raises ``NonFiniteLossError`` (an ``InternalizationError``); the chunks of
      the failing group yield nothing; ``error.adapters`` holds the chunks finished before it.
    - Nothing is written to disk here, so no half-written adapter can exist.

Example:
    >>> base = load_base_model("default")
    >>> distill = DistillInternalizer(DistillConfig(max_steps=40))
    >>> [adapter] = distill.internalize_chunks(base, ["The special magic number is 4821."])
    >>> adapter.provenance.method
    'distill'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from d2l_integrations.engine.apply import batch_factors
from d2l_integrations.engine.base_model import BaseModel, cache_kwarg
from d2l_integrations.engine.config import _from_dict
from d2l_integrations.engine.internalizer import ProgressCallback, check_chunks
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights, concat_ranks
from d2l_integrations.engine.questions import QUESTION_STYLES, TrainingQuestion, build_questions, split_sentences
from d2l_integrations.errors import ConfigError, IncompatibleAdapterError, InternalizationError, InvalidDocumentError

logger = logging.getLogger(__name__)

__all__ = [
    "DistillConfig",
    "DistillInternalizer",
    "DistillResult",
    "DistillationInterrupted",
    "NonFiniteLossError",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Settings of the ``distill`` internalizer.

    Defaults are the settings measured in benchmarks/results/distill_cpu.md (SmolLM2-135M-Instruct,
    CPU); rank/alpha/lr/batch come from ../shared/research/distill_check.md.

    Args:
        rank: LoRA rank per chunk; 8 carried document facts in the CPU check, as D2L uses.
        alpha: LoRA alpha; the delta is scaled by ``alpha / rank`` (peft's convention).
        target_modules: per-layer linear modules to adapt (``down_proj`` matches D2L's target).
        layers: decoder layers to adapt (None: all); fewer layers train faster but store less.
        lr: AdamW learning rate of the LoRA factors (fp32).
        weight_decay: AdamW weight decay; 0 since each LoRA is trained from scratch briefly.
        max_steps: optimisation steps per chunk group (None: only ``max_seconds`` limits). 40 as in
            distill_check: the CPU curve (10, 20 steps) had not plateaued on facts or eval needles.
        max_seconds: optimisation wall-clock seconds per chunk (a group of k chunks gets k times
            this); None: only ``max_steps`` limits. Teacher time is not counted.
        batch_size: training questions per chunk per step.
        chunks_per_batch: chunks trained together (one LoRA each, per-row adapters); more uses
            the hardware better, at the cost of memory for teacher log-probs.
        max_questions: cloze and "What is X?" questions built per chunk (before the held-out split).
        about_questions: "what does the text say about X" questions per chunk (teacher answer only).
        held_out_fraction: share of gold-answer questions kept for early stopping, never trained on
            (0: none, every question is trained on; early stopping then has nothing to watch).
        teacher_max_new_tokens: length cap of the teacher's greedy answers (the response tokens).
        include_gold_answers: also train on the gold cloze span as a response (teacher KL on it).
        eval_every: steps between held-out evaluations (early stopping, best-state selection).
        patience: held-out evaluations without improvement before a chunk stops (0: never stop
            early; the final state is returned).
        min_improvement: relative decrease of held-out KL that counts as an improvement.
        max_grad_norm: per-chunk gradient-norm clip (None: no clipping); guards lr spikes.
        teacher_template: user turn of the teacher; must contain ``{document}`` and ``{question}``.
        teacher_batch_size: prompts per teacher generation / scoring batch.
        teacher_logprob_dtype: storage dtype of teacher log-probs (full vocab per response token).
        seed: seeds question selection, held-out split, LoRA init and batch order.
        question_style: ``"cloze"``, ``"wh"`` or ``"context"`` (``questions.build_questions``):
            ``"wh"`` adds question-word forms ("In what year, ...?") and asks about dates, numbers,
            names and last words first; ``"context"`` quotes the two previous sentences in each cloze
            and names the topic in full.
        lr_schedule: ``"constant"`` (measured default) or ``"cosine"`` (the first step at ``lr``,
            then a half cosine towards 0 at ``max_steps``, which must be set).
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("down_proj",)
    layers: tuple[int, ...] | None = None
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_steps: int | None = 40
    max_seconds: float | None = None
    batch_size: int = 4
    chunks_per_batch: int = 4
    max_questions: int = 20
    about_questions: int = 3
    held_out_fraction: float = 0.15
    teacher_max_new_tokens: int = 16
    include_gold_answers: bool = True
    eval_every: int = 10
    patience: int = 2
    min_improvement: float = 0.01
    max_grad_norm: float | None = 1.0
    teacher_template: str = "{document}\n\n{question}"
    teacher_batch_size: int = 16
    teacher_logprob_dtype: str = "bfloat16"
    seed: int = 0
    question_style: str = "cloze"
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        positive_ints = ("rank", "batch_size", "chunks_per_batch", "max_questions", "teacher_max_new_tokens",
                         "eval_every", "teacher_batch_size")
        for name in positive_ints:
            if getattr(self, name) < 1:
                msg = f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}."
                raise ConfigError(msg)
        if self.max_steps is None and self.max_seconds is None:
            msg = "DistillConfig needs a budget: set max_steps and/or max_seconds (both are None)."
            raise ConfigError(msg)
        if self.max_steps is not None and self.max_steps < 1:
            msg = (
                f"DistillConfig.max_steps must be >= 1, got {self.max_steps}: a zero-step budget trains nothing "
                "and would return an untrained adapter. Use max_steps >= 1 (default 40), or max_steps=None with "
                "max_seconds set."
            )
            raise ConfigError(msg)
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            msg = f"DistillConfig.max_seconds must be a finite number > 0 or None, got {self.max_seconds}."
            raise ConfigError(msg)
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                msg = f"DistillConfig.{name} must be a finite number > 0, got {value}."
                raise ConfigError(msg)
        if self.weight_decay < 0 or self.about_questions < 0 or self.patience < 0 or self.min_improvement < 0:
            msg = "DistillConfig.weight_decay, about_questions, patience and min_improvement must be >= 0."
            raise ConfigError(msg)
        if not 0 <= self.held_out_fraction < 1:
            msg = f"DistillConfig.held_out_fraction must be in [0, 1), got {self.held_out_fraction}."
            raise ConfigError(msg)
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            msg = f"DistillConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}."
            raise ConfigError(msg)
        if not self.target_modules:
            msg = "DistillConfig.target_modules is empty: give at least one module, e.g. ('down_proj',)."
            raise ConfigError(msg)
        if "{document}" not in self.teacher_template or "{question}" not in self.teacher_template:
            msg = f"DistillConfig.teacher_template must contain {{document}} and {{question}}, got {self.teacher_template!r}."
            raise ConfigError(msg)
        if self.question_style not in QUESTION_STYLES:
            msg = f"DistillConfig.question_style must be one of {', '.join(QUESTION_STYLES)}, got {self.question_style!r}."
            raise ConfigError(msg)
        if self.lr_schedule not in ("constant", "cosine"):
            msg = f"DistillConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}."
            raise ConfigError(msg)
        if self.lr_schedule == "cosine" and self.max_steps is None:
            msg = "DistillConfig.lr_schedule='cosine' decays to 0 at max_steps: set max_steps (it is None)."
            raise ConfigError(msg)
        if self.teacher_logprob_dtype not in _DTYPES:
            msg = f"DistillConfig.teacher_logprob_dtype must be one of {sorted(_DTYPES)}, got {self.teacher_logprob_dtype!r}."
            raise ConfigError(msg)

    @property
    def scaling(self) -> float:
        """Multiplier of ``lora_B @ lora_A``: ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Sorted-key dict for JSON (tuples become lists)."""
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        for key, default in (("question_style", "cloze"), ("lr_schedule", "constant")):
            if d[key] == default:  # defaults of fields added later: settings hashes stay as they were
                del d[key]
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        """Inverse of ``to_dict``; unknown keys are dropped with a warning."""
        return _from_dict(cls, data)

    @classmethod
    def gpu(cls, **overrides: Any) -> DistillConfig:
        """The GPU preset: rank 32, alpha 64, 40 ``wh`` questions all trained on (no hold-out), 320 steps
        with a cosine learning rate, 16 chunks per batch, no early stop.

        Chosen on dev documents (SmolLM2-135M-Instruct, H200, session 6,
        ``benchmarks/results/distill_curve/dev-gpu-f16-*-s6``): of seven settings on 16 made-up-fact documents, ``wh`` questions + no hold-out + cosine scored 0.51 at 320
        steps against 0.29 for the session-4 preset (cloze questions, 15 % held out, constant lr), full
        context 0.78. Measured on eval documents only after that choice: made-up facts 0.56 / 0.73 = 77 % of
        full context on 32 documents (``eval-gpu-f32-wh_ho0_cos-s6``; the session-4 preset 0.24 on the same
        documents) and 0.53 / 0.72 = 74 % on 64 (``eval-gpu-f64-wh_ho0_cos-s6``); needles 16/16, mismatched 0
        (``eval-gpu-n16-wh_ho0_cos-s6``). On 16 held-out SQuAD paragraphs (session 7) it reached 0.086 / 0.107 =
        81 % of full-context token F1 (``eval-gpu-squad16-s6preset-s7``; the session-4 preset 77 % in the same
        run, ``eval-gpu-squad16-s4preset-s7``, and 76 % in session 4).
        Seconds per chunk with 16 chunks trained together: ~4.6 on an H200 alone, 6.5 with five such jobs
        sharing one H200; one chunk alone took ~50 s through ``D2LEngine`` (``benchmarks/gpu_engine_check.py``).
        ``overrides`` replace preset fields: ``DistillConfig.gpu(question_style="cloze",
        held_out_fraction=0.15, lr_schedule="constant")`` is the session-4 preset.
        """
        preset: dict[str, Any] = {"rank": 32, "alpha": 64.0, "max_questions": 40, "max_steps": 320,
                                  "chunks_per_batch": 16, "patience": 0, "question_style": "wh",
                                  "held_out_fraction": 0.0, "lr_schedule": "cosine"}
        return cls(**{**preset, **overrides})

    @classmethod
    def for_device(cls, device: Any) -> DistillConfig:
        """``gpu()`` on a CUDA device, the CPU defaults elsewhere."""
        return cls.gpu() if getattr(device, "type", str(device)).startswith("cuda") else cls()

    def settings_hash(self) -> str:
        """Short sha256 of the settings: adapters made with other settings get other store keys."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# errors and results
# ---------------------------------------------------------------------------------------------
class DistillationInterrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` arrived; ``adapters`` are the chunks finished before it.

    ``adapters[i]`` belongs to ``chunks[i]`` (a prefix of the input), so a caller can store them
    and resume with ``chunks[len(error.adapters):]``.
    """

    def __init__(self, adapters: list[LoRAAdapter], total: int) -> None:
        super().__init__(
            f"Distillation interrupted after {len(adapters)} of {total} chunks; the finished adapters are in "
            "`error.adapters` (a prefix of the chunks). Resume with the remaining chunks."
        )
        self.adapters = adapters
        self.total = total


class NonFiniteLossError(InternalizationError):
    """The distillation loss became NaN or infinite; the failing chunks yield no adapter.

    ``adapters`` holds the chunks finished before the failing group (a prefix of the input).
    """

    def __init__(self, message: str, adapters: list[LoRAAdapter]) -> None:
        super().__init__(message)
        self.adapters = adapters


@dataclass(frozen=True)
class DistillResult:
    """One chunk's adapter plus what it cost and how training went.

    Attributes:
        adapter: the returned LoRA (best held-out state when early stopping is on).
        steps: optimisation steps the chunk took part in.
        seconds: wall-clock seconds attributed to the chunk (teacher + optimisation, divided by
            the chunks trained together).
        teacher_seconds: the teacher part of ``seconds``.
        train_kl: ``(first, last)`` mean training KL (nats per token).
        held_out_kl: best held-out KL (None without held-out questions).
        num_examples: training examples (question, response) pairs.
        num_pieces: pieces the chunk was split into to fit the teacher's context (1: no split).
        snapshots: ``step -> (seconds, adapter)`` at the requested ``snapshot_steps``.
    """

    adapter: LoRAAdapter
    steps: int
    seconds: float
    teacher_seconds: float
    train_kl: tuple[float, float]
    held_out_kl: float | None
    num_examples: int
    num_pieces: int
    snapshots: Mapping[int, tuple[float, LoRAAdapter]] = field(default_factory=dict)


@dataclass
class _Example:
    """One (question, response) pair with the teacher's full-vocab log-probs on the response."""

    student_ids: list[int]
    response_ids: list[int]
    teacher_logprobs: torch.Tensor | None = None  # [len(response_ids), vocab]


@dataclass
class _ChunkData:
    text: str
    sha256: str
    chunk_id: str | None
    train: list[_Example]
    held_out: list[_Example]
    num_pieces: int
    teacher_seconds: float


# ---------------------------------------------------------------------------------------------
# the internalizer
# ---------------------------------------------------------------------------------------------
class DistillInternalizer:
    """The ``distill`` internalizer: one context-distilled LoRA per chunk (see module docstring).

    Args:
        config: settings (default ``DistillConfig()``).
        share_teacher_prefix: run the teacher's shared prompt prefix (chat template + chunk) once per
            chunk and reuse its KV cache for every question (see ``_SharedPrefix``); False re-reads
            the whole prompt per question (the reference path, same results up to float rounding).
            An execution detail, so not part of ``config`` and of the settings hash.
    """

    name = "distill"

    def __init__(self, config: DistillConfig | None = None, *, share_teacher_prefix: bool = True) -> None:
        self.config = config or DistillConfig()
        self.share_teacher_prefix = share_teacher_prefix

    @property
    def checkpoint_id(self) -> str:
        """``"distill-" + settings hash``: adapter stores invalidate when settings change."""
        return f"distill-{self.config.settings_hash()}"

    def internalize_chunks(
        self,
        base: BaseModel,
        chunks: Sequence[str],
        *,
        chunk_ids: Sequence[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[LoRAAdapter]:
        """One distilled adapter per chunk, in order (see ``distill_chunks`` for failures)."""
        return [r.adapter for r in self.distill_chunks(base, chunks, chunk_ids=chunk_ids, progress=progress)]

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
        """Distill each chunk into its own LoRA; ``chunks_per_batch`` chunks train together.

        Args:
            base: the frozen base model (CPU or CUDA; bf16 or fp32).
            chunks: texts, each small enough to be one adapter (long ones are split for the
                teacher's context, and still give one adapter).
            chunk_ids: optional caller ids recorded in provenance.
            progress: ``progress(done, total)`` after each finished chunk.
            on_result: ``on_result(index, result)`` after each finished chunk (e.g. to store it).
            snapshot_steps: also return the adapter state at these step counts (for budget curves).
            start: warm start, one adapter per chunk (e.g. the hypernetwork's): it stays fixed, the LoRA
                is trained *on top of it*, and each returned adapter is the sum (start's factors and
                bias, then the trained rank). Used by ``RefineInternalizer``.

        Raises:
            InvalidDocumentError: a chunk is empty or not a string.
            ConfigError: ``chunk_ids`` does not match ``chunks``.
            IncompatibleAdapterError: ``start`` has not one adapter per chunk, or one was made for
                another base model or has modules the base model lacks.
            NonFiniteLossError: the loss became NaN/inf (``error.adapters``: finished chunks).
            DistillationInterrupted: on KeyboardInterrupt (``error.adapters``: finished chunks).
        """
        check_chunks(chunks, chunk_ids)
        chunks = list(chunks)
        module_paths = self._module_paths(base)
        starts = list(start) if start is not None else None
        if starts is not None:
            _check_start(base, starts, len(chunks))
        results: list[DistillResult] = []
        step = self.config.chunks_per_batch
        try:
            for start in range(0, len(chunks), step):
                group = list(range(start, min(start + step, len(chunks))))
                try:
                    group_results = self._distill_group(
                        base,
                        [chunks[i] for i in group],
                        [chunk_ids[i] if chunk_ids is not None else None for i in group],
                        module_paths,
                        sorted(set(snapshot_steps)),
                        [starts[i] for i in group] if starts is not None else None,
                    )
                except NonFiniteLossError as exc:
                    exc.adapters = [r.adapter for r in results]
                    raise
                for i, result in zip(group, group_results, strict=True):
                    results.append(result)
                    if on_result is not None:
                        on_result(i, result)
                    if progress is not None:
                        progress(len(results), len(chunks))
        except KeyboardInterrupt as exc:
            if isinstance(exc, DistillationInterrupted):
                raise
            raise DistillationInterrupted([r.adapter for r in results], len(chunks)) from exc
        return results

    # ------------------------------------------------------------------ one group of chunks
    def _module_paths(self, base: BaseModel) -> list[str]:
        layers = self.config.layers if self.config.layers is not None else tuple(range(base.num_layers))
        bad = [layer for layer in layers if not 0 <= layer < base.num_layers]
        if bad:
            msg = f"DistillConfig.layers has {bad}, but the base model has layers 0..{base.num_layers - 1}."
            raise ConfigError(msg)
        return [base.module_path(layer, module) for layer in layers for module in self.config.target_modules]

    def _distill_group(
        self,
        base: BaseModel,
        texts: list[str],
        ids: list[str | None],
        module_paths: list[str],
        snapshot_steps: list[int],
        start: list[LoRAAdapter] | None = None,
    ) -> list[DistillResult]:
        cfg = self.config
        data = [self._prepare_chunk(base, text, chunk_id) for text, chunk_id in zip(texts, ids, strict=True)]
        trainer = _GroupTrainer(base, cfg, data, module_paths, start)
        start_of = {id(d): a for d, a in zip(data, start, strict=True)} if start is not None else {}

        def make(b: BaseModel, chunk: _ChunkData, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 stats: Mapping[str, str]) -> LoRAAdapter:
            return self._adapter(b, chunk, factors, stats, start_of.get(id(chunk)))

        t0 = time.perf_counter()
        steps_done, snapshots = trainer.run(snapshot_steps, make)
        train_seconds = time.perf_counter() - t0
        results = []
        n = len(data)
        for c, chunk in enumerate(data):
            adapter = make(base, chunk, trainer.final_factors(c), trainer.stats(c))
            results.append(
                DistillResult(
                    adapter=adapter,
                    steps=trainer.steps_of[c],
                    seconds=chunk.teacher_seconds + train_seconds / n,
                    teacher_seconds=chunk.teacher_seconds,
                    train_kl=(trainer.first_kl[c], trainer.last_kl[c]),
                    held_out_kl=trainer.best_kl[c] if chunk.held_out else None,
                    num_examples=len(chunk.train),
                    num_pieces=chunk.num_pieces,
                    snapshots={s: (chunk.teacher_seconds + secs / n, snap[c]) for s, (secs, snap) in snapshots.items()},
                )
            )
            logger.info(
                "distill chunk %s: %d steps, KL %.3f -> %.3f, held-out %s, %.1f s",
                chunk.sha256[:8], trainer.steps_of[c], trainer.first_kl[c], trainer.last_kl[c],
                f"{trainer.best_kl[c]:.3f}" if chunk.held_out else "-", results[-1].seconds,
            )
        del steps_done
        return results

    def _adapter(
        self, base: BaseModel, chunk: _ChunkData, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        stats: Mapping[str, str], start: LoRAAdapter | None = None,
    ) -> LoRAAdapter:
        for name, (lora_A, lora_B) in factors.items():
            if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
                msg = f"Distilled LoRA factors of {name!r} are not finite; lower DistillConfig.lr (now {self.config.lr})."
                raise NonFiniteLossError(msg, [])
        weights = {name: LoRAWeights(a, b, self.config.scaling) for name, (a, b) in factors.items()}
        extra = {"distill_config": json.dumps(self.config.to_dict(), sort_keys=True), **stats}
        provenance = AdapterProvenance(
            base_model=base.name,
            base_model_revision=base.revision,
            checkpoint_id=self.checkpoint_id,
            method="distill",
            source_sha256=(chunk.sha256,),
            chunk_ids=(chunk.chunk_id,) if chunk.chunk_id is not None else (),
            extra=extra,
        )
        if start is not None:
            return _on_top_of(start, weights, provenance)
        return LoRAAdapter(weights, provenance)

    # ------------------------------------------------------------------ teacher side
    def _prepare_chunk(self, base: BaseModel, text: str, chunk_id: str | None) -> _ChunkData:
        """Questions, teacher answers and teacher log-probs of one chunk."""
        cfg = self.config
        t0 = time.perf_counter()
        questions = build_questions(
            text, seed=cfg.seed, max_questions=cfg.max_questions, about_questions=cfg.about_questions,
            held_out_fraction=cfg.held_out_fraction, style=cfg.question_style,
        )
        if not questions.train:
            msg = (
                f"No training questions could be built from chunk {text[:60]!r}: it needs at least one sentence of "
                "two or more words."
            )
            raise InvalidDocumentError(msg)
        all_questions = list(questions.train) + list(questions.held_out)
        pieces = self._pieces(base, text, all_questions)
        teacher_prompts = []
        student_prompts = []
        piece_of: list[int] = []  # which piece each question's teacher prompt holds
        for q in all_questions:
            piece = next(i for i in reversed(range(len(pieces))) if pieces[i][0] <= q.offset) if len(pieces) > 1 else 0
            user = cfg.teacher_template.format(document=pieces[piece][2], question=q.question)
            teacher_prompts.append(base.chat_ids([{"role": "user", "content": user}]))
            student_prompts.append(base.chat_ids([{"role": "user", "content": q.question}]))
            piece_of.append(piece)
        shared_by = piece_of if self.share_teacher_prefix else None  # prompts of one piece share a prefix
        teacher = _Teacher(base, teacher_prompts, shared_by, cfg.teacher_batch_size)
        answers = teacher.greedy_answers(cfg.teacher_max_new_tokens)
        eos = base.eos_token_ids[0] if base.eos_token_ids else None
        examples: list[tuple[int, _Example]] = []  # (question index, example)
        for k, q in enumerate(all_questions):
            responses = [answers[k]] if answers[k] else []
            if cfg.include_gold_answers and q.answer:
                gold = list(base.tokenizer(q.answer, add_special_tokens=False)["input_ids"])
                gold = gold + ([eos] if eos is not None else [])
                if gold and gold != answers[k]:
                    responses.append(gold)
            for response in responses:
                examples.append((k, _Example(student_prompts[k], response)))
        logprob_dtype = _DTYPES[cfg.teacher_logprob_dtype]
        logprobs = teacher.response_logprobs([(k, ex.response_ids) for k, ex in examples])
        for (_, ex), lp in zip(examples, logprobs, strict=True):
            if not torch.isfinite(lp).all():
                msg = (
                    "The teacher's log-probs are NaN or infinite: the base model itself produces non-finite "
                    "outputs. Check the base model (dtype, weights) before distilling."
                )
                raise NonFiniteLossError(msg, [])
            ex.teacher_logprobs = lp.to(logprob_dtype)
        n_train = len(questions.train)
        train = [ex for k, ex in examples if k < n_train]
        held_out = [ex for k, ex in examples if k >= n_train]
        return _ChunkData(
            text=text,
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            chunk_id=chunk_id,
            train=train,
            held_out=held_out,
            num_pieces=len(pieces),
            teacher_seconds=time.perf_counter() - t0,
        )

    def _pieces(self, base: BaseModel, text: str, questions: list[TrainingQuestion]) -> list[tuple[int, int, str]]:
        """Split ``text`` at sentence boundaries so each teacher prompt fits the context window.

        Returns ``(start, end, piece)`` character ranges covering the whole text (nothing is
        dropped). A chunk that fits is one piece.
        """
        cfg = self.config
        longest_q = max(questions, key=lambda q: len(q.question)).question
        overhead = len(base.chat_ids([{"role": "user", "content": cfg.teacher_template.format(document="", question=longest_q)}]))
        budget = base.context_window - overhead - cfg.teacher_max_new_tokens - 8  # 8: gold answer slack
        if budget < 16:
            msg = (
                f"The base model's context window ({base.context_window} tokens) leaves {budget} tokens for the "
                "document in the teacher prompt. Use a model with a longer context, or lower "
                "DistillConfig.teacher_max_new_tokens / max_questions."
            )
            raise InternalizationError(msg)
        if base.count_tokens(text) <= budget:
            return [(0, len(text), text)]
        bounds = [offset for offset, _ in split_sentences(text)]
        if not bounds or bounds[0] != 0:
            bounds = [0, *bounds]
        segments = [(s, e) for s, e in zip(bounds, [*bounds[1:], len(text)], strict=True)]
        pieces: list[tuple[int, int, str]] = []
        current: tuple[int, int] | None = None
        for s, e in segments:
            if base.count_tokens(text[s:e]) > budget:  # one sentence longer than the budget: split by tokens
                if current is not None:
                    pieces.append((current[0], current[1], text[current[0]:current[1]]))
                    current = None
                pieces.extend(_token_windows(base, text, s, e, budget))
                continue
            if current is not None and base.count_tokens(text[current[0]:e]) <= budget:
                current = (current[0], e)
            else:
                if current is not None:
                    pieces.append((current[0], current[1], text[current[0]:current[1]]))
                current = (s, e)
        if current is not None:
            pieces.append((current[0], current[1], text[current[0]:current[1]]))
        logger.info(
            "Chunk of %d tokens exceeds the teacher's budget of %d tokens: split into %d pieces "
            "(each question sees the piece that holds its sentence; one adapter for the chunk).",
            base.count_tokens(text), budget, len(pieces),
        )
        return pieces


def _check_start(base: BaseModel, start: list[LoRAAdapter], num_chunks: int) -> None:
    """``start`` must be one adapter per chunk, for this base model, on modules it has with the right shapes."""
    if len(start) != num_chunks:
        msg = f"Got {len(start)} start adapters for {num_chunks} chunks; pass one per chunk."
        raise IncompatibleAdapterError(msg)
    for index, adapter in enumerate(start):
        if not isinstance(adapter, LoRAAdapter):
            msg = f"start[{index}] is a {type(adapter).__name__}, not a LoRAAdapter."
            raise IncompatibleAdapterError(msg)
        made_for = adapter.provenance.base_model
        if made_for != base.name:
            msg = (
                f"start[{index}] was made for base model {made_for!r}, not {base.name!r}. "
                "Warm-start from adapters of this base model (e.g. its hypernetwork's)."
            )
            raise IncompatibleAdapterError(msg)
        for name in adapter.module_names:
            try:
                linear = base.model.get_submodule(name)
            except AttributeError:
                msg = f"start[{index}] has factors for {name!r}, which the base model does not have."
                raise IncompatibleAdapterError(msg) from None
            weights = adapter.effective(name)
            assert weights is not None
            expected = (int(linear.in_features), int(linear.out_features))
            if (weights.in_features, weights.out_features) != expected:
                msg = (f"start[{index}] has {name!r} of shape (d_in, d_out) = {(weights.in_features, weights.out_features)}, "
                       f"the base model {expected}.")
                raise IncompatibleAdapterError(msg)


def _on_top_of(start: LoRAAdapter, trained: Mapping[str, LoRAWeights], provenance: AdapterProvenance) -> LoRAAdapter:
    """``start`` plus the LoRA trained on top of it: one adapter whose delta is the sum, with ``start``'s bias.

    Provenance: ``method="refine"``, ``start``'s ``checkpoint_id`` (its bias LoRA's identity, which
    ``compose_adapters`` checks), and the distillation record in ``extra`` plus ``refined_from``.
    """
    sample = next(iter(trained.values())).lora_A
    start = start.to(sample.device, torch.float32)  # exact: the trained part stays fp32 (concat_ranks casts to the first part)
    modules = sorted(set(start.weights) | set(trained))
    weights = {m: concat_ranks([w[m] for w in (start.weights, trained) if m in w]) for m in modules}
    extra = {**provenance.extra, "refined_from": start.provenance.method,
             "start_checkpoint_id": str(start.provenance.checkpoint_id)}
    merged = dataclasses.replace(provenance, method="refine", checkpoint_id=start.provenance.checkpoint_id, extra=extra)
    return LoRAAdapter(weights, merged, start.bias)


def _token_windows(base: BaseModel, text: str, start: int, end: int, budget: int) -> list[tuple[int, int, str]]:
    """Split ``text[start:end]`` into consecutive windows of at most ``budget`` tokens."""
    enc = base.tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    windows = []
    for i in range(0, len(offsets), budget):
        s = start + offsets[i][0]
        e = start + offsets[min(i + budget, len(offsets)) - 1][1]
        windows.append((s, e, text[s:e]))
    return windows


def _pad_right(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(base: BaseModel) -> int:
    pad = getattr(base.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = base.eos_token_ids[0] if base.eos_token_ids else 0
    return int(pad)


def _common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens all ``prompts`` start with, leaving each at least one token of its own (its suffix).

    Taken from the tokenised full prompts, so ``prefix + suffix`` is each prompt token for token:
    a BPE merge across the chunk/question boundary just ends the prefix earlier.
    """
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


class _SharedPrefix:
    """The KV cache of a token prefix that several teacher prompts share, computed once (batch 1).

    Every teacher prompt of a chunk reads the same chat-template head and chunk text before its
    question, and on CPU that prefill dominates the teacher's cost. Attention is causal, so the
    prefix's keys/values do not depend on what follows: each batch gets a fresh cache holding them
    (rows repeated) and runs only its question suffixes, with the same logits as the full prompts up
    to float rounding.

    Build with ``_SharedPrefix.build``, which returns None where the model's cache is not a plain
    ``DynamicCache`` (sliding-window or other layer types): the caller then runs full prompts.
    """

    def __init__(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> None:
        self.ids = ids
        self.layers = layers  # per decoder layer: (keys, values), each [1, kv_heads, len(ids), head_dim]
        self.config = config

    @property
    def length(self) -> int:
        return len(self.ids)

    @classmethod
    @torch.no_grad()
    def build(cls, base: BaseModel, ids: list[int]) -> _SharedPrefix | None:
        """Prefill ``ids`` once; None where this model's cache layers cannot be shared this way."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        model = base.model
        cache = DynamicCache(config=model.config)
        runner = model.get_decoder() if hasattr(model, "get_decoder") else model  # no LM head over the prefix
        inputs = torch.tensor([ids], dtype=torch.long, device=base.device)
        runner(input_ids=inputs, use_cache=True, **{cache_kwarg(runner): cache})
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers) or cache.get_seq_length() != len(ids):
            logger.debug("teacher KV sharing off for %s: its cache is not plain DynamicCache layers", base.name)
            return None
        return cls(ids, [(layer.keys, layer.values) for layer in layers], model.config)

    def cache(self, batch: int) -> Any:
        """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows (the shared tensors are never written)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, (keys, values) in enumerate(self.layers):  # update() concatenates: a new tensor, the views stay intact
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), i)
        return cache

    def inputs(self, model: nn.Module, mask: torch.Tensor) -> dict[str, Any]:
        """Forward kwargs for suffixes with attention ``mask`` ``[B, T]`` after the prefix: the cache,
        the mask over prefix + suffix and the suffix positions (``length .. length + T - 1``)."""
        batch, width = mask.shape
        full_mask = torch.cat([torch.ones(batch, self.length, dtype=mask.dtype, device=mask.device), mask], dim=1)
        positions = torch.arange(self.length, self.length + width, device=mask.device).expand(batch, -1)
        return {"attention_mask": full_mask, "position_ids": positions, cache_kwarg(model): self.cache(batch)}


class _Teacher:
    """The frozen base model with the chunk in the prompt: greedy answers and response log-probs.

    Prompts are grouped by the chunk piece they hold (``piece_of``); each group's longest common
    token prefix (chat template head + piece, see ``_common_prefix_length``) is prefilled once and
    its prompts run only their own suffixes on copies of that KV cache. ``piece_of=None`` runs every
    prompt in full (the reference path); so does a group of one prompt, a group without a common
    prefix, or a model whose cache cannot be shared (``_SharedPrefix.build``).

    Args:
        base: the frozen base model.
        prompts: token ids of each teacher prompt.
        piece_of: the piece each prompt holds (prompts of one piece share a prefix); None: no sharing.
        batch_size: prompts per generation / scoring batch.
    """

    def __init__(self, base: BaseModel, prompts: list[list[int]], piece_of: list[int] | None, batch_size: int) -> None:
        self.base = base
        self.prompts = prompts
        self.batch_size = batch_size
        self.groups: list[tuple[list[int], _SharedPrefix | None]] = []
        if piece_of is None:
            self.groups.append((list(range(len(prompts))), None))
            return
        for piece in sorted(set(piece_of)):
            members = [i for i, p in enumerate(piece_of) if p == piece]
            self.groups.append((members, self._prefix([prompts[i] for i in members])))

    def _prefix(self, prompts: list[list[int]]) -> _SharedPrefix | None:
        if len(prompts) < 2:
            return None
        n = _common_prefix_length(prompts)
        return _SharedPrefix.build(self.base, prompts[0][:n]) if n > 0 else None

    def greedy_answers(self, max_new_tokens: int) -> list[list[int]]:
        """The teacher's greedy answer to each prompt (see ``_greedy_answers``), in prompt order."""
        answers: list[list[int]] = [[] for _ in self.prompts]
        for members, prefix in self.groups:
            prompts = [self.prompts[i] for i in members]
            got = _greedy_answers(self.base, prompts, max_new_tokens, self.batch_size, prefix)
            for i, answer in zip(members, got, strict=True):
                answers[i] = answer
        return answers

    def response_logprobs(self, items: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Full-vocab fp32 log-probs of each ``(prompt index, response ids)`` item: ``[R, V]`` each, in order."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(items)
        for members, prefix in self.groups:
            member_set = set(members)
            which = [j for j, (i, _) in enumerate(items) if i in member_set]
            if not which:
                continue
            pairs = [(self.prompts[items[j][0]], items[j][1]) for j in which]
            for j, lp in zip(which, _response_logprobs(self.base, pairs, self.batch_size, prefix), strict=True):
                out[j] = lp
        return out


@torch.no_grad()
def _greedy_answers(
    base: BaseModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    prefix: _SharedPrefix | None = None,
) -> list[list[int]]:
    """The teacher's greedy answers, cut after the first end-of-turn token (kept).

    With ``prefix`` (every prompt starts with ``prefix.ids``) only the suffixes are run, left-padded
    between the cached prefix and the suffix; ``generate`` takes positions from the attention mask,
    so each suffix sits right after the prefix as in its full prompt.
    """
    eos = set(base.eos_token_ids)
    pad = _pad_id(base)
    skip = prefix.length if prefix is not None else 0
    suffixes = [p[skip:] for p in prompts]
    answers: list[list[int]] = []
    order = sorted(range(len(prompts)), key=lambda i: len(suffixes[i]))  # similar lengths together: less padding
    by_index: dict[int, list[int]] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = [suffixes[i] for i in idx]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, p in enumerate(batch):  # left padding for generation
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        cached: dict[str, Any] = {}
        if prefix is not None:
            ids = torch.cat([torch.tensor([prefix.ids], dtype=torch.long).expand(len(batch), -1), ids], dim=1)
            mask = torch.cat([torch.ones((len(batch), prefix.length), dtype=torch.long), mask], dim=1)
            cached[cache_kwarg(base.model)] = prefix.cache(len(batch))
        out = base.model.generate(
            input_ids=ids.to(base.device), attention_mask=mask.to(base.device), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
            eos_token_id=list(eos) or None, **cached,
        )
        for r, i in enumerate(idx):
            answer: list[int] = []
            for token in out[r, ids.shape[1]:].tolist():
                answer.append(int(token))
                if token in eos:
                    break
            by_index[i] = answer
    for i in range(len(prompts)):
        answers.append(by_index[i])
    return answers


def _response_positions(prompt_lens: list[int], response_lens: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of the logits that predict each response token: P-1 .. P+R-2."""
    rows, cols = [], []
    for r, (p, n) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        rows.extend([r] * n)
        cols.extend(range(p - 1, p - 1 + n))
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def _selected_logits(
    base: BaseModel, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    prefix: _SharedPrefix | None = None,
) -> torch.Tensor:
    """Logits at ``(rows, cols)`` only: the LM head runs on the selected hidden states.

    With ``prefix``, ``ids``/``mask`` are right-padded suffixes that continue the cached prefix;
    ``cols`` index the suffixes.
    """
    model = base.model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        extra = prefix.inputs(model, mask) if prefix is not None else {"attention_mask": mask}
        return model(input_ids=ids, **extra).logits[rows, cols]
    extra = prefix.inputs(decoder, mask) if prefix is not None else {"attention_mask": mask}
    hidden = decoder(input_ids=ids, **extra).last_hidden_state  # (B, T, H)
    return head(hidden[rows, cols])  # (M, V)


@torch.no_grad()
def _response_logprobs(
    base: BaseModel, pairs: list[tuple[list[int], list[int]]], batch_size: int, prefix: _SharedPrefix | None = None,
) -> list[torch.Tensor]:
    """Full-vocab fp32 log-probs of the model on each response given its prompt: ``[R, V]`` each.

    With ``prefix`` (every prompt starts with ``prefix.ids``) only prompt suffix + response runs.
    """
    out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    pad = _pad_id(base)
    skip = prefix.length if prefix is not None else 0
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        seqs = [pairs[i][0][skip:] + pairs[i][1] for i in idx]
        ids, mask = _pad_right(seqs, pad, base.device)
        prompt_lens = [len(pairs[i][0]) - skip for i in idx]
        rows, cols = _response_positions(prompt_lens, [len(pairs[i][1]) for i in idx], base.device)
        logprobs = torch.log_softmax(_selected_logits(base, ids, mask, rows, cols, prefix).float(), dim=-1)
        split = torch.split(logprobs, [len(pairs[i][1]) for i in idx])
        for i, lp in zip(idx, split, strict=True):
            out[i] = lp
    return out


# ---------------------------------------------------------------------------------------------
# student side: per-row trainable LoRA on a frozen base
# ---------------------------------------------------------------------------------------------
class _RowLoRA:
    """Trainable LoRA factors for C chunks, stacked on a leading axis, applied per batch row.

    ``lora_A[m]``: ``[C, r, d_in]`` (kaiming-uniform like peft), ``lora_B[m]``: ``[C, d_out, r]``
    (zeros, so training starts at the base model). ``row_chunk`` maps batch rows to chunks.
    """

    def __init__(self, base: BaseModel, module_paths: list[str], num_chunks: int, cfg: DistillConfig,
                 seeds: list[int], start: Sequence[LoRAAdapter] | None = None) -> None:
        self.scaling = cfg.scaling
        # warm start: each chunk's fixed start adapter (bias included, scaling folded), added to every forward
        self.start = batch_factors(list(start), base.device) if start else {}
        self.lora_A: dict[str, nn.Parameter] = {}
        self.lora_B: dict[str, nn.Parameter] = {}
        device = base.device
        for name in module_paths:
            linear = base.model.get_submodule(name)
            d_in, d_out = int(linear.in_features), int(linear.out_features)
            bound = 1.0 / math.sqrt(d_in)
            blocks = []
            for seed in seeds:  # each chunk's init depends only on its own seed, not on its group
                g = torch.Generator().manual_seed(seed + _stable_hash(name))
                blocks.append((torch.rand(cfg.rank, d_in, generator=g) * 2 - 1) * bound)
            self.lora_A[name] = nn.Parameter(torch.stack(blocks).to(device))
            self.lora_B[name] = nn.Parameter(torch.zeros(num_chunks, d_out, cfg.rank, device=device))
        self.row_chunk: torch.Tensor | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A.values(), *self.lora_B.values()]

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Hook the factors into ``model``'s forward passes; always removed on exit."""
        names = [*self.lora_A, *(n for n in self.start if n not in self.lora_A)]
        handles = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self.row_chunk is None:
                return None
            x = args[0].float()  # (B, T, d_in); LoRA math in fp32
            delta = None
            if name in self.lora_A:
                lora_A = self.lora_A[name][self.row_chunk]  # (B, r, d_in)
                lora_B = self.lora_B[name][self.row_chunk]  # (B, d_out, r)
                delta = torch.bmm(torch.bmm(x, lora_A.transpose(1, 2)), lora_B.transpose(1, 2)) * self.scaling
            if name in self.start:  # the fixed start adapter (scaling already folded into its B)
                fixed = self.start[name]
                start_A, start_B = fixed.lora_A[self.row_chunk], fixed.lora_B[self.row_chunk]
                part = torch.bmm(torch.bmm(x, start_A.transpose(1, 2)), start_B.transpose(1, 2))
                delta = part if delta is None else delta + part
            return output if delta is None else output + delta.to(output.dtype)

        return hook


def _stable_hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


class _GroupTrainer:
    """The optimisation loop for one group of chunks (one LoRA each)."""

    def __init__(self, base: BaseModel, cfg: DistillConfig, data: list[_ChunkData], module_paths: list[str],
                 start: Sequence[LoRAAdapter] | None = None) -> None:
        self.base = base
        self.cfg = cfg
        self.data = data
        n = len(data)
        seeds = [cfg.seed + _stable_hash(d.sha256) for d in data]
        self.lora = _RowLoRA(base, module_paths, n, cfg, seeds, start)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rngs = [random.Random(s) for s in seeds]
        self.queues: list[list[int]] = [[] for _ in data]
        self.active = [True] * n
        self.steps_of = [0] * n
        self.first_kl = [math.nan] * n
        self.last_kl = [math.nan] * n
        self.best_kl = [math.inf] * n
        self.bad_evals = [0] * n
        self.best_state: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = [None] * n
        self.pad = _pad_id(base)

    # -------------------------------------------------------------- batches
    def _next_indices(self, c: int) -> list[int]:
        out = []
        for _ in range(min(self.cfg.batch_size, len(self.data[c].train))):
            if not self.queues[c]:
                self.queues[c] = list(range(len(self.data[c].train)))
                self.rngs[c].shuffle(self.queues[c])
            out.append(self.queues[c].pop())
        return out

    def _loss(self, batch: list[tuple[int, _Example]]) -> torch.Tensor:
        """Per-chunk mean (over examples) of the per-example mean token KL: shape ``[C]``."""
        device = self.base.device
        seqs = [ex.student_ids + ex.response_ids for _, ex in batch]
        ids, mask = _pad_right(seqs, self.pad, device)
        rows, cols = _response_positions([len(ex.student_ids) for _, ex in batch],
                                         [len(ex.response_ids) for _, ex in batch], device)
        self.lora.row_chunk = torch.tensor([c for c, _ in batch], device=device)
        try:
            logits = _selected_logits(self.base, ids, mask, rows, cols)
        finally:
            self.lora.row_chunk = None
        student = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
        teacher = torch.cat([ex.teacher_logprobs for _, ex in batch]).to(device=device, dtype=torch.float32)  # type: ignore[misc]
        token_kl = (teacher.exp() * (teacher - student)).sum(-1)  # (M,)
        lengths = [len(ex.response_ids) for _, ex in batch]
        example_kl = torch.stack([t.mean() for t in torch.split(token_kl, lengths)])  # (N,)
        per_chunk = torch.zeros(len(self.data), device=device)
        counts = torch.zeros(len(self.data), device=device)
        chunk_of = torch.tensor([c for c, _ in batch], device=device)
        per_chunk = per_chunk.index_add(0, chunk_of, example_kl)
        counts = counts.index_add(0, chunk_of, torch.ones_like(example_kl))
        return per_chunk / counts.clamp(min=1)

    # -------------------------------------------------------------- loop
    def run(
        self, snapshot_steps: list[int], make_adapter: Callable[..., LoRAAdapter],
    ) -> tuple[int, dict[int, tuple[float, list[LoRAAdapter]]]]:
        cfg = self.cfg
        n = len(self.data)
        budget_s = cfg.max_seconds * n if cfg.max_seconds is not None else math.inf
        max_steps = cfg.max_steps if cfg.max_steps is not None else 10**9
        snapshots: dict[int, tuple[float, list[LoRAAdapter]]] = {}
        t0 = time.perf_counter()
        step = 0
        with self.lora.attached(self.base.model):
            while step < max_steps and any(self.active) and (time.perf_counter() - t0) < budget_s:
                batch = [(c, self.data[c].train[i]) for c in range(n) if self.active[c] for i in self._next_indices(c)]
                losses = self._loss(batch)
                active = torch.tensor(self.active, device=losses.device)
                if not torch.isfinite(losses[active]).all():
                    bad = [self.data[c].sha256[:8] for c in range(n) if self.active[c] and not math.isfinite(float(losses[c].detach()))]
                    msg = (
                        f"Non-finite distillation loss at step {step + 1} for chunk(s) {bad} (sha256 prefix). "
                        f"Lower DistillConfig.lr (now {cfg.lr}) or alpha (now {cfg.alpha}), or load the base model "
                        "in float32. No adapter was produced for these chunks."
                    )
                    raise NonFiniteLossError(msg, [])
                self.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                self._clip_per_chunk()
                if cfg.lr_schedule == "cosine":  # step 0 trains at lr, the last step near 0
                    for group in self.optimizer.param_groups:  # a group's own "base_lr" (subclasses), else cfg.lr
                        group["lr"] = group.get("base_lr", cfg.lr) * 0.5 * (1 + math.cos(math.pi * step / max_steps))
                self.optimizer.step()
                step += 1
                for c in range(n):
                    if self.active[c]:
                        value = float(losses[c].detach())
                        if self.steps_of[c] == 0:
                            self.first_kl[c] = value
                        self.last_kl[c] = value
                        self.steps_of[c] += 1
                if self._has_held_out() and step % cfg.eval_every == 0:
                    self._evaluate()
                if step in snapshot_steps:
                    adapters = [make_adapter(self.base, self.data[c], self.final_factors(c), self.stats(c)) for c in range(n)]
                    snapshots[step] = (time.perf_counter() - t0, adapters)
            if self._has_held_out() and step % cfg.eval_every != 0:
                self._evaluate()  # the last steps count too
        return step, snapshots

    def _has_held_out(self) -> bool:
        return any(d.held_out for d in self.data)

    def _clip_per_chunk(self) -> None:
        if self.cfg.max_grad_norm is None:
            return
        params = [p for p in self.lora.parameters() if p.grad is not None]
        if not params:
            return
        sq = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in params)  # type: ignore[union-attr]
        factor = (self.cfg.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # type: ignore[union-attr]
        for p in params:
            p.grad.mul_(factor.view(-1, *([1] * (p.dim() - 1))))  # type: ignore[union-attr]

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Held-out KL per chunk; keep the best state; stop chunks out of patience."""
        cfg = self.cfg
        batch = [(c, ex) for c in range(len(self.data)) if self.active[c] for ex in self.data[c].held_out]
        if not batch:
            return
        with torch.no_grad():
            losses = self._loss(batch)
        for c in {c for c, _ in batch}:
            value = float(losses[c])
            if value < self.best_kl[c] * (1 - cfg.min_improvement) or self.best_state[c] is None:
                self.best_kl[c] = min(value, self.best_kl[c])
                self.best_state[c] = self._factors_now(c)
                self.bad_evals[c] = 0
            else:
                self.bad_evals[c] += 1
                if cfg.patience and self.bad_evals[c] >= cfg.patience:
                    self.active[c] = False
                    logger.debug("chunk %s stopped early at step %d", self.data[c].sha256[:8], self.steps_of[c])

    def _factors_now(self, c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (self.lora.lora_A[name][c].detach().clone(), self.lora.lora_B[name][c].detach().clone())
                for name in self.lora.lora_A}

    def final_factors(self, c: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Best held-out state (early stopping on) or the current state."""
        if self.cfg.patience and self.best_state[c] is not None:
            return self.best_state[c]  # type: ignore[return-value]
        return self._factors_now(c)

    def stats(self, c: int) -> dict[str, str]:
        return {
            "distill_steps": str(self.steps_of[c]),
            "distill_train_kl": f"{self.first_kl[c]:.4f}->{self.last_kl[c]:.4f}",
            "distill_held_out_kl": f"{self.best_kl[c]:.4f}" if self.data[c].held_out else "",
            "distill_pieces": str(self.data[c].num_pieces),
        }
