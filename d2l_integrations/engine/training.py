"""Context-distillation trainer for a D2L hypernetwork.

Teacher: the frozen base model with the document in the prompt. Student: the same frozen model
*without* the document, plus the LoRA the hypernetwork generated from the document. The loss is
KL(teacher || student) over the response tokens (full vocabulary, or the teacher's top-k), plus an
optional cross-entropy on the response's key tokens (the needle's digits, the fact); only the
hypernetwork gets gradients.

One teacher pass serves twice: its hidden states over the document prefix (system + user turn up
to the end of the document) are the encoder features, which is exact because that prefix is
causal. Lengths are bucketed, logits are computed only at response positions, the base runs in
bf16 on CUDA.

Any hypernetwork-like module works if it has

    forward(features [n, L, T, H], attention_mask [n, T]) -> {module: (A [n, L, r, d_in], B [n, L, r, d_out])}
    bias_factors() -> {module: (A [L, rb, d_in], B [L, rb, d_out])} | None     (optional)
    config.lora_alpha                                                           (delta = alpha * A^T B)

Run (GPU machine; ``--help`` lists every option). The recipe that works is a curriculum in one
``--out`` folder (each command resumes the previous state; only the data changes)::

    python -m d2l_integrations.engine.training --base /root/stage/smol.gguf --out /root/run \\
        --tasks needle_alone --steps 270 --lr 5e-4
    ... --tasks needle_line,needle_essay --min-tokens 32 --max-tokens 128 --steps 860 --lr 5e-4
    ... --tasks facts,needle_line,needle_essay --min-tokens 128 --max-tokens 512 --minutes 4 --lr 3e-4
    ... --tasks facts_varied/1-4+d2:2,facts/1-4+d1:0.5,squad/1-3+d1:2,needle_para/1-4+d1:1,needle/1-4:0.5,cloze/1-3:1 \
        --minutes 8 --lr 3e-4      # composition: chunk adapters summed, distractors (run S2)

A fresh network gets ``scaler_B = 1`` (``HypernetworkConfig.scaler_b_init``): with the published
0 the document path never opens and training collapses to a document-independent adapter.
``--init FOLDER`` fine-tunes a shipped checkpoint instead (``benchmarks/train_d2l.py`` does the
same and also prints the held-out diagnostic table).

State under ``--out``: ``state.pt`` (weights, optimizer, step, config; written atomically every
``save_every`` steps and at the end), ``log.jsonl`` (one line per ``log_every`` steps and per
eval), and at the end ``checkpoint/`` (``save_checkpoint``'s format, what ``D2LEngine.from_pretrained``
and ``--init`` load; its data summary lists every training stage's mix, data seed and steps).
Re-running the same command resumes; another base model or hypernetwork config stops with
a clear error. The data position is the step (batches are a pure function of the data seed and
step), so a new stage on the same mix takes a new ``--data-seed``: ``--init`` refuses to repeat
its stages' batches unless ``--repeat-data`` says so.

Data parallel: start the same command under ``torchrun --nproc-per-node N`` (one process per GPU).
Every process draws its own batches (``TaskMix`` stream = rank), gradients are averaged in one
all-reduce per step, and the step's batch is ``batch_size x N``. Rank 0 alone writes
``state.pt`` and ``log.jsonl``; every rank resumes from that state. Logged losses are means over
the ranks, ``tokens_seen`` and the skip counters are totals.

Only torch, transformers, numpy (and the package's own engine modules) are imported here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from d2l_integrations.engine.training_data import (
    Example,
    PooledMix,
    TaskMix,
    apply_renames,
    make_task,
    one_question_per_document,
)
from d2l_integrations.errors import RepeatedDataError

logger = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [n, L, r, d_in], B [n, L, r, d_out])


# ------------------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Settings of one training run.

    Args:
        tasks: ``(task, weight)`` pairs, e.g. ``(("needle", 1.0),)``; see ``training_data.make_task``.
        task_kwargs: extra keyword arguments per task name (e.g. haystack length).
        batch_size: documents per step (one question each).
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up steps.
        max_steps: cosine decay horizon (and hard stop).
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay on matrices (not on norms, scalers, biases, latents).
        grad_clip: global gradient-norm clip.
        kl_weight: weight of KL(teacher || student) on response tokens.
        ce_weight: weight of the cross-entropy on the response's key tokens.
        top_k: if set, the KL uses only the teacher's top-k tokens (renormalised); None = full vocab.
        bucket: sequence lengths are padded up to a multiple of this (fewer distinct shapes).
        max_doc_tokens: documents are truncated to this many tokens (the teacher sees the same).
        seed: seed of the held-out sets, and of the training batches unless ``data_seed`` is set.
        data_seed: seed of the training batches (None: ``seed``). Batches are a pure function of
            (data seed, step), so a stage that continues a checkpoint on the same mix with the same
            data seed repeats, from step 1, the batches that checkpoint was trained on: give each
            stage a new one (``check_fresh_data`` refuses the repeat). The held-out sets do not
            depend on it, so runs with different data seeds are scored on the same examples.
        log_every, eval_every, save_every: in steps.
        eval_size: held-out examples per task for the periodic (teacher-forced) eval.
        system_prompt: None keeps the chat template's default.
        teacher_max_new_tokens: length limit of the teacher's own answers (examples with
            ``teacher_response``); they are generated once per (document, question) and cached.
        skip_wrong_teacher: drop examples whose teacher answer contains none of the gold answers
            (their KL target would teach a wrong fact); counted in ``wrong_teacher_rows``.
        train_pool: 0 draws fresh examples every step; N > 0 trains on a fixed pool of N documents drawn once
            from the mix (``training_data.PooledMix``): the capacity probe, whether the network can fit a small set.
        prefetch: draw and tokenize the next step's batch on a background thread while this step runs on
            the device (batches are a pure function of the step, so the rows are the same either way; a
            batch whose teacher answers are not all cached is drawn on the main thread, which generates them).
        recon_weight: weight of the reconstruction loss on rows that carry a ``distill`` target
            (the ``targets`` task): ``1 - cosine`` between the generated document delta and the
            target's (``delta_cosine``: direction only, all layers). 0 turns it off.
        bias_dropout: the probability that a step trains the student without the bias LoRA, on the document's
            adapter alone (a pure function of data seed and step, so every data-parallel rank drops it alike): the
            bias is a document-independent prior for the whole mix, and on real-word answers it costs more than the
            document's adapter gives (training_log.md, session 15); without it some of the time, the document's
            adapter must carry the answer by itself. 0 (default) always applies it, as inference does.
        anneal_to_deadline: with a wall-clock deadline (``train(deadline=...)``), the cosine's horizon is the step the
            deadline is expected at, re-estimated every step from this call's pace (evaluations included), so a
            stage cut by time ends annealed at ``lr * min_lr_ratio`` instead of part-way down a ``max_steps`` cosine;
            ``max_steps`` stays the hard stop. Data-parallel ranks agree on one horizon (the mean of their estimates).
    """

    tasks: tuple[tuple[str, float], ...] = (("needle", 1.0),)
    task_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 50
    max_steps: int = 20_000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 1.0
    top_k: int | None = None
    bucket: int = 32
    max_doc_tokens: int = 512
    seed: int = 11
    data_seed: int | None = None
    log_every: int = 25
    eval_every: int = 250
    save_every: int = 250
    eval_size: int = 64
    system_prompt: str | None = None
    teacher_max_new_tokens: int = 40
    skip_wrong_teacher: bool = False
    recon_weight: float = 0.0
    train_pool: int = 0
    prefetch: bool = True
    bias_dropout: float = 0.0
    anneal_to_deadline: bool = False

    def __post_init__(self) -> None:
        if self.train_pool < 0 or self.train_pool == 1:
            msg = f"train_pool must be 0 (fresh examples every step) or >= 2, got {self.train_pool}."
            raise ValueError(msg)
        if not 0.0 <= self.bias_dropout <= 1.0:
            msg = f"bias_dropout is a probability: give a number in [0, 1], got {self.bias_dropout}."
            raise ValueError(msg)
        if not (math.isfinite(self.recon_weight) and self.recon_weight >= 0):
            msg = f"recon_weight must be a finite number >= 0, got {self.recon_weight}."
            raise ValueError(msg)
        if self.batch_size < 1 or self.max_steps < 1:
            msg = f"batch_size and max_steps must be >= 1, got {self.batch_size} and {self.max_steps}."
            raise ValueError(msg)
        if not self.tasks:
            msg = "tasks is empty: give at least one (task, weight) pair, e.g. (('needle', 1.0),)."
            raise ValueError(msg)

    @property
    def train_seed(self) -> int:
        """The seed the training batches are drawn with."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        d["task_kwargs"] = {k: dict(v) for k, v in self.task_kwargs.items()}
        return d


# ------------------------------------------------------------------------- data lineage
def data_history(summary: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The training stages behind a checkpoint, oldest first: ``{"tasks", "data_seed", "steps"[, "train_pool"]}``.

    Read from its data summary (``checkpoint.read_checkpoint_config``'s metadata): ``data_history`` when the summary
    has one; else one stage from ``tasks`` and ``steps``, with the default seed (summaries written before data seeds
    were recorded were all trained with it). Empty for a checkpoint with no training record (e.g. an imported one).
    """
    if not summary:
        return []
    if "data_history" in summary:
        return [dict(stage) for stage in summary["data_history"]]
    if "tasks" not in summary:
        return []
    stage = {"tasks": [list(t) for t in summary["tasks"]], "data_seed": summary.get("data_seed", TrainingConfig.seed),
             "steps": summary.get("steps")}
    return [{**stage, "train_pool": summary["train_pool"]} if summary.get("train_pool") else stage]


def history_stage(config: TrainingConfig, steps: int) -> dict[str, Any]:
    """This run's entry of ``data_history``."""
    stage = {"tasks": [list(t) for t in config.tasks], "data_seed": config.train_seed, "steps": steps}
    return {**stage, "train_pool": config.train_pool} if config.train_pool else stage


