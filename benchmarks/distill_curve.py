"""Accuracy vs seconds per chunk of the ``distill`` internalizer, with controls.

Run (CPU, small sample; ~2 cores):
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.distill_curve split=eval device=cpu
Override any setting below as key=value, e.g.:
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.distill_curve split=dev n_needles=4 budgets=10,20,40

For each document the script distills one LoRA (``DistillInternalizer.distill_chunks`` with
``snapshot_steps=budgets``, early stopping off so every budget is a plain step count) and
answers held-out *natural* questions (never the cloze training questions) greedily under:
    no_context  base model, question only
    full_context  base model, document + question in the prompt (the teacher's view)
    distill@S    base + the document's own LoRA after S steps
    mismatched   base + another document's LoRA (largest budget): must stay ~0
With ``variants`` other than ``free`` (benchmarks.latent_refine), the teacher data is built once and
shared, and the table adds ``hypernetwork`` (the checkpoint's adapter, step 0 of head/warm), its
mismatched control, and ``<variant>@S`` / ``mismatched:<variant>`` per variant:
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.distill_curve split=eval tasks=squad variants=free,head,warm
Tasks and metrics:
    needles  magic-number haystacks (D2L_DATA_DIR/magic_number_niah/test_128_256.jsonl), exact number
    facts    invented biographies (d2l_integrations.engine.synthetic), answer contained in the output
    squad    SQuAD v1.1 dev paragraphs (D2L_DATA_DIR/squad/squad_v1.1_dev_open.jsonl), token F1
Seconds per chunk = teacher (question generation, greedy answers, log-probs) + optimisation up to
the budget, divided by the chunks trained together. ``split=dev`` and ``split=eval`` use disjoint
documents: choose settings on dev, report eval.

Writes benchmarks/results/distill_curve/<run>/{results.json,answers.jsonl,table.md}.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.datasets import EVAL_EXCLUDED_TITLES
from benchmarks.metrics import contains_answer, f1_score, niah_correct
from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel, load_base_model
from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer
from d2l_integrations.engine.lora import LoRAAdapter
from d2l_integrations.engine.synthetic import make_fact_documents
from d2l_integrations.engine.training_data import _read_jsonl

# ----------------------------------------------------------------------------- settings
model = "default"  # SmolLM2-135M-Instruct (embedded GGUF)
device = "cpu"
dtype = "auto"  # bf16 where the CPU has it
threads = 2  # torch threads on CPU (shared machine)
split = "eval"  # "dev" (choose settings) or "eval" (report); disjoint documents
tasks = "needles,facts,squad"
n_needles = 8
n_facts = 6
n_squad = 3  # paragraphs (each with all its questions, at most 4)
budgets = "10,20"  # steps at which the adapter is evaluated (the largest is the training budget)
chunks_per_batch = 4
max_questions = 20
teacher_max_new_tokens = 16
lr = 3e-3
rank = 8
question_style = "cloze"  # or "wh", "context" (questions.build_questions)
held_out_fraction = 0.15  # 0: train on every question (early stopping is off here anyway)
targets = "down_proj"  # comma-separated LoRA target modules
about_questions = 3
lr_schedule = "constant"  # or "cosine" (decays to 0 at the largest budget)
gpu_memory_fraction = 0.0  # cap this process's share of GPU memory (0: no cap), to share one GPU with other jobs
alpha = 16.0
answer_tokens = 24
seed = 0
out_dir = "benchmarks/results/distill_curve"
run_name = ""  # default: <split>-<device>-<timestamp>
variants = "free"  # distillation variants (benchmarks.latent_refine): free (plain), free_proj, head (the hypernetwork's latents), head_ab, head_gain, warm, free_b, rand_b;
#   "head:0.03" sets the latent lr of one variant; "none": only the hypernetwork's conditions
checkpoint = "default"  # hypernetwork for the head/warm variants and the "hypernetwork" condition ("default": the shipped one)
latent_lr = 1e-2  # AdamW lr of the latents (variant head); choose it on split=dev
rand_width = 0  # latent numbers per B column of variant rand_b (0: the hypernetwork's latent_size)
hyper_splits = ""  # e.g. "2,4": also the hypernetwork with each document cut into k chunks, adapters summed ("hypernetwork/k")
# -----------------------------------------------------------------------------
_SETTINGS = [k for k in list(globals()) if not k.startswith("_") and isinstance(globals()[k], (str, int, float))]
for _arg in sys.argv[1:]:  # key=value overrides, typed like the default
    _key, _value = _arg.split("=", 1)
    if _key not in _SETTINGS:
        raise SystemExit(f"Unknown setting {_key!r}; settings are: {', '.join(_SETTINGS)}")
    globals()[_key] = type(globals()[_key])(_value)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("D2L_DATA_DIR", REPO.parent / "shared" / "data"))


def needle_docs(n: int) -> list[dict]:
    """Needle haystacks: dev = rows 0.., eval = rows 500.. of the 128-256 token bin."""
    rows = _read_jsonl(DATA / "magic_number_niah" / "test_128_256.jsonl")
    start = 0 if split == "dev" else 500
    return [{"id": r["id"], "text": r["context"], "questions": [(r["question"], r["answers"])], "metric": "niah"}
            for r in rows[start:start + n]]


def fact_docs(n: int) -> list[dict]:
    """Invented biographies: dev = generator seed 1000+seed, eval = seed."""
    docs = make_fact_documents(n, seed=(1000 + seed) if split == "dev" else seed)
    return [{"id": d.doc_id, "text": d.text, "questions": [(q.question, [q.answer]) for q in d.questions],
             "metric": "contains"} for d in docs]


def squad_docs(n: int) -> list[dict]:
    """SQuAD v1.1 dev paragraphs of 60-160 words; dev = first articles of the file, eval = last ones
    minus ``benchmarks.datasets.EVAL_EXCLUDED_TITLES`` (router calibration, hypernetwork training)."""
    by_para: dict[tuple[str, int], dict] = {}
    for r in _read_jsonl(DATA / "squad" / "squad_v1.1_dev_open.jsonl"):  # or its .gz, as staged on the GPU machine
        key = (r["title"], r["para_index"])
        para = by_para.setdefault(key, {"id": f"{r['title']}-{r['para_index']}", "text": r["context"], "questions": [],
                                        "metric": "f1"})
        para["questions"].append((r["question"], r["answers"]))
    titles = list(dict.fromkeys(t for t, _ in by_para))
    chosen_titles = titles[: len(titles) // 2] if split == "dev" else titles[len(titles) // 2:]
    if split == "eval":  # never report on the router's calibration or the hypernetwork's training articles
        chosen_titles = [t for t in chosen_titles if t not in EVAL_EXCLUDED_TITLES]
    paras = [p for (t, _), p in by_para.items() if t in chosen_titles and 60 <= len(p["text"].split()) <= 160]
    rng = random.Random(seed)
    rng.shuffle(paras)
    picked = paras[:n]
    for p in picked:
        p["questions"] = p["questions"][:4]
    return picked


def score(metric: str, prediction: str, answers: list[str]) -> float:
    if metric == "niah":
        return niah_correct(prediction, answers)
    if metric == "contains":
        return contains_answer(prediction, answers)
    return f1_score(prediction, answers)


@torch.no_grad()
def answer(base: BaseModel, prompts: list[str], adapters: list[LoRAAdapter | None]) -> list[str]:
    """Greedy answers, batched, one adapter (or None) per prompt."""
    outs: list[str] = []
    for b in range(0, len(prompts), 16):
        batch_prompts, batch_adapters = prompts[b:b + 16], adapters[b:b + 16]
        ids = [base.chat_ids([{"role": "user", "content": p}]) for p in batch_prompts]
        width = max(len(i) for i in ids)
        pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else base.eos_token_ids[0]
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(ids):
            input_ids[r, width - len(i):] = torch.tensor(i)
            mask[r, width - len(i):] = 1
        with use_adapters(base.model, batch_adapters):
            out = base.model.generate(input_ids=input_ids.to(base.device), attention_mask=mask.to(base.device),
                                      max_new_tokens=answer_tokens, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, pad_token_id=pad)
        outs.extend(base.tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out)
    return outs


def write_report(folder: Path, run: str, config: DistillConfig, steps: list[int], summary: dict, dtype_name: str) -> None:
    """results.json (everything) and table.md (the curve) for the tasks done so far."""
    settings = {k: globals()[k] for k in _SETTINGS}
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    info = {"settings": settings, "config": config.to_dict(), "device_name": device_name,
            "command": " ".join(sys.argv), "summary": summary}
    (folder / "results.json").write_text(json.dumps(info, indent=2, default=str))
    names = [k for k in next(iter(summary.values()))["accuracy"]] if summary else []
    lines = [f"run `{run}` ({split} split, device {device_name}, dtype {dtype_name}); accuracy (seconds per chunk)", "",
             "| task (metric) | docs/Qs | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for task, t in summary.items():
        cells = []
        for k in names:
            secs = t["seconds_per_chunk"].get(k)
            cells.append(f"{t['accuracy'][k]:.2f}" + (f" ({secs:.1f})" if secs is not None else ""))
        lines.append(f"| {task} ({t['metric']}) | {t['docs']}/{t['questions']} | " + " | ".join(cells) + " |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def run_free(base: BaseModel, distill: DistillInternalizer, docs: list[dict], steps: list[int]) -> tuple[dict, dict, dict]:
    """Plain distillation: conditions (per-document adapters), seconds per chunk, extra summary fields."""
    t0 = time.perf_counter()
    results = distill.distill_chunks(base, [d["text"] for d in docs], snapshot_steps=steps)
    wall = time.perf_counter() - t0
    conditions: dict[str, list[LoRAAdapter | None] | None] = {"no_context": [None] * len(docs), "full_context": None}
    for s in steps:
        conditions[f"distill@{s}"] = [r.snapshots[s][1] if s in r.snapshots else r.adapter for r in results]
    conditions["mismatched"] = [results[(i + 1) % len(docs)].adapter for i in range(len(docs))]
    seconds = {f"distill@{s}": sum(r.snapshots[s][0] for r in results if s in r.snapshots) / len(results) for s in steps}
    extra = {"teacher_seconds_per_chunk": sum(r.teacher_seconds for r in results) / len(results),
             "train_kl": [r.train_kl for r in results], "held_out_kl": [r.held_out_kl for r in results], "wall_seconds": wall}
    return conditions, seconds, extra


def run_variants(base: BaseModel, distill: DistillInternalizer, docs: list[dict], steps: list[int]) -> tuple[dict, dict, dict]:
    """``variants`` on shared teacher data, plus the hypernetwork's own adapters (see benchmarks.latent_refine)."""
    from benchmarks.latent_refine import refine  # noqa: PLC0415 - only this mode needs the hypernetwork
    from d2l_integrations.engine.checkpoint import load_internalizer  # noqa: PLC0415
    from d2l_integrations.engine.engine import shipped_checkpoint_path  # noqa: PLC0415
    from d2l_integrations.engine.lora import compose_adapters  # noqa: PLC0415
    from d2l_integrations.engine.training_data import split_chunks  # noqa: PLC0415

    folder = shipped_checkpoint_path(base.name) if checkpoint == "default" else Path(checkpoint)
    if folder is None:
        raise SystemExit(f"No hypernetwork ships for {base.name}; pass checkpoint=<folder>.")
    hyper = load_internalizer(folder, base)
    texts = [d["text"] for d in docs]
    names = [v for v in variants.split(",") if v.strip() and v.strip() != "none"]
    t0 = time.perf_counter()
    data = [distill._prepare_chunk(base, t, None) for t in texts] if names else []  # noqa: SLF001 - the teacher data every variant shares
    teacher_s = (time.perf_counter() - t0) / len(docs)
    module_paths = distill._module_paths(base)  # noqa: SLF001
    t0 = time.perf_counter()
    own = hyper.internalize_chunks(base, texts)
    conditions: dict[str, list[LoRAAdapter | None] | None] = {
        "no_context": [None] * len(docs), "full_context": None,
        "hypernetwork": list(own), "mismatched:hypernetwork": [own[(i + 1) % len(docs)] for i in range(len(docs))]}
    seconds = {"hypernetwork": (time.perf_counter() - t0) / len(docs)}
    for k in (int(x) for x in hyper_splits.split(",") if x):  # the product path: chunks internalized alone, adapters summed
        conditions[f"hypernetwork/{k}"] = [compose_adapters(hyper.internalize_chunks(base, split_chunks(t, k))) for t in texts]
    train_kl: dict[str, list[tuple[float, float]]] = {}
    for v in names:  # "head:0.03" = variant head at latent_lr 0.03
        name, _, v_lr = v.strip().partition(":")
        t0 = time.perf_counter()
        snaps: dict[int, list[LoRAAdapter]] = {s: [] for s in steps}
        for g in range(0, len(docs), chunks_per_batch):
            out, kl = refine(base, distill.config, data[g:g + chunks_per_batch], module_paths, name, internalizer=hyper,
                         texts=texts[g:g + chunks_per_batch], latent_lr=float(v_lr or latent_lr), snapshot_steps=steps,
                         rand_width=rand_width or hyper.config.latent_size)
            for s in steps:
                snaps[s].extend(out[s])
            train_kl.setdefault(v, []).extend(kl)
        per_step = (time.perf_counter() - t0) / len(docs) / steps[-1]
        for s in steps:
            conditions[f"{v}@{s}"] = snaps[s]
            seconds[f"{v}@{s}"] = teacher_s + per_step * s
        conditions[f"mismatched:{v}"] = [snaps[steps[-1]][(i + 1) % len(docs)] for i in range(len(docs))]
        first, last = (sum(k[j] for k in train_kl[v]) / len(train_kl[v]) for j in (0, 1))
        print(f"{v}: trained, mean training KL {first:.3f} -> {last:.3f}", flush=True)
    return conditions, seconds, {"teacher_seconds_per_chunk": teacher_s, "checkpoint": hyper.checkpoint_id, "train_kl": train_kl}


