"""Do the training mix's tasks pull the hypernetwork apart? Per-group gradients of one checkpoint on its own mix.

Plan s25 asks whether the made-up facts and needles, about half of every lineage mix, hold back what the network
learns on natural text (held-out SQuAD has not moved in 20 runs). This probe asks the cheaper question first, on any
device: on batches of a mix, the hypernetwork gradient of the training loss (KL + ``ce_weight`` x key CE, bias on)
of each *group* of tasks' rows, and the cosines between them.

- ``within`` a group: the cosine between its gradients on two different batches (how consistent a group's own
  direction is; the yardstick for the rest).
- ``across`` two groups: the same between one group's gradient on a batch and the other's on another batch.
- ``summed``: the cosine between the groups' gradients summed over every batch (the mean direction), and between the
  two halves of one group's batches.

A conflict shows as a negative ``across`` (or ``summed``) cosine where ``within`` is positive; ~0 means the groups
ask for unrelated changes (they can still share capacity, which only plan s25's training run answers).

    python -m benchmarks.task_conflict --init .stage/ckpt_s22qn --batches 12 --batch-size 24 \\
        --teacher-answers .stage/ta/teacher_answers.json.gz --tasks "<the plan's --tasks>"

Prints one JSON line a batch and the table at the end. Nothing is written to the checkpoint. ``--shares`` only
counts each task's share of the rows drawn and of the rows the loss keeps (the trainer's own draw and filters).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.recon_probe import _grad_vector
from d2l_integrations.engine.checkpoint import load_checkpoint
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig, _parse_tasks, add_base_model_arguments

# the lineage mixes' tasks: SQuAD alone, the other natural-text tasks, and the made-up ones
DEFAULT_GROUPS = ("squad=squad;natural=squad_swap,wiki,wiki_swap,text_swap,cloze,wiki_qa;"
                  "made_up=facts,facts_varied,facts_bio,needle,needle_para")


def parse_groups(spec: str) -> dict[str, str]:
    """``"a=t1,t2;b=t3"`` -> task base name -> group. A task in two groups is refused."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, tasks = part.partition("=")
        if not name.strip() or not tasks.strip():
            msg = f"Cannot parse group {part!r}: expected 'name=task,task' (e.g. {DEFAULT_GROUPS.split(';')[0]!r})."
            raise ValueError(msg)
        for t in filter(None, (t.strip() for t in tasks.split(","))):
            if t in out:
                msg = f"Task {t!r} is in two groups ({out[t]!r} and {name.strip()!r}): put it in one."
                raise ValueError(msg)
            out[t] = name.strip()
    if not out:
        msg = f"No groups in {spec!r}: give e.g. {DEFAULT_GROUPS!r}."
        raise ValueError(msg)
    return out


def task_base(name: str) -> str:
    """``squad/1-2+d1*5`` -> ``squad`` (an example's ``task`` carries its chunking)."""
    m = re.match(r"[a-z_]+", name)
    return m.group(0) if m else name