def init_history(init: str | os.PathLike[str] | None, config: TrainingConfig, *, repeat: bool = False) -> list[dict[str, Any]]:
    """The data history of the checkpoint a run starts from (``[]`` without one), after ``check_fresh_data``
    (skipped with ``repeat``): what the CLIs call before loading the base model."""
    if init is None:
        return []
    from d2l_integrations.engine.checkpoint import read_checkpoint_config

    history = data_history(read_checkpoint_config(init)[1].get("data_summary"))
    if not repeat:
        check_fresh_data(history, config)
    return history


def lineage_summary(history: Sequence[Mapping[str, Any]], config: TrainingConfig, steps: int) -> dict[str, Any]:
    """The data-summary keys of a checkpoint this run writes: its data seed and the history with this stage appended."""
    return {"data_seed": config.train_seed, "data_history": [*history, history_stage(config, steps)]}


def check_fresh_data(history: Sequence[Mapping[str, Any]], config: TrainingConfig) -> None:
    """Refuse a run that would repeat an earlier stage's batches: the same task mix and data seed (pools aside).

    Raises:
        RepeatedDataError: naming the stage and the seeds already used, and what to pass instead.
    """
    if config.train_pool:  # a pool is drawn from steps no training stream reaches (training_data.POOL_STEP)
        return
    tasks = [list(t) for t in config.tasks]
    used = sorted({int(h["data_seed"]) for h in history if h.get("data_seed") is not None})
    for h in history:
        if not h.get("train_pool") and h.get("data_seed") == config.train_seed and [list(t) for t in h.get("tasks", [])] == tasks:
            msg = (f"This run would repeat the batches its starting checkpoint was trained on: the same task mix with data "
                   f"seed {config.train_seed} ({h.get('steps')} steps). Pass a data seed not used before (used: {used}; "
                   f"e.g. --data-seed {max(used) + 1}) for fresh batches, or --repeat-data to repeat them on purpose.")
            raise RepeatedDataError(msg)


