"""Hypernetwork vs distill on the same held-out documents and questions (decides ``method="auto"``).

Run after a ``benchmarks.distill_curve`` eval run (it reuses that run's documents and its results):

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.compare_internalizers \
        --distill-run benchmarks/results/distill_curve/eval-cpu --out benchmarks/results/internalizers_cpu.md

The hypernetwork is the checkpoint shipped for the default model (``D2LEngine.default()``). Documents,
questions, prompts, greedy decoding and metrics are exactly those of ``distill_curve`` (its loaders
and ``answer``/``score`` functions are imported, with the eval split and the run's seed).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distill-run", type=Path, required=True, help="folder of a distill_curve eval run (results.json)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    distill_results = json.loads((args.distill_run / "results.json").read_text())
    settings = distill_results["settings"]
    import sys

    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # distill_curve reads key=value overrides at import
    try:
        from benchmarks import distill_curve as dc
    finally:
        sys.argv = saved_argv

    for key in ("split", "seed", "answer_tokens", "threads"):
        setattr(dc, key, settings[key])
    torch.set_num_threads(int(settings["threads"]))
    from d2l_integrations.engine.engine import D2LEngine

    engine = D2LEngine.default(device="cpu")
    if engine.hypernetwork is None:
        raise SystemExit("No hypernetwork checkpoint ships for the default model; nothing to compare.")
    base = engine.base
    counts = {"needles": int(settings["n_needles"]), "facts": int(settings["n_facts"]), "squad": int(settings["n_squad"])}
    loaders = {"needles": dc.needle_docs, "facts": dc.fact_docs, "squad": dc.squad_docs}
    rows = []
    summary: dict[str, dict] = {}
    for task in settings["tasks"].split(","):
        if task not in distill_results["summary"]:
            continue
        docs = loaders[task](counts[task])
        t0 = time.perf_counter()
        adapters = engine.internalize_chunks([d["text"] for d in docs], method="hypernetwork")
        per_chunk_s = (time.perf_counter() - t0) / len(docs)
        conditions = {"hypernetwork": adapters, "hypernetwork mismatched": [adapters[(i + 1) % len(docs)] for i in range(len(docs))]}
        scores: dict[str, list[float]] = defaultdict(list)
        for name, per_doc in conditions.items():
            prompts, ads, refs = [], [], []
            for i, d in enumerate(docs):
                for q, gold in d["questions"]:
                    prompts.append(q)
                    ads.append(per_doc[i])
                    refs.append((d, gold))
            for pred, (d, gold) in zip(dc.answer(base, prompts, ads), refs, strict=True):
                scores[name].append(dc.score(d["metric"], pred, gold))
        d_sum = distill_results["summary"][task]
        acc = d_sum["accuracy"]
        best_budget = max(int(k.split("@")[1]) for k in acc if k.startswith("distill@"))
        hyper = sum(scores["hypernetwork"]) / len(scores["hypernetwork"])
        hyper_mm = sum(scores["hypernetwork mismatched"]) / len(scores["hypernetwork mismatched"])
        summary[task] = {
            "docs": len(docs), "questions": len(scores["hypernetwork"]), "metric": d_sum["metric"],
            "no_context": acc["no_context"], "full_context": acc["full_context"],
            "distill": acc[f"distill@{best_budget}"], "distill_mismatched": acc["mismatched"],
            "distill_s_per_chunk": d_sum["seconds_per_chunk"][str(best_budget)] if isinstance(d_sum["seconds_per_chunk"], dict) and str(best_budget) in d_sum["seconds_per_chunk"] else d_sum["seconds_per_chunk"].get(best_budget),
            "distill_steps": best_budget,
            "hypernetwork": hyper, "hypernetwork_mismatched": hyper_mm, "hypernetwork_s_per_chunk": per_chunk_s,
        }
        s = summary[task]
        rows.append(
            f"| {task} ({s['metric']}) | {s['docs']}/{s['questions']} | {s['no_context']:.2f} | {s['full_context']:.2f} | "
            f"{s['distill']:.2f} ({s['distill_s_per_chunk']:.0f} s, {best_budget} steps) | {s['distill_mismatched']:.2f} | "
            f"{s['hypernetwork']:.2f} ({s['hypernetwork_s_per_chunk']:.1f} s) | {s['hypernetwork_mismatched']:.2f} |"
        )
    header = (
        "| task (metric) | docs/Qs | no ctx | full ctx | distill (s/chunk) | distill mism. | hypernetwork (s/chunk) | hypernetwork mism. |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    table = header + "\n" + "\n".join(rows)
    print(table)
    wins = all(s["hypernetwork"] >= s["distill"] for s in summary.values())
    verdict = (
        "hypernetwork >= distill on every task: `prefer_over_distill` may be set" if wins
        else "distill wins at least one task: keep `prefer_over_distill` false"
    )
    print(verdict)
    if args.out:
        cmd = f"HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.compare_internalizers --distill-run {args.distill_run} --out {args.out}"
        args.out.write_text(
            f"# Hypernetwork vs distill on the same held-out documents\n\nCommand: `{cmd}`\n\n"
            f"Distill numbers are read from `{args.distill_run}/results.json` (same documents, questions and decoding).\n"
            f"Checkpoint: `{engine.hypernetwork.checkpoint_id}`.\n\n{table}\n\nVerdict: {verdict}.\n"
        )
    return {"summary": summary, "hypernetwork_wins": wins}


if __name__ == "__main__":
    main()
