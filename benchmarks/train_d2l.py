"""Continue training a D2L hypernetwork (from a shipped checkpoint) and report the diagnostic table.

One resumable run in ``--work`` (state.pt, log.jsonl; re-running the same command resumes), then
the greedy diagnostic table per evaluation task (no-context / full-context / D2L / mismatched /
bias-only, plus SQuAD token F1 where ``--f1-tasks`` says). With ``--export``, the checkpoint in our
format, its weights split into parts small enough for the device tool to bring back
(``cat hypernetwork.safetensors.part* > hypernetwork.safetensors``): written as soon as training
stops, so the weights can be fetched while the evaluation runs, and again with the table at the end.

Task specs are ``training_data.make_task`` names with weights: ``facts_varied/1-4+d2:2`` is the
varied-facts task with documents cut into 1-4 chunks whose adapters are summed, plus up to two
distractor chunks of other documents. Evaluation uses the held-out splits (other essays, other
SQuAD articles, other WikiText-2 articles, other seeds) and never a training document.

    python -m benchmarks.train_d2l --base /root/stage --gguf smol.gguf \\
        --init d2l_integrations/checkpoints/smollm2-135m-instruct --work /root/run --out $OUT \\
        --tasks facts_varied/1-4+d2:2,squad/1-3+d1:2,needle_para/1-4+d1:1 --minutes 8 --export

On several GPUs of one host, the same arguments under ``torchrun --nproc-per-node N -m
benchmarks.train_d2l ...``: one run, data parallel (each step's batch is ``--batch-size x N``),
and the evaluation tasks shared out over the processes; rank 0 writes every file.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.metrics import f1_score
from benchmarks.ship_checkpoint import compact_eval
from d2l_integrations.engine.checkpoint import load_checkpoint, save_checkpoint
from d2l_integrations.engine.training import (
    TF_CONDITIONS,
    DistillationTrainer,
    TrainingConfig,
    _parse_tasks,
    add_base_model_arguments,
    add_data_seed_arguments,
    add_names_argument,
    greedy_eval,
    init_data_parallel,
    init_history,
    lineage_summary,
    teacher_forced_eval,
)
from d2l_integrations.engine.training_data import SQUAD_TRAIN_TITLES, TaskMix, make_task, one_question_per_document

EVAL_CONDITIONS = ("no_context", "full_context", "d2l", "mismatched", "bias_only")
EXTRA_CONDITIONS = ("doc_only", "doc_only_mismatched")  # on request: the document's (another's) adapter without the bias LoRA
EVAL_SEED = 1011  # held-out examples; validation/selection uses other seeds
PART_BYTES = 15 * 2**20


def _max_new_tokens(task: str) -> int:
    if task.startswith("needle"):
        return 16
    if task.startswith(("squad", "facts_bio")):
        return 40
    return 24


def _print_result(name: str, res: dict) -> None:
    """One evaluated task as a JSON line (rounded tables and a few sample answers)."""
    print(json.dumps({"eval": name, "n": res["n"], "accuracy": {k: round(v, 1) for k, v in res["accuracy"].items()},
                      "f1": {k: round(v, 1) for k, v in res.get("score", {}).items()},
                      **({"made_up_recall": {k: round(v, 1) for k, v in res["made_up_recall"].items()}} if "made_up_recall" in res else {}),
                      "samples": res["samples"]}), flush=True)


def _sharded(trainer: DistillationTrainer, tasks: list[str], score: Callable[[str], tuple[str, dict]]) -> dict:
    """``{key: result}`` of ``score(task)`` over ``tasks``, in task order. Data parallel: rank ``r`` scores tasks
    ``r, r + N, ...`` and every rank returns the whole table."""
    table = dict(score(t) for t in tasks[trainer.rank::trainer.world_size])
    if trainer.world_size == 1:
        return table
    parts: list[dict] = [{} for _ in range(trainer.world_size)]
    dist.all_gather_object(parts, table)
    keys = [list(parts[i % trainer.world_size])[i // trainer.world_size] for i in range(len(tasks))]  # task i: rank i mod N
    return {k: parts[i % trainer.world_size][k] for i, k in enumerate(keys)}


def evaluate(trainer: DistillationTrainer, tasks: list[str], *, n: int, f1_tasks: set[str], task_kwargs: dict,
             split: str = "eval", batch_size: int = 32, conditions: Sequence[str] = EVAL_CONDITIONS,
             n_for: dict[str, int] | None = None) -> dict:
    """Greedy diagnostic table per task (``n`` rows, or ``n_for[task]``); ``split="train"`` measures fit on training
    documents (keys ``train:<task>``), which tells memorisation (train high, eval low) from not learning.

    Data parallel: rank ``r`` evaluates tasks ``r, r + N, ...`` and every rank returns the whole
    table, in task order (each task's rows are those a single process would score)."""

    def score(t: str) -> tuple[str, dict]:
        t0 = time.time()
        exs = TaskMix([(make_task(t, split=split, **task_kwargs), 1.0)], seed=EVAL_SEED).fixed((n_for or {}).get(t, n))
        base_name = t.split("/")[0].split("+")[0]
        res = greedy_eval(trainer, exs, batch_size=batch_size, max_new_tokens=_max_new_tokens(t), conditions=conditions,
                          scorer=f1_score if base_name in f1_tasks else None)
        res["seconds"] = round(time.time() - t0, 1)
        key = t if split == "eval" else f"{split}:{t}"
        _print_result(key, res)
        return key, res

    return _sharded(trainer, [one_question_per_document(name) for name in tasks], score)


def evaluate_kl(trainer: DistillationTrainer, tasks: list[str], *, n: int, task_kwargs: dict, batch_size: int = 32) -> dict:
    """Teacher-forced KL table per held-out task (``teacher_forced_eval``, every condition of ``TF_CONDITIONS``):
    a ruler for differences the greedy table cannot resolve (at n = 256 its standard error is ~3 points).
    Data parallel as ``evaluate``."""

    def score(t: str) -> tuple[str, dict]:
        t0 = time.time()
        exs = TaskMix([(make_task(t, split="eval", **task_kwargs), 1.0)], seed=EVAL_SEED).fixed(n)
        res = {k: round(v, 4) for k, v in teacher_forced_eval(trainer, exs, batch_size=batch_size, conditions=TF_CONDITIONS).items()}
        print(json.dumps({"eval_kl": t, "n": n, **{c: res[f"{c}_kl"] for c in TF_CONDITIONS},
                          "doc_gain": res["doc_gain_kl"], "doc_gain_se": res["doc_gain_kl_se"],
                          "specific_gain": res["specific_gain_kl"], "doc_only_specific_gain": res["doc_only_specific_gain_kl"],
                          "specific_gain_se": res["specific_gain_kl_se"], "doc_only_specific_gain_se": res["doc_only_specific_gain_kl_se"],
                          "s": round(time.time() - t0, 1)}), flush=True)
        return t, res

    return _sharded(trainer, [one_question_per_document(name) for name in tasks], score)


def export(hyper: torch.nn.Module, out: Path, *, data_summary: dict, eval_table: dict | None) -> Path:
    """Save a bf16 copy in our checkpoint format, then split the weights into parts."""
    small = copy.deepcopy(hyper).to(torch.bfloat16).cpu()
    folder = save_checkpoint(small, out / "checkpoint", data_summary=data_summary, eval_table=eval_table, overwrite=True)
    weights = folder / "hypernetwork.safetensors"
    blob = weights.read_bytes()
    for i in range(0, len(blob), PART_BYTES):
        (folder / f"hypernetwork.safetensors.part{i // PART_BYTES}").write_bytes(blob[i:i + PART_BYTES])
    weights.unlink()
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--init", required=True,
                   help="checkpoint folder to start from (e.g. d2l_integrations/checkpoints/smollm2-135m-instruct); "
                        "when --work holds a state, its weights replace the checkpoint's")
    p.add_argument("--work", required=True, help="run folder (state.pt, log.jsonl); re-running resumes")
    p.add_argument("--out", required=True, help="where eval.json (and the exported checkpoint) go")
    p.add_argument("--tasks", default="facts_varied/1-4+d2:2,squad/1-3+d1:2,needle_para/1-4+d1:1")
    p.add_argument("--minutes", type=float, default=8.0, help="training time of this call (eval and export come after)")
    p.add_argument("--grow-rank", type=int, default=0,
                   help="fine-tune --init with this larger LoRA rank (hypernetwork.grow_rank: the same adapters to start with)")
    p.add_argument("--grow-latents", type=int, default=0,
                   help="fine-tune --init with this many times the encoder latents (hypernetwork.grow_latents: nearly the same adapters)")
    p.add_argument("--layer-mix", action="store_true",
                   help="fine-tune --init with each layer's Perceiver reading a learned mix of every layer's features "
                        "(HypernetworkConfig.layer_mix, hypernetwork.add_layer_mix: the same adapters at step 0); "
                        "a checkpoint that has the mix keeps it without the flag")
    p.add_argument("--new-head", choices=("ab", "b"), default=None,
                   help="train a new head of this type on --init's encoder (hypernetwork.replace_head; with --grow-rank R, at rank R): "
                        "'b' = learned per-layer A, B rows from per-layer + per-rank maps (HypernetworkConfig.head_type); "
                        "'ab' = a fresh head of the published design (the control)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--ce-weight", type=float, default=1.0,
                   help="weight of the key-token cross-entropy beside the KL (TrainingConfig.ce_weight)")
    p.add_argument("--bias-dropout", type=float, default=0.0,
                   help="probability that a step trains without the bias LoRA, on the document's adapter alone "
                        "(TrainingConfig.bias_dropout)")
    p.add_argument("--anneal-to-deadline", action="store_true",
                   help="end the cosine at the step --minutes is expected to reach, re-estimated from the pace, instead of "
                        "at --max-steps (TrainingConfig.anneal_to_deadline): a stage cut by time ends annealed")
    p.add_argument("--max-steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32, help="documents per step and process (under torchrun the step's batch is this x N)")
    p.add_argument("--eval", default="", help="comma-separated evaluation tasks (held-out split)")
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--eval-n-for", default="", metavar="TASK=N,...",
                   help="greedy rows for some --eval tasks instead of --eval-n (e.g. squad=768: at n = 256 greedy SQuAD F1 has an SE "
                        "of ~0.5, larger than the moves the teacher-forced table shows)")
    p.add_argument("--eval-batch", type=int, default=32,
                   help="documents per evaluation batch (>= 2); multi-chunk tasks encode batch x chunks at once (on CPU, squad/4 "
                        "at 32 took 22 GB: use 8). The answers do not depend on it; the mismatched control pairs each document "
                        "with the next one in its batch")
    p.add_argument("--eval-kl", type=int, default=0,
                   help="also score the --eval tasks teacher-forced on this many held-out documents each (eval_kl.json: KL to the "
                        "teacher, key CE and accuracy, matched / mismatched / bias_only / none / doc_only); 0: off")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every this many steps, log the teacher-forced KL on the held-out split of each training task "
                        "(TrainingConfig.eval_every, eval_size 64: a held-out learning curve in log.jsonl); 0: off")
    p.add_argument("--eval-train", default="", help="comma-separated tasks also scored on their *training* split (fit, not quality)")
    p.add_argument("--eval-conditions", default=",".join(EVAL_CONDITIONS),
                   help="conditions of the diagnostic table; no_context and full_context do not depend on the hypernetwork, so a "
                        "run comparing networks on the same tasks may leave them out (about 40 %% of the evaluation time)")
    p.add_argument("--train-pool", type=int, default=0,
                   help="train on a fixed pool of N documents drawn once from the mix, with all their questions, instead of fresh ones "
                        "(TrainingConfig.train_pool): "
                        "the capacity probe. The evaluation then adds 'pool', the fit on up to --eval-n of the pool's documents")
    add_data_seed_arguments(p)
    add_names_argument(p)
    p.add_argument("--no-prefetch", action="store_true",
                   help="draw and tokenize each batch inside its step (TrainingConfig.prefetch off; for throughput comparisons)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the teacher and student passes (dynamic shapes; default backend inductor): the "
                        "eager step is bound by ~17k operator launches. A runtime choice: a run resumes with or without it")
    p.add_argument("--f1-tasks", default="squad,squad_swap,facts_bio,facts_bio_fresh,cloze")
    p.add_argument("--export", action="store_true")
    p.add_argument("--skip-wrong-teacher", action=argparse.BooleanOptionalAction, default=False,
                   help="drop examples whose teacher answer misses every gold answer (SQuAD training rows: 65 %%); "
                        "the last of --skip-wrong-teacher / --no-skip-wrong-teacher wins (a plan's run may undo the common one)")
    p.add_argument("--teacher-answers", default=None,
                   help="teacher_answers.json(.gz) of an earlier run to seed --work with (skips regenerating them)")
    p.add_argument("--targets", default=None,
                   help="folder of distill target adapters (benchmarks/distill_targets.py) for the 'targets' task")
    p.add_argument("--recon-weight", type=float, default=0.0,
                   help="weight of the reconstruction loss towards the distill targets (rows of the 'targets' task)")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.0,
                   help="cap this process's share of GPU memory (0: no cap). Uncapped, the trainer held 99-121 GB "
                        "of an H200 (session 5) and jobs sharing the GPU ran out of memory; whether it needs that much "
                        "or caches it was not measured")
    args = p.parse_args(argv)
    conditions = tuple(c for c in args.eval_conditions.split(",") if c)
    if not conditions or set(conditions) - set(EVAL_CONDITIONS + EXTRA_CONDITIONS):
        p.error(f"--eval-conditions must name some of {','.join(EVAL_CONDITIONS + EXTRA_CONDITIONS)}, got {args.eval_conditions!r}")
    try:
        # keyed as evaluate() scores them: one question a document, so without a "*k"
        n_for = {one_question_per_document(t): int(k) for t, k in (item.split("=") for item in args.eval_n_for.split(",") if item)}
    except ValueError:
        p.error(f"--eval-n-for takes TASK=N pairs separated by commas (e.g. squad=768), got {args.eval_n_for!r}")
    if unknown := set(n_for) - {one_question_per_document(t) for t in args.eval.split(",") if t}:
        p.error(f"--eval-n-for names tasks that --eval does not evaluate: {sorted(unknown)}; add them to --eval or drop them")
    if args.eval_batch < 2:
        p.error(f"--eval-batch must be >= 2 (the mismatched control pairs documents within a batch), got {args.eval_batch}")
    if args.gpu_memory_fraction and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_fraction)
    t_start = time.time()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    task_kwargs = {"min_tokens": 128, "max_tokens": 512, "max_paragraphs": 3, **({"targets_dir": args.targets} if args.targets else {}),
                   **({"names": args.names} if args.names != "classic" else {})}
    tasks = _parse_tasks(args.tasks)
    cfg = TrainingConfig(tasks=tasks, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                         ce_weight=args.ce_weight,
                         task_kwargs={t: dict(task_kwargs) for t, _ in tasks}, eval_every=args.eval_every, save_every=100, log_every=25,
                         skip_wrong_teacher=args.skip_wrong_teacher, recon_weight=args.recon_weight, train_pool=args.train_pool,
                         data_seed=args.data_seed, prefetch=not args.no_prefetch, bias_dropout=args.bias_dropout,
                         anneal_to_deadline=args.anneal_to_deadline)
    history = init_history(args.init, cfg, repeat=args.repeat_data)  # refuses a repeat before the base model loads
    from d2l_integrations.engine.base_model import load_base_model

    data_parallel, device = init_data_parallel(args.device)
    base = load_base_model(args.base, device=device, gguf_file=args.gguf)
    share = float(os.environ.get("D2L_CUDA_MEMORY_FRACTION", "0") or 0)
    if share and base.device.type == "cuda":  # processes sharing a GPU: each keeps its cache within its share, so one
        torch.cuda.set_per_process_memory_fraction(share, base.device)  # evaluation cannot starve the other (session 19)
    print(f"base loaded in {time.time() - t_start:.1f}s on {base.device}", flush=True)
    hyper = load_checkpoint(args.init, base, allow_other_base=True).float().to(base.device).train()
    if args.new_head:
        from d2l_integrations.engine.hypernetwork import replace_head

        hyper = replace_head(hyper, args.new_head, rank=args.grow_rank or None).float().train()  # encoder kept, head fresh
    elif args.grow_rank:
        from d2l_integrations.engine.hypernetwork import grow_rank

        hyper = grow_rank(hyper, args.grow_rank).train()  # the same adapters at step 0; the new ranks start at B = 0
    if args.grow_latents:
        from d2l_integrations.engine.hypernetwork import grow_latents

        hyper = grow_latents(hyper, args.grow_latents).train()  # each latent repeated (+2 % noise): nearly the same adapters
    if args.layer_mix:
        from d2l_integrations.engine.hypernetwork import add_layer_mix

        hyper = add_layer_mix(hyper).train()  # on hyper's device and dtype; the mix starts at zero: the same adapters
    for prm in hyper.parameters():
        prm.requires_grad_(True)
    cache = Path(args.work) / "teacher_answers.json"
    if args.teacher_answers and not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        raw = Path(args.teacher_answers).read_bytes()
        tmp = cache.with_suffix(f".tmp{os.getpid()}")  # atomic: data-parallel ranks all seed the same file
        tmp.write_bytes(gzip.decompress(raw) if args.teacher_answers.endswith(".gz") else raw)
        os.replace(tmp, cache)
    trainer = DistillationTrainer(base, hyper, cfg, out_dir=args.work, data_parallel=data_parallel, compile=args.compile or False)
    resumed = trainer.maybe_resume()
    print(f"{'resumed at step ' + str(trainer.step) if resumed else 'fresh run from ' + str(args.init)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def data_summary() -> dict:
        return {"init": args.init, **({"grown_to_rank": args.grow_rank} if args.grow_rank else {}),
                **({"new_head": args.new_head} if args.new_head else {}),
                **({"latents_grown_by": args.grow_latents} if args.grow_latents else {}),
                **({"layer_mix": True} if hyper.config.layer_mix else {}),
                **({"train_pool": args.train_pool} if args.train_pool else {}), "tasks": [list(t) for t in tasks], "steps": trainer.step,
                **lineage_summary(history, cfg, trainer.step), "tokens_seen": trainer.tokens_seen,
                "train_seconds": round(trainer.elapsed_s, 1), "lr": args.lr, **({"ce_weight": args.ce_weight} if args.ce_weight != 1.0 else {}),
                **({"bias_dropout": args.bias_dropout} if args.bias_dropout else {}), "skip_wrong_teacher": args.skip_wrong_teacher,
                **({"annealed_to_step": trainer.horizon} if args.anneal_to_deadline else {}),
                **({"names": args.names} if args.names != "classic" else {}), "batch_size": args.batch_size * trainer.world_size,
                **({"processes": trainer.world_size} if trainer.world_size > 1 else {}),
                "squad_train_titles": list(SQUAD_TRAIN_TITLES), "code": "benchmarks/train_d2l.py"}

    if args.minutes > 0:
        t0 = time.time()
        done = trainer.precompute_teacher_responses()
        print(json.dumps({"teacher_answers_generated": done, "cached": len(trainer._teacher_answers), "s": round(time.time() - t0, 1)}), flush=True)
        res = trainer.train(deadline=time.time() + 60 * args.minutes, on_log=lambda d: print(json.dumps(d), flush=True))
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if base.device.type == "cuda" else None
        print(json.dumps({"trained_to_step": res["step"], "elapsed_s": round(res["elapsed_s"], 1), "tokens_seen": trainer.tokens_seen,
                          "peak_gpu_gib": peak}), flush=True)
        if args.export and trainer.is_main:  # the weights first: the evaluation takes minutes, and a machine may go first
            print(f"exported {export(hyper, out, data_summary=data_summary(), eval_table=None)} (before the evaluation)", flush=True)
    table = {}
    # --eval-n 0: only the teacher-forced table (--eval-kl) of the --eval tasks; offtopic_* rows have no gold answer,
    # so they are scored teacher-forced only
    greedy_tasks = [t for t in args.eval.split(",") if t and not t.startswith("offtopic_")]
    if greedy_tasks and args.eval_n > 0:
        table = evaluate(trainer, greedy_tasks, n=args.eval_n, f1_tasks=set(args.f1_tasks.split(",")),
                         task_kwargs=task_kwargs, batch_size=args.eval_batch, conditions=conditions, n_for=n_for)
    kl_table = evaluate_kl(trainer, [t for t in args.eval.split(",") if t], n=args.eval_kl, task_kwargs=task_kwargs,
                           batch_size=args.eval_batch) if args.eval_kl else {}
    if args.eval_train and args.eval_n > 0:
        table.update(evaluate(trainer, [t for t in args.eval_train.split(",") if t], n=args.eval_n,
                              f1_tasks=set(args.f1_tasks.split(",")), task_kwargs=task_kwargs, split="train",
                              batch_size=args.eval_batch, conditions=conditions))
    if args.train_pool and trainer.is_main:  # the fit on the pool itself: scored as the tasks are, contains-accuracy and F1
        docs = trainer.train_data.documents()[:args.eval_n]
        res = greedy_eval(trainer, docs, batch_size=args.eval_batch, max_new_tokens=32, conditions=conditions, scorer=f1_score)
        table["pool"] = res
        _print_result("pool", res)
    if trainer.is_main:  # rank 0 writes the table, the checkpoint and the logs
        if table:
            (out / "eval.json").write_text(json.dumps(table, indent=1))
        if kl_table:
            (out / "eval_kl.json").write_text(json.dumps(kl_table, indent=1))
        if args.export:
            folder = export(hyper, out, data_summary=data_summary(), eval_table=compact_eval(table))
            print(f"exported {folder}", flush=True)
        if cache.is_file():  # bring the teacher answers back so the next machine need not regenerate them
            (out / "teacher_answers.json.gz").write_bytes(gzip.compress(cache.read_bytes()))
        if (Path(args.work) / "log.jsonl").is_file():
            (out / "log.jsonl").write_bytes((Path(args.work) / "log.jsonl").read_bytes())
        print(f"total {time.time() - t_start:.1f}s", flush=True)
    if trainer.world_size > 1:  # the ranks leave together, after rank 0's files are written
        dist.barrier()


if __name__ == "__main__":
    main()
