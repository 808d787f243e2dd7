"""Where a training step's operator calls go: the host-side cost that bounds the step on the GPU.

Session 13 found the GPU 34 % busy during training on one H100 (36k tok/s): each operator is a kernel launch (or
dispatcher work) on the host, and a 135M model with 30 layers makes many small ones. This counts them per phase of one
``DistillationTrainer.train_step`` with ``torch.profiler`` on the CPU: leaf ``aten::`` calls under the data draw, the
teacher pass (with the chunks it reads), the hypernetwork, the student pass, the losses, the backward pass and the
optimizer. The count does not depend on the device; what each costs does. On CUDA some are free (views) and the
optimizer is fused (a few kernels, where the CPU count lists every tensor).

    python -m benchmarks.step_ops --init d2l_integrations/checkpoints/smollm2-135m-instruct --batch-size 8 \\
        [--tasks <mix>] [--data-seed 12] [--teacher-answers run/teacher_answers.json.gz] [--steps 2]

Prints one JSON line per profiled step (after one warm-up step).

``--time`` measures where a step's time goes instead: per phase, the host's milliseconds (profiler overhead included)
and the milliseconds of GPU kernels the phase launched, and for the whole step the wall time and the share of it the
GPU spent in kernels. A phase whose kernels take far less than its host time is bound by the host (launches, Python,
guards): CUDA graphs would pay there; one whose kernels fill its time is bound by the GPU. On an H100:

    python -m benchmarks.step_ops --base /root/stage --gguf smol.gguf --device cuda --init d2l_integrations/checkpoints/smollm2-135m-instruct \
        --batch-size 64 --compile --warmup 6 --time --teacher-answers .stage/ta/teacher_answers.json.gz
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from d2l_integrations.engine.checkpoint import load_checkpoint
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig, _parse_tasks, add_base_model_arguments

PHASES = {"_draw": "data", "teacher": "teacher", "chunk_features": "teacher", "generate_factors": "hypernetwork",
          "student": "student", "losses": "losses"}
S10S2_MIX = ("facts_varied/1:1.0,facts_varied/2-4+d1*3:0.4,facts/1:0.3,facts/2-4+d1:0.25,needle_para/1-4+d1:0.7,"
             "needle/1-4:0.4,text_swap/1-2+d1*8:0.6,squad_swap/1-2+d1*5:1.2")


def _labelled(fn: Callable, label: str) -> Callable:
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with record_function("phase:" + label):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def _phases_labelled(trainer: DistillationTrainer) -> Iterator[None]:
    """The trainer's phases (``PHASES``, and the optimizer's step) run under ``record_function("phase:...")``."""
    for name, label in PHASES.items():
        setattr(trainer, name, _labelled(getattr(type(trainer), name).__get__(trainer), label))
    trainer.optimizer.step = _labelled(type(trainer.optimizer).step.__get__(trainer.optimizer), "optimizer")
    try:
        yield
    finally:
        for name in [*PHASES, "step"]:
            (trainer.optimizer if name == "step" else trainer).__dict__.pop(name, None)


def _label(event: object) -> str:
    """The phase an event ran under: the nearest ``phase:`` range above it, "backward" under the autograd engine."""
    label, parent = "other", event.cpu_parent
    while parent is not None:
        if parent.name.startswith("phase:"):
            return parent.name.removeprefix("phase:")
        if parent.name.startswith("autograd::engine"):
            label = "backward"
        parent = parent.cpu_parent
    return label


def count_step_ops(trainer: DistillationTrainer) -> dict[str, int]:
    """Leaf ``aten::`` calls of one ``train_step``, per phase ("other": outside every phase)."""
    with _phases_labelled(trainer), profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    counts: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in event.cpu_children):
            counts[_label(event)] += 1
    return dict(counts)


def time_step_phases(trainer: DistillationTrainer) -> dict:
    """Where one ``train_step``'s time goes: ``{"wall_ms", "kernel_ms", "gpu_busy", "phases": {phase: {"host_ms",
    "kernel_ms"}}}``. A phase's host time is its range on the calling thread; "backward" sums the autograd engine's
    outermost functions (on CUDA they run on the engine's own thread). Kernel times are 0 on the CPU."""
    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with _phases_labelled(trainer), profile(activities=activities) as prof:
        sync()
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        wall_ms = (time.perf_counter() - t0) * 1000
    phases: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"host_ms": 0.0, "kernel_ms": 0.0})
    events = prof.events()
    for event in events:
        if not event.name.startswith(("phase:", "autograd::engine")) or _label(event) != "other":
            continue  # only the outermost ranges: a phase or backward function nested in another is counted there
        label = "backward" if event.name.startswith("autograd::engine") else event.name.removeprefix("phase:")
        phases[label]["host_ms"] += event.cpu_time_total / 1000
        phases[label]["kernel_ms"] += event.device_time_total / 1000
    kernel_ms = sum(k.duration for event in events for k in event.kernels) / 1000
    return {"wall_ms": round(wall_ms, 2), "kernel_ms": round(kernel_ms, 2), "gpu_busy": round(kernel_ms / wall_ms, 3),
            "phases": {k: {m: round(v, 2) for m, v in d.items()} for k, d in phases.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--init", required=True, help="checkpoint folder")
    p.add_argument("--tasks", default=S10S2_MIX)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-seed", type=int, default=12)
    p.add_argument("--teacher-answers", default=None, help="teacher_answers.json(.gz) of a run (else they are generated)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="steps before the profiled ones (compiled: ~6, until shapes recompile no more)")
    p.add_argument("--compile", action="store_true", help="the trainer's compiled passes (train_d2l --compile)")
    p.add_argument("--time", action="store_true", help="host and GPU-kernel milliseconds per phase, not operator counts")
    args = p.parse_args(argv)
    from d2l_integrations.engine.base_model import load_base_model

    base = load_base_model(args.base, device=args.device or "cpu", gguf_file=args.gguf)
    hyper = load_checkpoint(args.init, base, allow_other_base=True).float().to(base.device).train().requires_grad_(True)
    tasks = _parse_tasks(args.tasks)
    kw = {"min_tokens": 128, "max_tokens": 512, "max_paragraphs": 3}
    cfg = TrainingConfig(tasks=tasks, batch_size=args.batch_size, task_kwargs={t: dict(kw) for t, _ in tasks}, skip_wrong_teacher=True,
                         data_seed=args.data_seed, prefetch=False, eval_every=0, save_every=10**9)
    with tempfile.TemporaryDirectory() as work:
        if args.teacher_answers:
            raw = Path(args.teacher_answers).read_bytes()
            (Path(work) / "teacher_answers.json").write_bytes(gzip.decompress(raw) if args.teacher_answers.endswith(".gz") else raw)
        trainer = DistillationTrainer(base, hyper, cfg, out_dir=work, compile=args.compile)
        trainer.precompute_teacher_responses()
        for _ in range(args.warmup):
            trainer.train_step()
        for _ in range(args.steps):
            step, head = trainer.step, {"rows": args.batch_size, "device": str(base.device), "compiled": args.compile}
            if args.time:
                print(json.dumps({"step": step, **head, **time_step_phases(trainer)}), flush=True)
                continue
            counts = count_step_ops(trainer)
            print(json.dumps({"step": step, **head, "leaf_aten_ops": counts, "total": sum(counts.values())}), flush=True)


if __name__ == "__main__":
    main()