# ------------------------------------------------------------------------- functional LoRA
@contextmanager
def lora_forward(model: nn.Module, module_paths: Mapping[tuple[str, int], str], factors: Factors | None,
                 scaling: float, bias: Factors | None = None) -> Iterator[None]:
    """Add ``scaling * (x A^T) B`` per batch row to the target modules, differentiably.

    ``factors[module] = (A [n, L, r, d_in], B [n, L, r, d_out])``; ``bias[module]`` has the same
    shapes without ``n`` and is applied to every row (concatenated on the rank axis).
    ``module_paths[(module, layer)]`` is the module's path in ``model``.
    """
    handles = []
    try:
        for (module, layer), path in module_paths.items():
            ab = layer_lora(factors, bias, module, layer)
            if ab is None:
                continue

            def hook(mod, args, out, ab=ab):  # noqa: ANN001, ANN202
                return out + _lora_delta(args[0], *ab, scaling)

            handles.append(model.get_submodule(path).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def layer_lora(factors: Factors | None, bias: Factors | None, module: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's ``(A [n, r, d_in], B [n, r, d_out])`` for ``lora_forward``: the rows' factors and the bias LoRA
    (every row's), concatenated on the rank axis; None when neither has this module."""
    parts_a, parts_b = [], []
    if factors is not None and module in factors:
        a, b = factors[module]
        parts_a.append(a[:, layer])
        parts_b.append(b[:, layer])
    if bias is not None and module in bias:
        a, b = bias[module]
        n = parts_a[0].shape[0] if parts_a else 1
        parts_a.append(a[layer].unsqueeze(0).expand(n, -1, -1))
        parts_b.append(b[layer].unsqueeze(0).expand(n, -1, -1))
    if not parts_a:
        return None
    if len(parts_a) == 1:
        return parts_a[0], parts_b[0]
    return torch.cat(parts_a, dim=1), torch.cat(parts_b, dim=1)


def _lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (x A^T) B`` per batch row (a single row of A, B serves every row of x)."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    if a.shape[0] != x.shape[0]:
        a = a.expand(x.shape[0], -1, -1)
        b = b.expand(x.shape[0], -1, -1)
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b) * scaling


def _slot_hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    """``LoRASlots``' hook, one function for every hooked module (a compiled layer's code then serves all layers)."""
    lora = mod._d2l_lora
    if lora is None:
        return out
    return out + _lora_delta(args[0], lora[0], lora[1], mod._d2l_scaling)


class LoRASlots:
    """``lora_forward`` for compiled layers: hooks registered once, reading the step's LoRA from ``use``.

    ``torch.compile`` traces the hooks a module has when it is compiled and, by default, does not notice hooks added
    later (``torch._dynamo.config.skip_nnmodule_hook_guards``), so the per-call hooks of ``lora_forward`` would be
    silently left out of a compiled pass. These hooks stay, and each module holds its factors as attributes (graph
    inputs), so a new step's adapters, ranks or lengths (``dynamic=True``) need no new graph, and the layers share one.
    Outside ``use`` they return the module's output untouched, so eager passes through the same model (evaluation,
    generation) are unchanged.
    """

    def __init__(self, model: nn.Module, module_paths: Mapping[tuple[str, int], str]) -> None:
        self.modules = {key: model.get_submodule(path) for key, path in module_paths.items()}
        for m in self.modules.values():
            m._d2l_lora, m._d2l_scaling = None, 1.0
        self._handles = [m.register_forward_hook(_slot_hook) for m in self.modules.values()]

    @contextmanager
    def use(self, factors: Factors | None, bias: Factors | None, scaling: float) -> Iterator[None]:
        """Inside the block, the hooked modules add what ``lora_forward(..., factors, scaling, bias)`` adds."""
        for key, m in self.modules.items():
            m._d2l_lora, m._d2l_scaling = layer_lora(factors, bias, *key), scaling
        try:
            yield
        finally:
            for m in self.modules.values():
                m._d2l_lora = None

    def remove(self) -> None:
        """Take the hooks (and the attributes) off the model."""
        for h in self._handles:
            h.remove()
        for m in self.modules.values():
            del m._d2l_lora, m._d2l_scaling
        self._handles = []


class _PhaseClock:
    """Seconds between a step's ``mark()``s: CUDA events on a GPU (no wait to record one; read once the step has
    waited for its end), the host's clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def spans(self) -> tuple[float, float]:
        """The first two spans (0 where fewer were marked)."""
        if len(self.marks) < 3:
            return 0.0, 0.0
        a, b, c = self.marks[-3:]
        if self.cuda:
            c.synchronize()
            return a.elapsed_time(b) / 1000, b.elapsed_time(c) / 1000
        return b - a, c - b


class CompiledLayers:
    """Regional compilation: each decoder layer's ``forward`` ``torch.compile``'d (the layers share the compiled code),
    in place only inside ``active()``, so other passes through the model (evaluation, generation) stay eager.

    Compiling the whole decoder took 212 s of warm-up on an H200 before the first step (session 20); a layer's code
    compiles once for all 30. A layer's own hooks (transformers' hidden-state capture) run outside its compiled
    ``forward``. Inside ``active()`` the layers' inner modules keep only ``LoRASlots``' hooks: others (transformers'
    attention capture, the engine's inert ``use_adapters`` hooks) read a ``ContextVar``, which breaks a compiled graph,
    and do nothing in these passes; they are back, in their order, when the block ends.
    """

    def __init__(self, decoder: nn.Module, backend: str, slots: LoRASlots) -> None:
        self.slots = slots  # the student pass's LoRA, read by hooks the compiled layers trace
        self.layers = list(decoder.layers)
        self.compiled = [torch.compile(layer.forward, dynamic=True, backend=backend) for layer in self.layers]
        self.inner = [m for layer in self.layers for m in layer.modules() if m is not layer]
        # teacher / student, first layer (input without grad) / later ones, with / without the LoRA: a handful of
        # variants of one code object; the default limit (8) would send the rest back to eager without a word
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    @contextmanager
    def active(self) -> Iterator[None]:
        # the LoRA factors are module attributes, whose shapes torch.compile keeps static by default: then every new
        # composed rank (1-8 chunks a row) compiled new graphs, 21 of the first 34 steps on an H200 (session 21)
        patch = torch._dynamo.config.patch(force_nn_module_property_static_shapes=False)
        saved = [(m, list(m._forward_hooks.items())) for m in self.inner if m._forward_hooks]
        for m, items in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update((hid, fn) for hid, fn in items if fn is _slot_hook)
        for layer, fn in zip(self.layers, self.compiled, strict=True):
            layer.forward = fn
        try:
            with patch:
                yield
        finally:
            for layer in self.layers:
                del layer.forward
            for m, items in saved:
                m._forward_hooks.clear()
                m._forward_hooks.update(items)


def compose_rows(factors: Factors, groups: Sequence[Sequence[int]]) -> Factors:
    """Row ``i`` of the result = rows ``groups[i]`` of ``factors`` concatenated on the rank axis
    (the sum of their deltas), zero-padded to the largest group's rank.

    One gather per tensor, its index copied to the device without waiting: indexing with a Python list per group
    copied a small index from pageable memory each time, and each such copy waits for the GPU to finish its queue.
    """
    width = max(map(len, groups))
    first = next(iter(factors.values()))[0]
    pad = first.shape[0]  # the index of a zero row appended to each tensor
    idx = to_device_async(torch.tensor([[*g, *[pad] * (width - len(g))] for g in groups], dtype=torch.long), first.device)

    def gather(t: torch.Tensor) -> torch.Tensor:
        g = torch.cat([t, t.new_zeros(1, *t.shape[1:])])[idx]  # [groups, width, L, r, d]
        n, w, L, r, d = g.shape
        return g.permute(0, 2, 1, 3, 4).reshape(n, L, w * r, d)

    return {m: (gather(a), gather(b)) for m, (a, b) in factors.items()}


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``, the host not waiting for the GPU's queue: a copy from pageable memory waits."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _roll(factors: Factors, shift: int = 1) -> Factors:
    """Row i gets row i+shift's factors: the mismatched-document control."""
    return {m: (a.roll(shift, 0), b.roll(shift, 0)) for m, (a, b) in factors.items()}


def _frob2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum over layers of ||B^T A||_F^2`` for ``A [L, r, d_in]``, ``B [L, r, d_out]``, through the
    r x r Gram matrices (never the d_out x d_in delta)."""
    return ((b @ b.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum()


def delta_cosine(factors: Factors, rows: Sequence[int], targets: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Per row of ``rows``: the cosine between the generated document delta ``B_row^T A_row`` and the
    target's ``B^T A`` (Frobenius inner product over all modules and layers), shape ``[len(rows)]``.

    Scale-free on purpose: before any reconstruction training, S7p's document delta was ~7x the norm of a
    ``distill`` adapter of the same passage and its bias ~18x (training_log.md, session 6), so a distance
    would mostly shrink the delta; the cosine asks only for the direction. ``targets[j][module] =
    (A [L, r, d_in], B [L, r, d_out])`` with the target's scaling folded into B.
    """
    out = []
    for row, target in zip(rows, targets, strict=True):
        dot = gg = tt = torch.zeros((), device=next(iter(factors.values()))[0].device)
        for m, (ta, tb) in target.items():
            a, b = factors[m][0][row].float(), factors[m][1][row].float()
            ta, tb = ta.float(), tb.float()
            dot = dot + ((b @ tb.transpose(1, 2)) * (a @ ta.transpose(1, 2))).sum()
            gg = gg + _frob2(a, b)
            tt = tt + _frob2(ta, tb)
        out.append(dot / (gg.sqrt() * tt.sqrt()).clamp_min(1e-12))
    return torch.stack(out)


def save_target(path: str | os.PathLike[str], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write one target adapter (``module -> (A [L, r, d_in], B [L, r, d_out])``, scaling folded into B)."""
    from safetensors.torch import save_file

    tensors = {f"{m}.{k}": t.detach().to(torch.bfloat16).contiguous().cpu() for m, (a, b) in factors.items() for k, t in (("A", a), ("B", b))}
    save_file(tensors, str(path))


def load_target(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of ``save_target``."""
    from safetensors.torch import load_file

    raw = load_file(str(path), device=str(device))
    mods = sorted({k.rsplit(".", 1)[0] for k in raw})
    return {m: (raw[f"{m}.A"], raw[f"{m}.B"]) for m in mods}


_MAX_CACHED_TARGETS = 1024


def _distinct_chunks(examples: Sequence[Example]) -> dict[str, int]:
    """The distinct chunks of ``examples`` in order of first appearance, numbered (as ``Tokenizer.batch`` rows them)."""
    return {c: i for i, c in enumerate(dict.fromkeys(c for e in examples for c in e.chunks))}


def _innermost(task: object) -> object:
    """The base task under ``*k`` grouping and ``/k`` chunking wrappers."""
    while hasattr(task, "task"):
        task = task.task  # type: ignore[attr-defined]
    return task


# ----------------------------------------------------------------------------- tokenisation
@dataclass
class Batch:
    """Token tensors of one batch (right-padded; lengths bucketed)."""

    teacher_ids: torch.Tensor  # [n, Tt]
    student_ids: torch.Tensor  # [n, Ts]
    doc_len: torch.Tensor  # [n] prefix length (system + user turn through the document)
    teacher_resp: torch.Tensor  # [n, R] position predicting response token j (index into teacher logits)
    student_resp: torch.Tensor  # [n, R]
    resp_ids: torch.Tensor  # [n, R] response token ids (target)
    resp_mask: torch.Tensor  # [n, R] bool
    key_mask: torch.Tensor  # [n, R] bool: response tokens inside ``key``
    examples: list[Example]
    chunk_ids: torch.Tensor | None = None  # [m, Tc] encoder prefixes of the distinct chunks (``_distinct_chunks`` order; None: none)
    chunk_len: torch.Tensor | None = None  # [m] their lengths
    chunk_feats: tuple[torch.Tensor, torch.Tensor] | None = None  # their features and mask, set by the teacher pass
    max_doc_len: int | None = None  # ``doc_len.max()``, known on the host (reading it from the GPU waits for its queue)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The same batch with ``fn`` applied to each of its tensors."""
        return dataclasses.replace(self, **{f.name: fn(v) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device) -> Batch:
        """The same batch on ``device``."""
        return self.apply(lambda t: t.to(device, non_blocking=True))


class Tokenizer:
    """Builds teacher/student token rows from examples through the model's chat template."""

    def __init__(self, tokenizer: Any, *, system_prompt: str | None = None, max_doc_tokens: int = 512, bucket: int = 32) -> None:
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.max_doc_tokens = max_doc_tokens
        self.bucket = bucket
        self._lock = threading.Lock()  # the prefetch thread and the main thread share one Rust tokenizer ("Already borrowed")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.end_ids = self._ids(tokenizer.eos_token or "")
        self._cache: dict[str, list[int]] = {}  # student prompt ids per question
        self._renders: dict[str, tuple[str, str]] = {}  # teacher prompt text around the document, per question

    def _ids(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _messages(self, user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return [*msgs, {"role": "user", "content": user}]

    def _render(self, user: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(self._messages(user), tokenize=False, add_generation_prompt=True)
        return f"user: {user}\nassistant:"

    def truncate_doc(self, doc: str) -> str:
        ids = self._ids(doc)
        if len(ids) <= self.max_doc_tokens:
            return doc
        with self._lock:
            return self.tok.decode(ids[: self.max_doc_tokens])

    def _split_render(self, question: str) -> tuple[str, str]:
        """The rendered teacher prompt around the document: (text before it, text after it). Cached."""
        if question not in self._renders:
            marker = "\x00DOC\x00"
            head, tail = self._render(marker + "\n\n" + question).split(marker)
            self._renders[question] = (head, tail)
        return self._renders[question]

    def teacher_prompt(self, doc: str, question: str) -> tuple[list[int], int]:
        """Ids of the teacher prompt and the length of its prefix through the document."""
        head, tail = self._split_render(question)
        prefix = self._ids(head + doc)
        return prefix + self._ids(tail), len(prefix)

    def doc_prefix(self, doc: str) -> list[int]:
        """Ids of the teacher prompt's prefix through ``doc`` alone: the encoder input of one chunk."""
        return self._ids(self._split_render("")[0] + self.truncate_doc(doc))

    def prefix_rows(self, docs: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded encoder inputs of ``docs`` read one by one (``doc_prefix``), and their lengths."""
        rows = [self.doc_prefix(d) for d in docs]
        ids = torch.full((len(rows), self._pad_to(max(map(len, rows)))), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) for r in rows])

    def student_prompt(self, question: str) -> list[int]:
        if question not in self._cache:
            self._cache[question] = self._ids(self._render(question))
        return self._cache[question]

    def response(self, ex: Example) -> tuple[list[int], list[bool]]:
        """Response ids (with the end-of-turn token) and which of them lie in ``ex.key``."""
        if ex.key and ex.key in ex.response:
            i = ex.response.index(ex.key)
            pre, key, post = self._ids(ex.response[:i]), self._ids(ex.response[i:i + len(ex.key)]), self._ids(ex.response[i + len(ex.key):])
            return pre + key + post + self.end_ids, [False] * len(pre) + [True] * len(key) + [False] * (len(post) + len(self.end_ids))
        ids = self._ids(ex.response)
        return ids + self.end_ids, [False] * (len(ids) + len(self.end_ids))

    def _pad_to(self, n: int) -> int:
        return max(self.bucket, math.ceil(n / self.bucket) * self.bucket)

    def batch(self, examples: Sequence[Example], device: torch.device) -> Batch:
        rows_t, rows_s, doc_lens, resps, keys, t_starts, s_starts = [], [], [], [], [], [], []
        for ex in examples:
            doc = self.truncate_doc(ex.doc)
            t_ids, dlen = self.teacher_prompt(doc, ex.question)
            s_ids = self.student_prompt(ex.question)
            r_ids, k_mask = self.response(ex)
            rows_t.append(t_ids + r_ids)
            rows_s.append(s_ids + r_ids)
            doc_lens.append(dlen)
            resps.append(r_ids)
            keys.append(k_mask)
            t_starts.append(len(t_ids))
            s_starts.append(len(s_ids))
        n = len(examples)
        tt = self._pad_to(max(map(len, rows_t)))
        ts = self._pad_to(max(map(len, rows_s)))
        rr = max(map(len, resps))
        teacher = torch.full((n, tt), self.pad_id, dtype=torch.long)
        student = torch.full((n, ts), self.pad_id, dtype=torch.long)
        t_pos = torch.zeros((n, rr), dtype=torch.long)
        s_pos = torch.zeros((n, rr), dtype=torch.long)
        resp = torch.full((n, rr), self.pad_id, dtype=torch.long)
        rmask = torch.zeros((n, rr), dtype=torch.bool)
        kmask = torch.zeros((n, rr), dtype=torch.bool)
        for i in range(n):
            teacher[i, : len(rows_t[i])] = torch.tensor(rows_t[i])
            student[i, : len(rows_s[i])] = torch.tensor(rows_s[i])
            r = len(resps[i])
            # logits at position p predict token p+1: response token j sits at start+j
            t_pos[i, :r] = torch.arange(t_starts[i] - 1, t_starts[i] - 1 + r)
            s_pos[i, :r] = torch.arange(s_starts[i] - 1, s_starts[i] - 1 + r)
            resp[i, :r] = torch.tensor(resps[i])
            rmask[i, :r] = True
            kmask[i, :r] = torch.tensor(keys[i])
        where = _distinct_chunks(examples)  # the rows of one grouped document share its chunks: each is read once
        chunk_ids = chunk_len = None
        if where:
            chunk_ids, chunk_len = self.prefix_rows(list(where))
        return Batch(teacher.to(device), student.to(device), torch.tensor(doc_lens, device=device), t_pos.to(device),
                     s_pos.to(device), resp.to(device), rmask.to(device), kmask.to(device), list(examples),
                     *((chunk_ids.to(device), chunk_len.to(device)) if where else (None, None)), max_doc_len=max(doc_lens))


# ---------------------------------------------------------------------------------- trainer
def default_features(hidden_states: Sequence[torch.Tensor], num_layers: int) -> torch.Tensor:
    """The residual stream entering each decoder layer, stacked: ``[n, L, T, H]``."""
    return torch.stack(list(hidden_states[:num_layers]), dim=1)


_PACE_STEPS = 20  # anneal_to_deadline: steps timed before the first estimate of the deadline's step


class StepClock:
    """Step times for the deadline: how long the next step may take, and seconds a step at the run's pace.

    Steps that compiled new graphs (``compile``) are kept apart: on an H200 the first compiled step took 86 s and the
    steady ones well under a second (session 21), so one such step in the median stopped a 180-s run after step 1.
    """

    def __init__(self) -> None:
        self.steady: list[float] = []
        self.compiling: list[float] = []

    def record(self, seconds: float, *, compiled: bool = False) -> None:
        (self.compiling if compiled else self.steady).append(seconds)

    def margin(self) -> float:
        """Seconds the next step is given: 3 x the recent median of steady steps (or the last compiling one) + 5."""
        if self.steady:
            return 3 * float(np.median(self.steady[-20:])) + 5
        return (self.compiling[-1] if self.compiling else 0.0) + 5

    def timed(self) -> bool:
        return bool(self.steady or self.compiling)

    def pace(self, elapsed: float) -> float | None:
        """Seconds a steady step at this call's pace (evaluations and logging included), once ``_PACE_STEPS`` ran."""
        n = len(self.steady)
        return (elapsed - sum(self.compiling)) / n if n >= _PACE_STEPS else None


class DistillationTrainer:
    """Trains ``hypernet`` to map a document's teacher features to a LoRA (see module docstring).

    ``data_parallel=True`` (inside an initialised ``torch.distributed`` group, e.g. under ``torchrun``;
    see ``init_data_parallel``): this process is one rank of one run. It draws its own batches, joins
    one all-reduce per step and, unless it is rank 0, writes no files.
    """

    def __init__(self, base: Any, hypernet: nn.Module, config: TrainingConfig, *, out_dir: str | os.PathLike[str] | None = None,
                 target_modules: Sequence[str] | None = None, eval_split: str = "eval",
                 features_fn: Callable[..., Any] | None = None, data_parallel: bool = False, compile: bool | str = False) -> None:  # noqa: A002
        if data_parallel and not (dist.is_available() and dist.is_initialized()):
            msg = ("data_parallel=True needs an initialised torch.distributed process group: start the command with "
                   "`torchrun --nproc-per-node N ...` (the CLIs then call init_data_parallel), or pass data_parallel=False.")
            raise RuntimeError(msg)
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if data_parallel else (0, 1)
        self.is_main = self.rank == 0
        self._stop_vote = False  # data parallel: this rank wants to stop (deadline); every rank stops when one does
        self._stop_agreed = False
        self._horizon_vote = 0.0  # anneal_to_deadline: this rank's estimate of the last step (0: none yet)
        self._horizon: int | None = None  # the cosine's horizon the ranks agreed on (None: max_steps)
        self.base = base
        self.model = base.model
        self.hypernet = hypernet
        self.config = config
        self.device = base.device
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.num_layers = base.num_layers
        hcfg = getattr(hypernet, "config", None)
        mods = target_modules or (hcfg.target_modules if hcfg is not None else ("down_proj",))
        self.scaling = float(getattr(hypernet, "output_scaling", getattr(hcfg, "lora_alpha", 1.0)))
        self.module_paths = {(m, layer): base.module_path(layer, m) for m in mods for layer in range(self.num_layers)}
        self.tokens = Tokenizer(base.tokenizer, system_prompt=config.system_prompt, max_doc_tokens=config.max_doc_tokens, bucket=config.bucket)
        # compile: the teacher and student passes run torch.compile'd decoder layers (CompiledLayers; True: the default
        # backend, a string names one), dynamic shapes, the LoRA through LoRASlots' permanent hooks. The step is bound
        # by ~17k eager operator launches (training_log.md, session 13); compiling fuses them. A runtime choice, not
        # part of the recipe: a run may resume with or without it.
        self._compiled: CompiledLayers | None = None
        if compile:
            slots = LoRASlots(self.model, self.module_paths)
            with torch.no_grad():  # transformers installs its capturing hooks on the first such call: before, not inside, active()
                self.model.model(input_ids=torch.ones(1, 2, dtype=torch.long, device=self.device), output_hidden_states=True, use_cache=False)
            self._compiled = CompiledLayers(self.model.model, compile if isinstance(compile, str) else "inductor", slots)
        self.features_fn = features_fn
        try:  # the D2L convention (last entry through the final norm) when the hypernetwork module is there
            from d2l_integrations.engine.hypernetwork import features_from_hidden_states

            norm = self.model.model.norm
            self._default_features = lambda hs: features_from_hidden_states(hs, norm)
        except ImportError:
            self._default_features = lambda hs: default_features(hs, self.num_layers)
        kw = config.task_kwargs
        mix = TaskMix([(make_task(t, split="train", **kw.get(t, {})), w) for t, w in config.tasks], seed=config.train_seed, stream=self.rank)
        self.train_data: TaskMix | PooledMix = PooledMix(mix, config.train_pool) if config.train_pool else mix
        self.eval_sets: dict[str, list[Example]] = {}  # one question per document, so the mismatched control is another document
        for t, _ in config.tasks:
            name = one_question_per_document(t)
            self.eval_sets[name] = TaskMix([(make_task(name, split=eval_split, **kw.get(t, {})), 1.0)], seed=config.seed + 1000).fixed(config.eval_size)
        decay, no_decay = [], []
        for name, p in hypernet.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "latent" not in name and "bias_" not in name else no_decay).append(p)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.999),
                                           fused=self.device.type == "cuda")  # one kernel per step, not one per tensor
        self.step = 0
        self._prefetcher: ThreadPoolExecutor | None = None  # one background thread drawing the next step's batch
        self._ahead: tuple[int, Future] | None = None  # (step, its batch being drawn)
        self.skipped_rows = 0  # training rows with an empty document, question or response
        self.wrong_teacher_rows = 0  # rows dropped by ``skip_wrong_teacher``
        self.elapsed_s = 0.0
        self.tokens_seen = 0
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _nullcontext()
        self._teacher_answers: dict[tuple[str, str], str] = {}
        self._targets: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._target_folders = [t.folder for t in map(_innermost, self.train_data.tasks) if hasattr(t, "folder")]
        if self.world_size > 1:  # every rank starts from rank 0's weights
            with torch.no_grad():
                for tensor in self.hypernet.state_dict().values():
                    dist.broadcast(tensor, 0)

    # ------------------------------------------------------------------------------ passes
    def _logits_at(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (float) of the last hidden states ``h`` at ``positions`` only."""
        gathered = torch.gather(h, 1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.model.lm_head(gathered).float()

    def teacher(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher logits at response positions, encoder features and their mask.

        The batch's distinct chunks (``batch.chunk_ids``) ride in the same forward pass, right-padded to a common
        width (causal attention: padding after a row changes none of its positions); their features land in
        ``batch.chunk_feats`` for ``document_factors``. One pass instead of two: the step is bound by kernel launches.
        """
        with torch.no_grad():
            ids, n = batch.teacher_ids, batch.teacher_ids.shape[0]
            if batch.chunk_ids is not None:
                width = max(ids.shape[1], batch.chunk_ids.shape[1])
                pad = lambda t: F.pad(t, (0, width - t.shape[1]), value=self.tokens.pad_id)  # noqa: E731
                ids = torch.cat([pad(ids), pad(batch.chunk_ids)])
            with self._compiled.active() if self._compiled is not None else _nullcontext():
                out = self.model.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            logits, hs = self._logits_at(out.last_hidden_state[:n], batch.teacher_resp), out.hidden_states
            if batch.chunk_ids is not None:
                c_width = batch.chunk_ids.shape[1]
                c_mask = torch.arange(c_width, device=self.device)[None, :] < batch.chunk_len[:, None]
                batch.chunk_feats = (self._default_features([x[n:, :c_width] for x in hs]), c_mask)
            t_doc = batch.max_doc_len if batch.max_doc_len is not None else int(batch.doc_len.max())
            t_doc = min(batch.teacher_ids.shape[1], math.ceil(t_doc / self.config.bucket) * self.config.bucket)
            mask = torch.arange(t_doc, device=self.device)[None, :] < batch.doc_len[:, None]
            sliced = [x[:n, :t_doc] for x in hs]
            if self.features_fn is not None:
                got = self.features_fn(sliced, batch)
                feats, mask = got if isinstance(got, tuple) else (got, mask)
            else:
                feats = self._default_features(sliced)
        return logits, feats, mask

    def generate_factors(self, feats: torch.Tensor, mask: torch.Tensor) -> Factors:
        with self.autocast:
            return self.hypernet(feats, mask)

    def chunk_features(self, chunks: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features of each chunk read on its own (as inference reads one chunk)."""
        ids, lengths = self.tokens.prefix_rows(chunks)
        with torch.no_grad():
            hs = self.model.model(input_ids=ids.to(self.device), output_hidden_states=True, use_cache=False).hidden_states
            feats = self._default_features(hs)
        return feats, torch.arange(ids.shape[1], device=self.device)[None, :] < lengths.to(self.device)[:, None]

    def document_factors(self, batch: Batch, feats: torch.Tensor, mask: torch.Tensor) -> Factors:
        """One adapter per example: from the teacher's features, or the sum of its chunks' adapters.

        A multi-chunk example gets one generated adapter per chunk, concatenated on the rank axis
        (the sum of their deltas, as ``compose_adapters`` does at inference); rows are zero-padded
        to the largest rank in the batch.
        """
        exs = batch.examples
        if not any(e.chunks for e in exs):
            return self.generate_factors(feats, mask)
        where = _distinct_chunks(exs)
        if batch.chunk_feats is None:  # a batch the teacher pass did not read the chunks of
            batch.chunk_feats = self.chunk_features(list(where))
        c_feats, c_mask = batch.chunk_feats
        width = max(feats.shape[2], c_feats.shape[2])
        pad = lambda f, m: (F.pad(f, (0, 0, 0, width - f.shape[2])), F.pad(m, (0, width - m.shape[1])))  # noqa: E731
        (feats, mask), (c_feats, c_mask) = pad(feats, mask), pad(c_feats, c_mask)
        rows, groups = [], []
        for i, e in enumerate(exs):  # a chunked example reads its chunks' rows (after the batch's), the others their own
            groups.append(list(range(len(rows), len(rows) + max(1, len(e.chunks)))))
            rows.extend([len(exs) + where[c] for c in e.chunks] if e.chunks else [i])
        idx = to_device_async(torch.tensor(rows, dtype=torch.long), self.device)
        factors = self.generate_factors(torch.cat([feats, c_feats])[idx], torch.cat([mask, c_mask])[idx])
        return compose_rows(factors, groups)

    def precompute_teacher_responses(self, *, batch_size: int = 128) -> int:
        """Generate the teacher's answers for every question of the training tasks that enumerate
        theirs (``task.teacher_examples()``; with ``train_pool``, the pool's), in large batches, before training; cached in
        ``out_dir/teacher_answers.json`` so a resumed run does not redo them. Returns how many."""
        path = self.out_dir / "teacher_answers.json" if self.out_dir is not None else None
        if path is not None and path.is_file():
            self._teacher_answers.update({tuple(k): v for k, v in json.loads(path.read_text())})
        if isinstance(self.train_data, PooledMix):  # only the pool is ever trained on
            todo = [e for e in self.train_data.pool if e.teacher_response and not e.response]
        else:
            todo = [e for task in self.train_data.tasks for e in getattr(_innermost(task), "teacher_examples", list)()]
        todo = [e for e in todo if _teacher_key(e) not in self._teacher_answers]
        for i in range(0, len(todo), batch_size):
            self.fill_teacher_responses(todo[i:i + batch_size], batch_size=batch_size)
        if path is not None and todo and self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([[list(k), v] for k, v in self._teacher_answers.items()]))
            os.replace(tmp, path)
        return len(todo)

    def fill_teacher_responses(self, examples: Sequence[Example], *, batch_size: int = 64) -> list[Example]:
        """Examples with ``teacher_response`` get the teacher's greedy answer (cached per document and question).

        ``key`` becomes the first gold answer found in that response (case-insensitive), else "". A
        renamed example (``squad_swap``) gets the answer about its original, renamed the same way.
        """
        need = list({_teacher_key(e): e for e in examples if e.teacher_response and not e.response and _teacher_key(e) not in self._teacher_answers})
        for i in range(0, len(need), batch_size):
            part = need[i:i + batch_size]
            prompts = [self.tokens.teacher_prompt(self.tokens.truncate_doc(doc), q)[0] for doc, q in part]
            for k, text in zip(part, _generate(self, prompts, None, False, self.config.teacher_max_new_tokens), strict=True):
                self._teacher_answers[k] = text.strip()
        out = []
        for e in examples:
            if e.teacher_response and not e.response:
                resp = apply_renames(self._teacher_answers[_teacher_key(e)], e.renames)
                low = resp.lower()
                key = next((resp[low.index(a.lower()):low.index(a.lower()) + len(a)] for a in e.answers if a and a.lower() in low), "")
                e = dataclasses.replace(e, response=resp, key=key)
            out.append(e)
        return out

    def target(self, target_id: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The ``distill`` target adapter ``target_id`` (from a ``targets`` task's folder), cached on the device."""
        if target_id not in self._targets:
            if len(self._targets) >= _MAX_CACHED_TARGETS:  # ~4 MB each at rank 32: keep the newest
                self._targets.pop(next(iter(self._targets)))
            for folder in self._target_folders:
                path = Path(folder) / f"{target_id}.safetensors"
                if path.is_file():
                    self._targets[target_id] = load_target(path, self.device)
                    break
            else:
                msg = (f"Target adapter {target_id!r} is in a targets index but not beside it in {self._target_folders}; "
                       "re-run benchmarks/distill_targets.py into that folder (it resumes).")
                raise FileNotFoundError(msg)
        return self._targets[target_id]

    def close(self) -> None:
        """Leave the shared base model as it was: ``compile``'s hooks off (the trainer trains eager after this)."""
        if self._compiled is not None:
            self._compiled.slots.remove()
            self._compiled = None

    def bias(self) -> Factors | None:
        fn = getattr(self.hypernet, "bias_factors", None)
        return fn() if fn is not None else None

    def student(self, batch: Batch, factors: Factors | None, *, bias: bool = True) -> torch.Tensor:
        bias_factors = self.bias() if bias else None
        if self._compiled is not None:
            with self._compiled.slots.use(factors, bias_factors, self.scaling), self._compiled.active():
                h = self.model.model(input_ids=batch.student_ids, use_cache=False).last_hidden_state
        else:
            with lora_forward(self.model, self.module_paths, factors, self.scaling, bias_factors):
                h = self.model.model(input_ids=batch.student_ids, use_cache=False).last_hidden_state
        return self._logits_at(h, batch.student_resp)

    def token_kl(self, t_logits: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
        """KL(teacher || student) at every position (over the teacher's top-k when ``config.top_k``)."""
        if self.config.top_k:
            top, idx = t_logits.topk(self.config.top_k, -1)
            t_p = F.softmax(top, -1)
            return (t_p * (t_p.clamp_min(1e-12).log() - torch.gather(s_logp, -1, idx))).sum(-1)
        t_logp = F.log_softmax(t_logits, -1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)

    def losses(self, t_logits: torch.Tensor, s_logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-example KL on response tokens and CE on key tokens (means over tokens)."""
        s_logp = F.log_softmax(s_logits, -1)
        return self.losses_from(self.token_kl(t_logits, s_logp), s_logp, s_logits, batch)

    def losses_from(self, kl_tok: torch.Tensor, s_logp: torch.Tensor, s_logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """``losses`` from the per-token KL already computed (``token_kl``) and the student's log-probabilities."""
        ce_tok = -torch.gather(s_logp, -1, batch.resp_ids.unsqueeze(-1)).squeeze(-1)
        rm, km = batch.resp_mask.float(), batch.key_mask.float()
        kl = (kl_tok * rm).sum(1) / rm.sum(1).clamp_min(1)
        ce = (ce_tok * km).sum(1) / km.sum(1).clamp_min(1)
        acc = ((s_logits.argmax(-1) == batch.resp_ids).float() * km).sum(1) / km.sum(1).clamp_min(1)
        return {"kl": kl, "key_ce": ce, "key_acc": acc}

    def distill_loss(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training objective of ``losses``' parts: ``kl_weight * KL + ce_weight * key CE``, batch means."""
        return self.config.kl_weight * parts["kl"].mean() + self.config.ce_weight * parts["key_ce"].mean()

    # ------------------------------------------------------------------------------- train
    @property
    def horizon(self) -> int:
        """The step the cosine ends at: ``max_steps``, or under ``anneal_to_deadline`` the deadline's estimated step."""
        return self._horizon if self._horizon is not None else self.config.max_steps

    def lr_at(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        t = min(1.0, (step - c.warmup_steps) / max(1, self.horizon - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def _draw(self, step: int, *, generate: bool) -> tuple[int, list[Example], int, int, Batch | None] | None:
        """Step ``step``'s rows: drawn, teacher answers filled, empty and (``skip_wrong_teacher``) wrong ones dropped,
        tokenized on the CPU: (rows drawn, rows kept, skipped, wrong, batch or None below 2 rows). Without
        ``generate`` (the prefetch thread), None when a teacher answer is not cached yet."""
        c = self.config
        drawn = self.train_data.batch(step, c.batch_size)
        if not generate and any(e.teacher_response and not e.response and _teacher_key(e) not in self._teacher_answers for e in drawn):
            return None
        rows = self.fill_teacher_responses(drawn)
        kept = [e for e in rows if e.doc.strip() and e.question.strip() and e.response.strip()]
        skipped, wrong = len(rows) - len(kept), 0
        if c.skip_wrong_teacher:
            right = [e for e in kept if not (e.teacher_response and e.answers and not e.key)]
            wrong = len(kept) - len(right)
            kept = right
        batch = self.tokens.batch(kept, torch.device("cpu")) if len(kept) >= 2 else None
        if batch is not None and self.device.type == "cuda":
            batch = batch.apply(torch.Tensor.pin_memory)  # the copy to the device can then overlap
        return len(rows), kept, skipped, wrong, batch

    def _drops_bias(self, step: int) -> bool:
        """Whether step ``step`` trains without the bias LoRA (``TrainingConfig.bias_dropout``)."""
        p = self.config.bias_dropout
        if p <= 0.0:
            return False
        seed = self.config.data_seed if self.config.data_seed is not None else self.config.seed
        return bool(np.random.default_rng([seed, step, 7]).random() < p)

    def train_step(self) -> dict[str, float]:
        c = self.config
        self.hypernet.train()
        t0 = time.perf_counter()
        ahead, self._ahead = self._ahead, None
        drawn = ahead[1].result() if ahead is not None and ahead[0] == self.step else None
        if drawn is None:  # no prefetch, or its batch needs teacher answers generated: draw here
            drawn = self._draw(self.step, generate=True)
        rows, kept, skipped, wrong, cpu_batch = drawn
        if c.prefetch:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="d2l-prefetch")
            self._ahead = (self.step + 1, self._prefetcher.submit(self._draw, self.step + 1, generate=False))
        if self.world_size == 1:
            self.skipped_rows += skipped
            self.wrong_teacher_rows += wrong
            if len(kept) < 2:  # nothing to learn from (the mismatched eval needs 2 rows too); count and move on
                self.step += 1
                return {"loss": float("nan"), "skipped": float(rows - len(kept))}
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        rec: dict[str, float] = {}
        tokens = 0
        terms: list[torch.Tensor] = []
        recon_rows: list[int] = []
        # The step waits for the GPU once, at its end (``_read``): each read of a GPU value mid-step (a length, a
        # finite check, a timing sync) left the GPU idle while the host caught up. Phases are timed by CUDA events.
        clock = _PhaseClock(self.device)
        if cpu_batch is not None:  # a data-parallel rank without rows still joins the all-reduce below, with zero gradients
            batch = cpu_batch.to(self.device)
            clock.mark()
            t_logits, feats, mask = self.teacher(batch)
            factors = self.document_factors(batch, feats, mask)
            clock.mark()
            s_logits = self.student(batch, factors, bias=not self._drops_bias(self.step))
            parts = self.losses(t_logits, s_logits, batch)
            loss = self.distill_loss(parts)
            recon_rows = [i for i, e in enumerate(batch.examples) if e.target and not e.chunks] if c.recon_weight else []
            if recon_rows:
                cos = delta_cosine(factors, recon_rows, [self.target(batch.examples[i].target) for i in recon_rows])
                recon = (1 - cos).mean()
                loss = loss + c.recon_weight * recon
            loss.backward()
            tokens = int(batch.teacher_ids.numel() + batch.student_ids.numel())
            terms = [loss, parts["kl"].mean(), parts["key_ce"].mean(), parts["key_acc"].mean(), *([recon] if recon_rows else [])]
        if self.world_size > 1:
            if terms:
                rec = self._read(terms, recon_rows=len(recon_rows))
            rec, tokens, any_rows = self._all_reduce(rec, tokens=tokens, skipped=skipped, wrong=wrong)
            if not any_rows:  # no rank had rows: every rank skips the update alike
                self.step += 1
                return {"loss": float("nan"), "skipped": float(c.batch_size * self.world_size)}
        if self.world_size == 1 and self._horizon_vote > 0:
            self._horizon = round(self._horizon_vote)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        gnorm = torch.nn.utils.clip_grad_norm_(self.hypernet.parameters(), c.grad_clip)
        clock.mark()
        if self.world_size == 1:  # the one wait: the loss terms and the gradient norm together
            rec = self._read(terms, recon_rows=len(recon_rows), grad_norm=gnorm)
        else:
            rec["grad_norm"] = float(gnorm)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += tokens
        rec["lr"] = self.lr_at(self.step - 1)
        if self._horizon is not None:
            rec.update(horizon=float(self._horizon))
        s_teacher, s_student = clock.spans()
        # where a step's time goes (this rank's): on a GPU, the kernels' time from the teacher's start to the adapters,
        # and from there to the gradients' norm; the host may have waited on neither
        rec.update(s_data=t1 - t0, s_teacher=s_teacher, s_student=s_student)
        return rec

    def _read(self, terms: Sequence[torch.Tensor], *, recon_rows: int, grad_norm: torch.Tensor | None = None) -> dict[str, float]:
        """The loss terms (``loss, kl, key_ce, key_acc[, recon]``) and the gradient norm on the host, in one read; a
        non-finite loss stops the run before the optimizer moves."""
        values = torch.stack([t.detach().float() for t in [*terms, *([grad_norm] if grad_norm is not None else [])]]).tolist()
        if not math.isfinite(values[0]):
            msg = f"Non-finite loss at step {self.step}: {values[0]}. Lower lr or check the data; state not saved."
            raise FloatingPointError(msg)
        names = ["loss", "kl", "key_ce", "key_acc", *(["recon"] if recon_rows else []), *(["grad_norm"] if grad_norm is not None else [])]
        rec = dict(zip(names, values, strict=True))
        if recon_rows:
            rec["recon_rows"] = float(recon_rows)
        return rec

    _REDUCED = ("loss", "kl", "key_ce", "key_acc")

    def _all_reduce(self, rec: dict[str, float], *, tokens: int, skipped: int, wrong: int) -> tuple[dict[str, float], int, bool]:
        """One all-reduce per data-parallel step: gradients (a rank without rows sends zeros), the loss
        terms and the counters. Gradients and losses become means over the ranks that had rows, the
        counters totals, the stop votes agree (``_stop_agreed``) and so does the cosine's horizon (the mean of the
        ranks' ``anneal_to_deadline`` estimates)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        has_rows = float(bool(rec))
        local = [has_rows, float(tokens), float(skipped), float(wrong), float(self._stop_vote), self._horizon_vote] + [rec.get(k, 0.0) for k in self._REDUCED]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                         + [torch.tensor(local, dtype=torch.float32, device=self.device)])
        dist.all_reduce(flat)
        stats = flat[flat.numel() - len(local):].tolist()
        ranks_with_rows = stats[0]
        offset = 0
        for p in params:
            p.grad = (flat[offset:offset + p.numel()] / max(1.0, ranks_with_rows)).view_as(p).to(p.dtype)
            offset += p.numel()
        self.skipped_rows += int(stats[2])
        self.wrong_teacher_rows += int(stats[3])
        self._stop_agreed = stats[4] > 0
        if stats[5] > 0:  # every rank votes from the same step on (they run the same steps), so the mean is of all
            self._horizon = round(stats[5] / self.world_size)
        means = {k: v / max(1.0, ranks_with_rows) for k, v in zip(self._REDUCED, stats[6:], strict=True)}
        return {**rec, **means}, int(stats[1]), ranks_with_rows > 0

    def eval_teacher_forced(self, batch_size: int = 32) -> dict[str, dict[str, float]]:
        """Matched vs mismatched KL / key CE / key accuracy on the held-out sets (``teacher_forced_eval``)."""
        return {task: teacher_forced_eval(self, exs, batch_size=batch_size) for task, exs in self.eval_sets.items()}

    def train(self, *, deadline: float | None = None, max_steps: int | None = None, on_log: Callable[[dict], None] | None = None) -> dict:
        """Train until ``max_steps`` or the wall-clock ``deadline`` (``time.time()`` seconds)."""
        c = self.config
        stop = min(c.max_steps, max_steps or c.max_steps)
        t0 = time.time()
        t_last, tok_last, clock = t0, self.tokens_seen, StepClock()
        ema: dict[str, float] = {}
        self._stop_agreed = False
        while self.step < stop and not self._stop_agreed:
            ts = time.time()
            margin = clock.margin()  # a step must end before the deadline
            near = deadline is not None and clock.timed() and ts + margin > deadline
            if near and self.world_size == 1:
                logger.info("Stopping at step %d before the deadline", self.step)
                break
            self._stop_vote = near  # data parallel: the step still runs on every rank, then all stop together
            pace = clock.pace(ts - t0) if c.anneal_to_deadline and deadline is not None else None
            if pace is not None:
                self._horizon_vote = float(min(c.max_steps, self.step + max(1.0, (deadline - margin - ts) / pace)))
            graphs = self._graph_count()
            rec = self.train_step()
            clock.record(time.time() - ts, compiled=self._graph_count() > graphs)
            if "skipped" in rec:
                continue
            for k, v in rec.items():
                ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
            if self.step % c.log_every == 0 or self.step == 1:
                now = time.time()
                line = {"step": self.step, **{k: round(v, 5) for k, v in rec.items()}, **{f"ema_{k}": round(v, 4) for k, v in ema.items() if k in ("loss", "kl", "key_ce", "key_acc")},
                        "tok_per_s": round((self.tokens_seen - tok_last) / max(1e-9, now - t_last)), "s_per_step": round(float(np.median((clock.steady or clock.compiling)[-c.log_every:])), 4)}
                t_last, tok_last = now, self.tokens_seen
                self._log(line, on_log)
            if c.eval_every and self.step % c.eval_every == 0:
                self._log({"step": self.step, "eval": self.eval_teacher_forced(batch_size=c.batch_size)}, on_log)  # no more memory than a step
            if self.out_dir is not None and c.save_every and self.step % c.save_every == 0:
                self.save_state()
        self.elapsed_s += time.time() - t0
        self._log({"step": self.step, "stopped": "deadline" if self.step < stop else "steps", "elapsed_s": round(self.elapsed_s, 1),
                   "tokens_seen": self.tokens_seen, "skipped_rows": self.skipped_rows,
                   "wrong_teacher_rows": self.wrong_teacher_rows,
                   **({"compiling_steps": len(clock.compiling), "compiling_s": round(sum(clock.compiling), 1)} if self._compiled else {})}, on_log)
        if self.out_dir is not None:
            self.save_state()
        return {"step": self.step, "elapsed_s": self.elapsed_s, "ema": ema}

    def _graph_count(self) -> int:
        """Graphs ``torch.compile`` made so far in this process (0 when not compiling): a step that adds one compiled."""
        if self._compiled is None:
            return 0
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def _log(self, line: dict, on_log: Callable[[dict], None] | None) -> None:
        if not self.is_main:
            return
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(line) + "\n")
        if on_log is not None:
            on_log(line)
        else:
            logger.info("%s", json.dumps(line))

    # ---------------------------------------------------------------------------- state
    def _identity(self) -> dict[str, Any]:
        hcfg = getattr(self.hypernet, "config", None)
        return {"base_model": getattr(self.base, "name", None), "base_revision": getattr(self.base, "revision", None),
                "hypernet": hcfg.to_dict() if hasattr(hcfg, "to_dict") else repr(hcfg), "hypernet_class": type(self.hypernet).__name__}

    def save_state(self) -> Path:
        """Write ``out_dir/state.pt`` atomically (data parallel: rank 0 only; the ranks' states are equal)."""
        assert self.out_dir is not None
        path = self.out_dir / "state.pt"
        if not self.is_main:
            return path
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"hypernet": self.hypernet.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "elapsed_s": self.elapsed_s, "tokens_seen": self.tokens_seen, "identity": self._identity(),
                    "skipped_rows": self.skipped_rows, "wrong_teacher_rows": self.wrong_teacher_rows,
                    "world_size": self.world_size, "training_config": self.config.to_dict()}, tmp)
        os.replace(tmp, path)
        return path

    def maybe_resume(self) -> bool:
        """Load ``out_dir/state.pt`` if present; refuse another base model or hypernetwork config."""
        if self.out_dir is None or not (self.out_dir / "state.pt").is_file():
            return False
        state = torch.load(self.out_dir / "state.pt", map_location=self.device, weights_only=False)
        mine = self._identity()
        if state["identity"] != mine:
            diff = {k: (state["identity"].get(k), v) for k, v in mine.items() if state["identity"].get(k) != v}
            msg = (f"Cannot resume from {self.out_dir}: it was trained with another base model or hypernetwork config "
                   f"(saved vs now: {diff}). Use a new --out folder.")
            raise ValueError(msg)
        self.hypernet.load_state_dict(state["hypernet"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed_s, self.tokens_seen = state["step"], state["elapsed_s"], state["tokens_seen"]
        self.skipped_rows = state.get("skipped_rows", 0)  # states saved before these counters existed: start at 0
        self.wrong_teacher_rows = state.get("wrong_teacher_rows", 0)
        return True


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# ------------------------------------------------------------------------------ evaluation
TF_CONDITIONS = ("matched", "mismatched", "bias_only", "none", "doc_only", "doc_only_mismatched")
"""Conditions of ``teacher_forced_eval``: the document's adapter with the bias LoRA (``matched``), another document's
(``mismatched``), the bias LoRA alone, no adapter, the document's adapter without the bias (``doc_only``), and another
document's without the bias (``doc_only_mismatched``, the control of ``doc_only``)."""


@torch.no_grad()
def teacher_forced_eval(trainer: DistillationTrainer, examples: Sequence[Example], *, batch_size: int = 32,
                        conditions: Sequence[str] = TF_CONDITIONS[:4], adapter_scale: float = 1.0) -> dict[str, float]:
    """Mean KL to the teacher, key-token CE and key-token accuracy of the student on ``examples``, per condition
    (``{cond}_kl``, ``{cond}_key_ce``, ``{cond}_key_acc``), teacher-forced on the teacher's responses (generated for
    rows without one; rows whose response stays empty are left out).

    Far less noisy than greedy answers on the same rows: every response token counts, not one hit per row. The
    mismatched control pairs each row with the next one in its batch (``examples`` should hold one question per
    document). ``{cond}_key_kl`` and ``{cond}_rest_kl`` split the KL between the key (answer) tokens and the other
    response tokens (rows with key tokens only): whether an adapter helps the answer or only the wording around it.
    ``adapter_scale`` multiplies every adapter, bias included (1.0: as trained). Also ``{cond}_kl_se``, the
    standard error of each KL mean, and, with ``matched`` and ``bias_only``, ``doc_gain_kl`` (± ``doc_gain_kl_se``): the
    mean per-row bias-only KL minus matched KL, what the document itself adds. ``specific_gain_kl`` (mismatched minus
    matched) and ``doc_only_specific_gain_kl`` (doc_only_mismatched minus doc_only), each ± ``_se`` over paired rows, are
    what *this* document adds over any document's adapter: the part that is internalization, not a generic adapter
    effect.
    """
    unknown = set(conditions) - set(TF_CONDITIONS)
    if unknown:
        msg = f"Unknown teacher-forced condition(s) {sorted(unknown)}; choose from {', '.join(TF_CONDITIONS)}."
        raise ValueError(msg)
    was_training = trainer.hypernet.training
    trainer.hypernet.eval()
    scaling = trainer.scaling
    agg: dict[str, list[float]] = {}
    try:
        trainer.scaling = scaling * adapter_scale
        rows = [e for e in trainer.fill_teacher_responses(list(examples)) if e.response.strip()]
        for i in range(0, len(rows), batch_size):
            batch = trainer.tokens.batch(rows[i:i + batch_size], trainer.device)
            if len(batch.examples) < 2:
                continue
            with trainer.autocast:
                t_logits, feats, mask = trainer.teacher(batch)
                factors = trainer.document_factors(batch, feats, mask)
                rolled = _roll(factors)
                setups = {"matched": (factors, True), "mismatched": (rolled, True), "bias_only": (None, True),
                          "none": (None, False), "doc_only": (factors, False), "doc_only_mismatched": (rolled, False)}
                rm, km = batch.resp_mask.float(), batch.key_mask.float()
                for cond in conditions:
                    fac, bias = setups[cond]
                    s_logits = trainer.student(batch, fac, bias=bias)
                    s_logp = F.log_softmax(s_logits, -1)
                    kl_tok = trainer.token_kl(t_logits, s_logp)
                    parts = trainer.losses_from(kl_tok, s_logp, s_logits, batch)
                    kl_tok = kl_tok.float()
                    has_key = km.sum(1) > 0  # the KL on the key (answer) tokens and on the rest, rows that have both
                    parts["key_kl"] = ((kl_tok * km).sum(1) / km.sum(1).clamp_min(1))[has_key]
                    parts["rest_kl"] = ((kl_tok * (rm - km)).sum(1) / (rm - km).sum(1).clamp_min(1))[has_key]
                    for k, v in parts.items():
                        agg.setdefault(f"{cond}_{k}", []).extend(v.float().tolist())
    finally:
        trainer.scaling = scaling
        trainer.hypernet.train(was_training)
    out = {k: float(np.mean(v)) for k, v in agg.items() if v}  # no key_kl where no row has key tokens (offtopic_*)
    for cond in conditions:  # standard errors of the KL means, and of what the document adds over the bias (paired rows)
        out[f"{cond}_kl_se"] = _sem(agg.get(f"{cond}_kl", []))
    for name, (control, cond) in {"doc_gain": ("bias_only", "matched"), "specific_gain": ("mismatched", "matched"),
                                  "doc_only_specific_gain": ("doc_only_mismatched", "doc_only")}.items():
        if {control, cond} <= set(conditions) and agg.get(f"{cond}_kl"):
            gain = np.asarray(agg[f"{control}_kl"]) - np.asarray(agg[f"{cond}_kl"])
            out[f"{name}_kl"], out[f"{name}_kl_se"] = float(gain.mean()), _sem(gain)
    return out


def _sem(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean (0.0 below two values)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def greedy_eval(trainer: DistillationTrainer, examples: Sequence[Example], *, batch_size: int = 32, max_new_tokens: int = 16,
                conditions: Sequence[str] = ("no_context", "full_context", "d2l", "mismatched", "bias_only"),
                scorer: Callable[[str, Sequence[str]], float] | None = None) -> dict[str, Any]:
    """The diagnostic table: contains-accuracy of greedy answers per condition.

    ``mismatched`` uses the adapter of the next document in the list (another haystack/person); ``doc_only`` and
    ``doc_only_mismatched`` are ``d2l`` and ``mismatched`` without the bias LoRA.
    Also reports, for ``mismatched``, how often the *other* document's answer comes out (leak).
    ``scorer(prediction, answers)`` (e.g. SQuAD token F1) adds a ``score`` table (mean x 100).
    Examples with made-up names (``renames``, e.g. ``squad_swap``) add ``made_up_recall``: the %
    of answers holding one of the document's made-up words or numbers that the question does not
    (recall of the document's vocabulary, right answer or not; ``mismatched`` and ``no_context``
    give the chance level).
    """
    tok = trainer.tokens
    trainer.hypernet.eval()
    scores: dict[str, list[float]] = {c: [] for c in conditions}
    hits: dict[str, list[bool]] = {c: [] for c in conditions}
    leak: list[bool] = []
    recall: dict[str, list[bool]] = {c: [] for c in conditions}
    samples: dict[str, list[str]] = {c: [] for c in conditions}
    examples = list(examples)
    for i in range(0, len(examples), batch_size):
        exs = examples[i:i + batch_size]
        if len(exs) < 2:
            break
        batch = tok.batch([e if e.response else dataclasses.replace(e, response=" ") for e in exs], trainer.device)
        _, feats, mask = trainer.teacher(batch)
        factors = trainer.document_factors(batch, feats, mask)
        rolled = _roll(factors, -1)
        setups = {"full_context": (None, False), "no_context": (None, False), "d2l": (factors, True), "mismatched": (rolled, True),
                  "bias_only": (None, True), "doc_only": (factors, False), "doc_only_mismatched": (rolled, False)}
        for cond in conditions:
            fac, bias = setups[cond]
            if cond == "full_context":
                prompts = [tok.teacher_prompt(tok.truncate_doc(e.doc), e.question)[0] for e in exs]
            else:
                prompts = [tok.student_prompt(e.question) for e in exs]
            texts = _generate(trainer, prompts, fac, bias, max_new_tokens)
            for j, (e, t) in enumerate(zip(exs, texts, strict=True)):
                hits[cond].append(any(a.lower() in t.lower() for a in e.answers))
                if scorer is not None:
                    scores[cond].append(float(scorer(t, e.answers)))
                if e.renames:
                    recall[cond].append(recalls_made_up(e, t))
                if cond == "mismatched":
                    other = exs[(j + 1) % len(exs)]
                    leak.append(any(a.lower() in t.lower() for a in other.answers) and other.answers != e.answers)
                if len(samples[cond]) < 3:
                    samples[cond].append(t)
    table = {c: 100.0 * float(np.mean(v)) for c, v in hits.items()}
    table["mismatched_leak"] = 100.0 * float(np.mean(leak)) if leak else 0.0
    result = {"accuracy": table, "n": len(hits[conditions[0]]), "samples": samples}
    if scorer is not None:
        result["score"] = {c: 100.0 * float(np.mean(v)) for c, v in scores.items()}
    if any(recall.values()):
        result["made_up_recall"] = {c: 100.0 * float(np.mean(v)) for c, v in recall.items()}
    return result


_WORD = re.compile(r"\d[\d,]*\d|\w+")  # a number with thousands commas is one token, as the swapper makes them


def recalls_made_up(e: Example, answer: str) -> bool:
    """Whether ``answer`` holds one of the made-up words or numbers of ``e``'s document (``e.renames``)
    that ``e``'s question does not: the document's vocabulary came through, right answer or not."""
    made_up = {new for _, new in e.renames} - set(_WORD.findall(e.question))
    return bool(made_up & set(_WORD.findall(answer)))


def _teacher_key(e: Example) -> tuple[str, str]:
    """What a teacher answer is cached under: the document and question the teacher read."""
    return (e.teacher_doc or e.doc, e.teacher_question or e.question)


def _generate(trainer: DistillationTrainer, prompts: Sequence[list[int]], factors: Factors | None, bias: bool, max_new_tokens: int) -> list[str]:
    tok = trainer.tokens
    n, width = len(prompts), max(map(len, prompts))
    ids = torch.full((n, width), tok.pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        att[i, width - len(p):] = 1
    with lora_forward(trainer.model, trainer.module_paths, factors, trainer.scaling, trainer.bias() if bias else None):
        out = trainer.model.generate(input_ids=ids.to(trainer.device), attention_mask=att.to(trainer.device), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_id, eos_token_id=list(trainer.base.eos_token_ids) or None)
    return [tok.tok.decode(o[width:], skip_special_tokens=True) for o in out]


# ------------------------------------------------------------------------------------- CLI
def init_data_parallel(device: str | None = None) -> tuple[bool, str | None]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); returns
    ``(data_parallel, device)``, the device being this process's GPU on CUDA.

    NCCL on CUDA, gloo on CPU. More local ranks than GPUs (``torchrun --nproc-per-node 2N`` on N GPUs) share the GPUs
    round-robin (local rank r on GPU r mod N) and talk over gloo, because NCCL refuses two ranks on one GPU: the training
    step is bound by its host thread's kernel launches, so a second process per GPU fills the GPU's idle gaps (session
    14: one H200 ran 54k tok/s with one process, 90-108k with two). A group the caller initialised already is used as it is.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, device
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    n_gpus = torch.cuda.device_count() if cuda else 0
    if cuda and (device is None or device == "cuda"):
        device = f"cuda:{rank_gpu(int(os.environ.get('LOCAL_RANK', '0')), n_gpus)}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(cuda, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), n_gpus))
    return True, device


def rank_gpu(local_rank: int, n_gpus: int) -> int:
    """The GPU of a local rank: round-robin, so ``2N`` ranks on ``N`` GPUs put two on each."""
    if n_gpus < 1:
        msg = "rank_gpu needs at least one GPU; on a machine without CUDA train on the CPU (--device cpu)."
        raise ValueError(msg)
    return local_rank % n_gpus


def process_group_backend(cuda: bool, local_world_size: int, n_gpus: int) -> str:
    """``nccl`` with one rank per GPU; ``gloo`` on CPU or when ranks share GPUs (NCCL refuses two ranks on one GPU)."""
    return "nccl" if cuda and local_world_size <= n_gpus else "gloo"


SMOLLM2_135M_SHAPE: dict[str, Any] = dict(latent_size=128, num_latents=16, num_blocks=3, num_heads=4, num_kv_heads=4, head_dim=32,
                                          projection_factor=2, mlp_factor=2, resmlp_factor=1, context_format="chat_prefix")
"""The shape of the shipped SmolLM2-135M checkpoint: 11.7 M parameters, 23.5 MB in bf16."""


def open_document_path(hypernet: nn.Module, value: float = 1.0) -> None:
    """Set the generated-B scalers of a *fresh* hypernetwork to ``value`` (the published init is 0).

    With ``scaler_B = 0`` the generated B is exactly zero and the head's effective learning rate
    is scaled by ``scaler_B``; the bias LoRA learns the document-independent part first and the
    document path never opens (digit CE stuck at chance, see benchmarks/results/training_log.md).
    Do not call this on a trained network.
    """
    scalers = getattr(hypernet, "scaler_B", None)
    if scalers is None:
        msg = f"{type(hypernet).__name__} has no scaler_B; nothing to open."
        raise TypeError(msg)
    with torch.no_grad():
        for p in scalers.values():
            p.fill_(value)


def _parse_tasks(spec: str) -> tuple[tuple[str, float], ...]:
    out = []
    for part in spec.split(","):
        name, _, w = part.partition(":")
        out.append((name.strip(), float(w or 1.0)))
    return tuple(out)


def add_base_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--base``, ``--gguf`` and ``--device``: which base model a training or probe CLI loads, and where."""
    p.add_argument("--base", default="default", help="base model: 'default', HF id/folder, or a folder with --gguf")
    p.add_argument("--gguf", default=None, help="GGUF file name inside --base")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA if available; under torchrun, the local rank's GPU)")


def add_names_argument(p: argparse.ArgumentParser) -> None:
    """``--names``: the syllable inventory of made-up names (``training_data.name_syllables``), training and evaluation."""
    p.add_argument("--names", choices=("classic", "wide"), default="classic",
                   help="made-up names from the 24 classic syllables (every run up to session 15), or from ~1,600 syllables "
                        "with another ~1,600 for the held-out split ('wide': a prior over the names helps on neither)")


def add_data_seed_arguments(p: argparse.ArgumentParser) -> None:
    """``--data-seed`` and ``--repeat-data``: which batches a run draws, and whether it may repeat its --init's."""
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the training batches (default: TrainingConfig.seed, 11). Continuing a checkpoint on the same mix "
                        "needs a seed its stages did not use (listed in its data summary's data_history), or it repeats their batches")
    p.add_argument("--repeat-data", action="store_true",
                   help="allow repeating the batches --init was trained on (same mix and data seed): a second epoch on purpose")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train a D2L hypernetwork by context distillation.")
    add_base_model_arguments(p)
    p.add_argument("--tasks", default="needle:1", help="task:weight,... (training_data.make_task names: needle, needle_alone, needle_line, "
                   "needle_essay, needle_para, facts, facts_varied, cloze, text, text_swap, wiki, wiki_swap, wiki_qa, squad, squad_swap, "
                   "targets; suffix /lo-hi = "
                   "chunks summed, +dN = distractor chunks, *k = k questions per document)")
    p.add_argument("--init", default=None, help="start a fresh run from this checkpoint folder (our format) instead of a random network")
    p.add_argument("--out", required=True, help="run folder (state.pt, log.jsonl, and at the end checkpoint/, which D2LEngine.from_pretrained loads); re-running resumes")
    p.add_argument("--minutes", type=float, default=None, help="stop by itself after this many minutes of this process")
    p.add_argument("--steps", type=int, default=None, help="stop at this global step (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per step and process (under torchrun the step's batch is this x N)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-steps", type=int, default=20_000)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--ce-weight", type=float, default=1.0)
    p.add_argument("--bias-dropout", type=float, default=0.0,
                   help="probability that a step trains without the bias LoRA, on the document's adapter alone")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the teacher and student passes (dynamic shapes; default backend inductor); a runtime "
                        "choice, so a run resumes with or without it. On a GPU with --batch-size 64: ~100k tok/s a process "
                        "on an H200 against ~82k eager (training_log.md, session 22); ~90k on an H100 (session 26)")
    p.add_argument("--hypernet-config", default=None, help="JSON of HypernetworkConfig overrides of SMOLLM2_135M_SHAPE")
    p.add_argument("--scaler-b-init", type=float, default=1.0, help="initial scaler_B of a fresh network (0 = published init; it stalls)")
    add_data_seed_arguments(p)
    p.add_argument("--min-tokens", type=int, default=128, help="needle haystack length, nominal tokens")
    p.add_argument("--max-tokens", type=int, default=512)
    add_names_argument(p)
    args = p.parse_args(argv)
    t_start = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from d2l_integrations.engine.checkpoint import save_checkpoint

    tasks = _parse_tasks(args.tasks)
    lengths = {"min_tokens": args.min_tokens, "max_tokens": args.max_tokens, **({"names": args.names} if args.names != "classic" else {})}
    cfg = TrainingConfig(tasks=tasks, batch_size=args.batch_size, lr=args.lr, max_steps=args.max_steps,
                         warmup_steps=args.warmup_steps, ce_weight=args.ce_weight, bias_dropout=args.bias_dropout, top_k=args.top_k,
                         task_kwargs={t: lengths for t, _ in tasks}, data_seed=args.data_seed)
    history = init_history(args.init, cfg, repeat=args.repeat_data)  # refuses a repeat before the base model loads
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.config import HypernetworkConfig
    from d2l_integrations.engine.hypernetwork import Hypernetwork

    data_parallel, device = init_data_parallel(args.device)
    base = load_base_model(args.base, device=device, gguf_file=args.gguf)
    overrides = {**SMOLLM2_135M_SHAPE, **(json.loads(args.hypernet_config) if args.hypernet_config else {})}
    if args.init:
        from d2l_integrations.engine.checkpoint import load_checkpoint

        hyper = load_checkpoint(args.init, base).float().to(base.device).train().requires_grad_(True)
    else:
        hcfg = HypernetworkConfig(num_layers=base.num_layers, hidden_size=base.hidden_size, module_dims=base.module_dims(overrides.pop("targets", ["down_proj"])),
                                  base_model=base.name, base_model_revision=base.revision, scaler_b_init=args.scaler_b_init, **overrides)
        hyper = Hypernetwork(hcfg).to(base.device)  # overwritten by the saved state when resuming
    trainer = DistillationTrainer(base, hyper, cfg, out_dir=args.out, data_parallel=data_parallel, compile=args.compile or False)
    if trainer.maybe_resume():
        logger.info("Resumed from %s at step %d", args.out, trainer.step)
    trainer.precompute_teacher_responses()
    deadline = t_start + 60 * args.minutes if args.minutes else None
    trainer.train(deadline=deadline, max_steps=args.steps)
    if trainer.is_main:  # the loadable checkpoint: D2LEngine.from_pretrained(base, checkpoint=<out>/checkpoint)
        summary = {"init": args.init, "tasks": [list(t) for t in tasks], "steps": trainer.step, "tokens_seen": trainer.tokens_seen,
                   "train_seconds": round(trainer.elapsed_s, 1), "lr": args.lr, "batch_size": args.batch_size * trainer.world_size,
                   **lineage_summary(history, cfg, trainer.step), "code": "d2l train"}
        folder = save_checkpoint(hyper, Path(args.out) / "checkpoint", data_summary=summary, overwrite=True)
        logger.info("Checkpoint at step %d in %s", trainer.step, folder)


if __name__ == "__main__":
    main()