def group_gradients(trainer: DistillationTrainer, step: int, groups: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Step ``step``'s batch of the trainer's mix: each group's gradient of its rows' mean training loss (one forward,
    one backward a group), and its row count. Rows of tasks in no group are left out."""
    params = [p for p in trainer.hypernet.parameters() if p.requires_grad]
    drawn = trainer._draw(step, generate=True)  # noqa: SLF001 - the trainer's own batch for this step
    if drawn is None or drawn[4] is None:
        return {}, {}
    batch = drawn[4].to(trainer.device)
    t_logits, feats, mask = trainer.teacher(batch)
    factors = trainer.document_factors(batch, feats, mask)
    parts = trainer.losses(t_logits, trainer.student(batch, factors, bias=True), batch)
    c = trainer.config
    per_row = c.kl_weight * parts["kl"] + c.ce_weight * parts["key_ce"]
    rows: dict[str, list[int]] = {}
    for i, e in enumerate(batch.examples):
        g = groups.get(task_base(e.task))
        if g is not None:
            rows.setdefault(g, []).append(i)
    grads: dict[str, torch.Tensor] = {}
    names = sorted(rows)
    for k, g in enumerate(names):
        trainer.hypernet.zero_grad(set_to_none=True)
        per_row[rows[g]].mean().backward(retain_graph=k < len(names) - 1)
        grads[g] = _grad_vector(params).detach().float().cpu()  # kept on the CPU: one vector a group and batch
    trainer.hypernet.zero_grad(set_to_none=True)
    return grads, {g: len(r) for g, r in rows.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _mean_se(xs: Sequence[float]) -> dict[str, float | int]:
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": round(mean, 4), "se": round(se, 4), "pairs": n}


def conflict_table(per_batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, dict]:
    """The cosines of the module docstring from each batch's group gradients."""
    names = sorted({g for b in per_batch for g in b})
    table: dict[str, dict] = {}
    for a, b in itertools.combinations_with_replacement(names, 2):
        xs = [_cos(per_batch[i][a], per_batch[j][b]) for i, j in itertools.permutations(range(len(per_batch)), 2)
              if a in per_batch[i] and b in per_batch[j] and (a != b or i < j)]
        if xs:
            table[f"{a}|{b}"] = {"kind": "within" if a == b else "across", **_mean_se(xs)}
    summed = {g: sum(b[g] for b in per_batch if g in b) for g in names}
    for a, b in itertools.combinations(names, 2):
        table.setdefault(f"{a}|{b}", {"kind": "across", "pairs": 0})["summed"] = round(_cos(summed[a], summed[b]), 4)
    for g in names:
        have = [b[g] for b in per_batch if g in b]
        if len(have) >= 2:
            half = len(have) // 2
            table[f"{g}|{g}"]["summed_halves"] = round(_cos(sum(have[:half]), sum(have[half:])), 4)
        row = table.setdefault(f"{g}|{g}", {"kind": "within", "pairs": 0})  # a group seen in one batch has no pair
        row["batches"], row["grad_norm"] = len(have), round(sum(float(x.norm()) for x in have) / len(have), 5)
    return table


def row_shares(trainer: DistillationTrainer, batches: int) -> dict[str, dict[str, float]]:
    """Per task base name, its share of the rows drawn and of the rows kept (the loss's rows, after the trainer's own
    filters: empty rows, and wrong teacher answers under ``skip_wrong_teacher``) over ``batches`` batches; no model
    pass beyond any teacher answers missing from the cache."""
    drawn: dict[str, int] = {}
    kept: dict[str, int] = {}
    for step in range(batches):
        for e in trainer.train_data.batch(step, trainer.config.batch_size):  # what _draw draws (a function of the step)
            drawn[task_base(e.task)] = drawn.get(task_base(e.task), 0) + 1
        got = trainer._draw(step, generate=True)  # noqa: SLF001 - the trainer's own filters
        for e in got[1] if got is not None else []:
            kept[task_base(e.task)] = kept.get(task_base(e.task), 0) + 1
    n_d, n_k = sum(drawn.values()), max(1, sum(kept.values()))
    return {t: {"drawn": round(drawn[t] / n_d, 4), "kept": round(kept.get(t, 0) / n_k, 4),
                "kept_over_drawn": round(kept.get(t, 0) / drawn[t], 3)} for t in sorted(drawn)}


def _trainer(base: object, hyper: torch.nn.Module, tasks: Sequence[tuple[str, float]], work: str, *, batches: int, batch_size: int,
             data_seed: int, ce_weight: float, teacher_answers: str | None, task_kwargs: Mapping[str, dict] | None,
             config_kw: Mapping[str, Any] | None) -> DistillationTrainer:
    if teacher_answers:
        raw = Path(teacher_answers).read_bytes()
        (Path(work) / "teacher_answers.json").write_bytes(gzip.decompress(raw) if teacher_answers.endswith(".gz") else raw)
    cfg = TrainingConfig(tasks=tuple(tasks), batch_size=batch_size, warmup_steps=0, max_steps=batches, ce_weight=ce_weight,
                         task_kwargs=dict(task_kwargs or {}), eval_every=0, save_every=0, log_every=0, data_seed=data_seed,
                         prefetch=False, skip_wrong_teacher=True,  # as the runs (launch.sh's COMMON)
                         **dict(config_kw or {}))
    trainer = DistillationTrainer(base, hyper, cfg, out_dir=work)
    trainer.precompute_teacher_responses()  # reads the cached answers (train_d2l does the same before training)
    return trainer


def shares(base: object, hyper: torch.nn.Module, tasks: Sequence[tuple[str, float]], *, batches: int = 100, batch_size: int = 64,
           data_seed: int = 1000, teacher_answers: str | None = None, task_kwargs: Mapping[str, dict] | None = None,
           config_kw: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """``row_shares`` of the mix ``tasks``, drawn as a run with these settings would."""
    with tempfile.TemporaryDirectory() as work:
        trainer = _trainer(base, hyper, tasks, work, batches=batches, batch_size=batch_size, data_seed=data_seed, ce_weight=0.3,
                           teacher_answers=teacher_answers, task_kwargs=task_kwargs, config_kw=config_kw)
        try:
            return row_shares(trainer, batches)
        finally:
            trainer.close()


def probe(base: object, hyper: torch.nn.Module, tasks: Sequence[tuple[str, float]], *, groups: Mapping[str, str], batches: int = 12,
          batch_size: int = 24, data_seed: int = 1000, ce_weight: float = 0.3, teacher_answers: str | None = None,
          task_kwargs: Mapping[str, dict] | None = None, config_kw: Mapping[str, Any] | None = None, on_line: Callable[[dict], None] = lambda d: None) -> dict[str, dict]:
    """Measure ``batches`` batches of the mix ``tasks`` (data seed ``data_seed``: pick one no run trained on); returns
    ``conflict_table``'s dict. ``teacher_answers``: a run's cached teacher answers (json or json.gz), so that rows
    needing them are not generated here. ``config_kw``: more ``TrainingConfig`` fields."""
    if batches < 2 or batch_size < 2:
        msg = f"Need at least 2 batches of at least 2 rows (got {batches} x {batch_size}): cosines compare two batches."
        raise ValueError(msg)
    for p in hyper.parameters():
        p.requires_grad_(True)
    with tempfile.TemporaryDirectory() as work:
        trainer = _trainer(base, hyper, tasks, work, batches=batches, batch_size=batch_size, data_seed=data_seed, ce_weight=ce_weight,
                           teacher_answers=teacher_answers, task_kwargs=task_kwargs, config_kw=config_kw)
        try:
            per_batch, rows = [], {}
            for step in range(batches):
                t0 = time.time()
                grads, counts = group_gradients(trainer, step, groups)
                if grads:
                    per_batch.append(grads)
                for g, n in counts.items():
                    rows[g] = rows.get(g, 0) + n
                on_line({"batch": step, "rows": counts, "s": round(time.time() - t0, 1)})
        finally:
            trainer.close()
    if len(per_batch) < 2:
        msg = "Fewer than 2 batches had rows of a group: check --groups against --tasks."
        raise ValueError(msg)
    table = conflict_table(per_batch)
    for g, n in rows.items():  # the group's share of the loss: its rows
        table[f"{g}|{g}"]["rows"] = n
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--init", required=True, help="hypernetwork checkpoint folder")
    p.add_argument("--tasks", required=True, help="the mix, as train_d2l's --tasks (e.g. a launch.sh plan's)")
    p.add_argument("--groups", default=DEFAULT_GROUPS, help=f"task groups, 'name=task,task;name=...' (default {DEFAULT_GROUPS!r})")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--data-seed", type=int, default=1000, help="a seed no training run used (the lineage used 11-59)")
    p.add_argument("--ce-weight", type=float, default=0.3, help="the runs' --ce-weight")
    p.add_argument("--teacher-answers", default=None, help="a run's cached teacher answers (json or json.gz)")
    p.add_argument("--shares", action="store_true",
                   help="only count each task's share of the rows drawn and kept (no gradients; --batches of --batch-size)")
    p.add_argument("--out", default=None, help="also write the table here (JSON)")
    args = p.parse_args(argv)
    try:
        groups, tasks = parse_groups(args.groups), _parse_tasks(args.tasks)
    except ValueError as e:
        p.error(str(e))
    from d2l_integrations.engine.base_model import load_base_model

    base = load_base_model(args.base, device=args.device, gguf_file=args.gguf)
    hyper = load_checkpoint(args.init, base, allow_other_base=True).float().to(base.device).train()
    kw = {"min_tokens": 128, "max_tokens": 512, "max_paragraphs": 3}  # train_d2l's task arguments
    if args.shares:
        table = shares(base, hyper, tasks, batches=args.batches, batch_size=args.batch_size, data_seed=args.data_seed,
                       teacher_answers=args.teacher_answers, task_kwargs={t: dict(kw) for t, _ in tasks})
        print(json.dumps(table, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "shares": table}, indent=1))
        return
    table = probe(base, hyper, tasks, groups=groups, batches=args.batches, batch_size=args.batch_size, data_seed=args.data_seed,
                  ce_weight=args.ce_weight, teacher_answers=args.teacher_answers, task_kwargs={t: dict(kw) for t, _ in tasks},
                  on_line=lambda d: print(json.dumps(d), flush=True))
    print(json.dumps(table, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "table": table}, indent=1))


if __name__ == "__main__":
    main()