def main() -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if gpu_memory_fraction and device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)
    steps = sorted(int(s) for s in budgets.split(","))
    base = load_base_model(model, device=device, dtype=dtype)
    config = DistillConfig(
        rank=rank, alpha=alpha, lr=lr, max_steps=steps[-1], patience=0, chunks_per_batch=chunks_per_batch,
        max_questions=max_questions, teacher_max_new_tokens=teacher_max_new_tokens, seed=seed, question_style=question_style,
        held_out_fraction=held_out_fraction, target_modules=tuple(targets.split(",")), about_questions=about_questions,
        lr_schedule=lr_schedule,
    )
    distill = DistillInternalizer(config)
    run = run_name or f"{split}-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = REPO / out_dir / run
    folder.mkdir(parents=True, exist_ok=True)
    loaders = {"needles": (needle_docs, n_needles), "facts": (fact_docs, n_facts), "squad": (squad_docs, n_squad)}
    summary: dict[str, dict] = {}
    answers_log = open(folder / "answers.jsonl", "w")
    for task in tasks.split(","):
        loader, n = loaders[task]
        docs = loader(n)
        conditions, seconds, extra = run_free(base, distill, docs, steps) if variants == "free" else run_variants(base, distill, docs, steps)
        scores: dict[str, list[float]] = defaultdict(list)
        for name, per_doc in conditions.items():
            prompts, adapters, refs = [], [], []
            for i, d in enumerate(docs):
                for q, gold in d["questions"]:
                    prompts.append(f"{d['text']}\n\n{q}" if name == "full_context" else q)
                    adapters.append(None if per_doc is None else per_doc[i])
                    refs.append((d, q, gold))
            for pred, (d, q, gold) in zip(answer(base, prompts, adapters), refs, strict=True):
                s_ = score(d["metric"], pred, gold)
                scores[name].append(s_)
                answers_log.write(json.dumps({"task": task, "doc": d["id"], "condition": name, "question": q,
                                              "gold": gold, "prediction": pred, "score": s_}) + "\n")
        summary[task] = {
            "docs": len(docs),
            "metric": docs[0]["metric"],
            "questions": len(scores["no_context"]),
            "accuracy": {k: sum(v) / len(v) for k, v in scores.items()},
            "seconds_per_chunk": seconds,
            **extra,
        }
        if device.startswith("cuda"):  # what a job sharing the GPU must leave room for
            summary[task]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(task, json.dumps(summary[task]["accuracy"]), "s/chunk", seconds, flush=True)
        answers_log.flush()
        write_report(folder, run, config, steps, summary, str(base.dtype))  # after each task: partial runs keep results
    answers_log.close()
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
