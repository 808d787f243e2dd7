"""From per-question rows to the summary, the markdown tables and the PNG plots of a run folder.

Aggregation rules (so the table reads the same way for every method):
- ``score`` is token F1 for QA tasks and exact-number accuracy for NIAH tasks, averaged over
  questions. A question a method *cannot* answer (``over_context``: the prompt exceeds the model's
  context window) scores 0. A question a method *did not* attempt (``skipped``: e.g. its document
  was over the suite's internalize budget) is left out of that method's score and counted.
- Costs (tokens, latency, memory, $) are over answered questions only.
- ``$/1k q (tokens)`` prices each query's prompt and completion tokens at API-style rates;
  ``$/1k q (compute)`` prices the measured seconds at this hardware's hourly rate.
- Break-even = one-off internalize cost per document / per-query saving versus a baseline, on the
  questions both methods answered; "never" when D2L saves nothing per query.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.metrics import (
    break_even_queries,
    compute_cost_usd,
    mean,
    percentile,
    score_prediction,
    token_cost_usd,
)

logger = logging.getLogger(__name__)

MAIN_METHODS = ("base", "full_context", "rag", "d2l", "hybrid", "auto")
BASELINES = ("full_context", "rag")


def score_rows(rows: list[dict[str, Any]]) -> None:
    """Add ``em``, ``f1``, ``contains``, ``score`` (and ``niah``) to every row, in place."""
    for r in rows:
        r.update(score_prediction(r.get("prediction", ""), r["answers"], r["kind"]))


# ----------------------------------------------------------------------------- summary
def _method_stats(rows: list[dict[str, Any]], prices: dict, device: str) -> dict[str, Any]:
    attempted = [r for r in rows if r["status"] != "skipped"]
    ok = [r for r in rows if r["status"] == "ok"]
    qa = [r for r in attempted if r["kind"] == "qa"]
    niah = [r for r in attempted if r["kind"] == "niah"]
    ptok, ctok = mean([r["prompt_tokens"] for r in ok]), mean([r["completion_tokens"] for r in ok])
    lat = [r["latency_s"] for r in ok]
    out = {
        "n": len(rows),
        "answered": len(ok),
        "over_context": sum(r["status"] == "over_context" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "score": mean([r["score"] for r in attempted]),
        "em": mean([r["em"] for r in qa]),
        "f1": mean([r["f1"] for r in qa]),
        "contains": mean([r["contains"] for r in qa]),
        "niah_acc": mean([r["niah"] for r in niah]),
        "prompt_tokens": ptok,
        "completion_tokens": ctok,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile([r["ttft_s"] for r in ok], 50),
        "n_adapters": mean([r["n_adapters"] for r in ok if r["n_adapters"]]),
    }
    out["usd_per_1k_q_tokens"] = 1000 * token_cost_usd(ptok, ctok, prices) if ok else None
    out["usd_per_1k_q_compute"] = 1000 * compute_cost_usd(mean(lat), prices, device) if ok else None
    routes = defaultdict(int)
    for r in rows:
        routes[r["route"]] += 1
    out["routes"] = dict(routes)
    return out


def _break_even(rows: list[dict[str, Any]], docs: dict[str, dict], method: str, baseline: str, prices: dict, device: str) -> dict[str, Any]:
    """Queries per document after which ``method``'s one-off internalize cost is repaid versus ``baseline``."""
    by = defaultdict(dict)
    for r in rows:
        by[r["id"]][r["method"]] = r
    pairs = [(v[method], v[baseline]) for v in by.values() if v.get(method, {}).get("status") == "ok" and v.get(baseline, {}).get("status") == "ok"]
    doc_s = [d["internalize_s"] for d in docs.values() if d["status"] == "ok"]
    if not pairs or not doc_s:
        return {"pairs": len(pairs), "queries_tokens": None, "queries_compute": None, "note": "no paired answers or no internalized document"}
    one_off_s = mean(doc_s)
    m_tok = mean([token_cost_usd(a["prompt_tokens"], a["completion_tokens"], prices) for a, _ in pairs])
    b_tok = mean([token_cost_usd(b["prompt_tokens"], b["completion_tokens"], prices) for _, b in pairs])
    m_lat, b_lat = mean([a["latency_s"] for a, _ in pairs]), mean([b["latency_s"] for _, b in pairs])
    return {
        "pairs": len(pairs),
        "internalize_s_per_doc": one_off_s,
        "internalize_usd_per_doc": compute_cost_usd(one_off_s, prices, device),
        "prompt_tokens_saved_per_query": mean([b["prompt_tokens"] - a["prompt_tokens"] for a, b in pairs]),
        "seconds_saved_per_query": b_lat - m_lat,
        # one-off compute $ repaid by token-priced savings (API-style serving of the baseline)
        "queries_tokens": break_even_queries(compute_cost_usd(one_off_s, prices, device), m_tok, b_tok),
        # one-off seconds repaid by seconds saved per query (self-hosted on this hardware)
        "queries_compute": break_even_queries(one_off_s, m_lat, b_lat),
    }


def summarize(rows: list[dict[str, Any]], doc_costs: list[dict], peak: dict[str, int], prices: dict, run: dict[str, Any]) -> dict[str, Any]:
    """Everything the tables and plots need, as a JSON-able dict."""
    device = run["device"]
    main = [r for r in rows if r["method"] in MAIN_METHODS]
    methods = [m for m in MAIN_METHODS if any(r["method"] == m for r in main)]
    docs = {d["doc_id"]: d for d in doc_costs}
    per_method = {}
    for m in methods:
        stats = _method_stats([r for r in main if r["method"] == m], prices, device)
        stats["peak_memory_mb"] = peak[m] / 2**20 if m in peak else None
        per_method[m] = stats
    tasks = list(dict.fromkeys(r["task"] for r in main))
    per_task = {t: {m: _method_stats([r for r in main if r["method"] == m and r["task"] == t], prices, device) for m in methods} for t in tasks}
    ok_docs = [d for d in doc_costs if d["status"] == "ok"]
    internalize = {
        "internalizer": run.get("internalizer"),
        "docs": len(doc_costs),
        "internalized": len(ok_docs),
        "skipped": sum(d["status"] == "skipped" for d in doc_costs),
        "failed": sum(d["status"] == "failed" for d in doc_costs),
        "internalize_s_per_doc": mean([d["internalize_s"] for d in ok_docs]),
        "internalize_s_per_chunk": (sum(d["internalize_s"] for d in ok_docs) / sum(d["n_chunks"] for d in ok_docs)) if ok_docs else None,
        "adapter_bytes_per_doc": mean([d["adapter_bytes"] for d in ok_docs]),
        "adapter_bytes_per_chunk": (sum(d["adapter_bytes"] for d in ok_docs) / sum(d["n_chunks"] for d in ok_docs)) if ok_docs else None,
    }
    break_even = {
        m: {b: _break_even(main, docs, m, b, prices, device) for b in BASELINES if b in methods}
        for m in ("d2l", "hybrid", "auto") if m in methods
    }
    niah = defaultdict(lambda: defaultdict(dict))
    for r in main:
        if r["task"] == "essay_niah":
            cell = r["score"] if r["status"] != "skipped" else None
            niah[r["method"]][str(r["meta"]["length_tokens"])][str(r["meta"]["depth"])] = {"score": cell, "status": r["status"]}
    sweep = defaultdict(list)
    for r in rows:
        if r["method"] == "d2l_sum" and r["status"] == "ok":
            sweep[r["sweep_n"]].append(r["score"])
    return {
        "run": run,
        "prices": prices,
        "methods": per_method,
        "tasks": per_task,
        "internalize": internalize,
        "break_even": break_even,
        "niah_grid": {m: dict(v) for m, v in niah.items()},
        "adapter_sweep": {str(n): {"score": mean(s), "n": len(s)} for n, s in sorted(sweep.items())},
    }


# ----------------------------------------------------------------------------- markdown
def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _money(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.4f}" if x >= 0.001 else f"{x:.2e}"


def _queries(x: float | None) -> str:
    return "never" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def markdown(summary: dict[str, Any]) -> str:
    run, methods, intern = summary["run"], summary["methods"], summary["internalize"]
    lines = [
        f"# Benchmark `{run['suite']}`: {run['base_model']} on {run['device']} ({run['dtype']})",
        "",
        f"- questions: {run['n_questions']} per method, tasks: {', '.join(run['tasks'])}; same questions, model and process for every method",
        f"- d2l internalizer: **{run['internalizer'] or 'not run'}**"
        + (f" (checkpoint `{run['internalizer_checkpoint']}`)" if run.get("internalizer_checkpoint") else "")
        + ("" if run.get("hypernetwork_loaded") else " (no hypernetwork checkpoint is loaded for this model, so D2L adapters come from per-document distillation)"),
        *([f"- distill budget: max_steps {run['distill_config']['max_steps']}, max_questions {run['distill_config']['max_questions']}, "
            f"batch_size {run['distill_config']['batch_size']}, rank {run['distill_config']['rank']} (the `full` suite uses the engine default)"]
          if run.get("distill_config") else []),
        f"- context window {run['context_window']} tokens; chunks of {run['chunk_tokens']} tokens; rag top-k {run['router']['top_k']}; "
        f"adapter budget {run['router']['adapter_budget']}; router calibrated: {run['router']['calibrated']}"
        + (f"; answers through `{run['router']['answers_via']}`" if run["router"].get("answers_via") else ""),
        f"- wall time {run['wall_s']:.0f} s; host: {run['host']['cpus']} CPUs, torch threads {run['host']['torch_threads']}"
        + (f", load average {run['host']['loadavg_start'][0]} at start and {run['host']['loadavg_end'][0]} at end (other processes share the CPUs and inflate timings)"
           if run["host"].get("loadavg_start") and run["host"].get("loadavg_end") else ""),
    ]
    if run.get("command"):
        lines.append(f"- command: `{run['command']}`")
    lines += [
        "",
        "## Per method",
        "",
        "score = token F1 on QA, exact-number accuracy on NIAH; a question the method cannot fit in the context window scores 0. "
        "EM, F1 and contains (a reference inside the answer; lenient with chatty small models) are over QA questions.",
        "",
        "| method | n | answered | over ctx | skipped | score | EM | F1 | contains | NIAH acc | prompt tok | p50 s | p95 s | TTFT p50 s | peak MB | $/1k q tokens | $/1k q compute |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in methods.items():
        lines.append(
            f"| {m} | {s['n']} | {s['answered']} | {s['over_context']} | {s['skipped']} | {_f(s['score'])} | {_f(s['em'])} | {_f(s['f1'])} | "
            f"{_f(s['contains'])} | {_f(s['niah_acc'])} | {_f(s['prompt_tokens'], 0)} | {_f(s['latency_p50_s'])} | {_f(s['latency_p95_s'])} | {_f(s['ttft_p50_s'])} | "
            f"{_f(s['peak_memory_mb'], 0)} | {_money(s['usd_per_1k_q_tokens'])} | {_money(s['usd_per_1k_q_compute'])} |"
        )
    lines += [
        "",
        "## One-off cost of D2L (per document)",
        "",
        f"internalizer **{intern['internalizer'] or '–'}**: {intern['internalized']} of {intern['docs']} documents internalized "
        f"({intern['skipped']} over the suite's budget, {intern['failed']} failed); "
        f"{_f(intern['internalize_s_per_doc'], 1)} s per document, {_f(intern['internalize_s_per_chunk'], 1)} s per chunk; "
        f"adapter storage {_f((intern['adapter_bytes_per_doc'] or 0) / 2**20, 2)} MiB per document "
        f"({_f((intern['adapter_bytes_per_chunk'] or 0) / 2**20, 2)} MiB per chunk)."
        if intern["docs"] else "d2l was not run.",
        "",
    ]
    if summary["break_even"]:
        lines += [
            "## Break-even: queries per document before the one-off internalize cost is repaid",
            "",
            "| method | vs | paired q | prompt tok saved/q | s saved/q | queries (token prices) | queries (compute time) |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, per in summary["break_even"].items():
            for b, be in per.items():
                lines.append(
                    f"| {m} | {b} | {be['pairs']} | {_f(be.get('prompt_tokens_saved_per_query'), 0)} | {_f(be.get('seconds_saved_per_query'))} | "
                    f"{_queries(be['queries_tokens']) if be['pairs'] else '–'} | {_queries(be['queries_compute']) if be['pairs'] else '–'} |"
                )
        lines.append("")
    tasks = summary["tasks"]
    if tasks:
        names = list(methods)
        lines += ["## Score per task", "", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for t, per in tasks.items():
            cells = []
            for m in names:
                s = per[m]
                note = []
                if s["over_context"]:
                    note.append(f"{s['over_context']} over ctx")
                if s["skipped"]:
                    note.append(f"{s['skipped']} skipped")
                cells.append(_f(s["score"]) + (f" ({', '.join(note)})" if note else ""))
            lines.append(f"| {t} (n={next(iter(per.values()))['n']}) | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["adapter_sweep"]:
        lines += ["## d2l score vs number of summed chunk adapters (multidoc: gold first, then distractors)", "",
                  "| adapters | " + " | ".join(summary["adapter_sweep"]) + " |", "|---|" + "---|" * len(summary["adapter_sweep"]),
                  "| score | " + " | ".join(_f(v["score"]) for v in summary["adapter_sweep"].values()) + " |", ""]
    auto = methods.get("auto")
    if auto:
        lines += [f"auto routes: {', '.join(f'{k} {v}' for k, v in sorted(auto['routes'].items()))}.", ""]
    p = summary["prices"]
    lines += [f"Prices (benchmarks/prices.json): ${p['prompt_usd_per_1k_tokens']}/1k prompt tokens, ${p['completion_usd_per_1k_tokens']}/1k completion tokens, "
              f"${p['cpu_usd_per_hour']}/CPU-hour, ${p['gpu_usd_per_hour']}/GPU-hour.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots
def plot_all(summary: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Write the four PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    methods = summary["methods"]
    out: list[Path] = []

    # 1. accuracy vs prompt tokens
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (m, s) in enumerate(methods.items()):
        if s["prompt_tokens"] is None:
            continue
        ax.scatter(s["prompt_tokens"], s["score"] or 0.0, s=60)
        # staggered labels: methods often share a point (same prompt, same score)
        ax.annotate(m, (s["prompt_tokens"], s["score"] or 0.0), textcoords="offset points", xytext=(6, 6 - 11 * (i % 3)), fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("mean prompt tokens per query (log)")
    ax.set_ylabel("score (F1 on QA, exact number on NIAH)")
    ax.set_title("score vs prompt tokens")
    ax.grid(alpha=0.3)
    out.append(_save(fig, plot_dir / "accuracy_vs_prompt_tokens.png"))

    # 2. latency bars
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [m for m, s in methods.items() if s["latency_p50_s"] is not None]
    p50 = [methods[m]["latency_p50_s"] for m in names]
    p95 = [methods[m]["latency_p95_s"] for m in names]
    ttft = [methods[m]["ttft_p50_s"] for m in names]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], p50, width=0.4, label="latency p50")
    ax.bar([i + 0.2 for i in x], ttft, width=0.4, label="time to first token p50")
    ax.scatter(list(x), p95, marker="_", s=300, color="black", label="latency p95", zorder=3)
    ax.set_xticks(list(x), names, rotation=20)
    ax.set_ylabel("seconds")
    ax.set_title(f"latency per query ({summary['run']['device']})")
    ax.legend()
    out.append(_save(fig, plot_dir / "latency.png"))

    # 3. NIAH heatmap by depth x length
    grid = summary["niah_grid"]
    if grid:
        names = [m for m in methods if m in grid]
        fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names) + 1, 3), squeeze=False)
        for ax, m in zip(axes[0], names, strict=True):
            lengths = sorted(grid[m], key=int)
            depths = sorted({d for v in grid[m].values() for d in v}, key=float)
            vals = [[(grid[m][L].get(d) or {}).get("score") for L in lengths] for d in depths]
            ax.imshow([[v if v is not None else float("nan") for v in row] for row in vals], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, d in enumerate(depths):
                for j, L in enumerate(lengths):
                    cell = grid[m][L].get(d) or {}
                    label = {"over_context": "ctx", "skipped": "skip"}.get(cell.get("status"), _f(cell.get("score"), 1))
                    ax.text(j, i, label, ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), lengths, rotation=30, fontsize=7)
            ax.set_yticks(range(len(depths)), depths, fontsize=7)
            ax.set_title(m, fontsize=9)
            ax.set_xlabel("haystack tokens", fontsize=8)
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle("essay NIAH accuracy (ctx = over the context window, skip = not internalized)", fontsize=9)
        out.append(_save(fig, plot_dir / "niah_heatmap.png"))

    # 4. score vs number of summed chunk adapters
    sweep = summary["adapter_sweep"]
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ns = [int(n) for n in sweep]
        ax.plot(ns, [sweep[str(n)]["score"] for n in ns], marker="o")
        ax.set_xticks(ns)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("chunk adapters summed (gold + distractors)")
        ax.set_ylabel("F1")
        ax.set_title("d2l vs number of summed adapters")
        ax.grid(alpha=0.3)
        out.append(_save(fig, plot_dir / "adapters_sweep.png"))
    return out


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run folder
def write_run(run_dir: Path, rows: Sequence[dict], doc_costs: Sequence[dict], summary: dict[str, Any]) -> None:
    """rows.jsonl, documents.jsonl, summary.json, results.md and plots/ in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "rows.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True) + "\n")
    with open(run_dir / "documents.jsonl", "w", encoding="utf-8") as fh:
        for d in doc_costs:
            fh.write(json.dumps(d, sort_keys=True) + "\n")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    md = markdown(summary)
    try:
        plots = plot_all(summary, run_dir / "plots")
    except ImportError as err:  # a machine without matplotlib still keeps the run; the plots come from rebuild()
        logger.warning("No plots (%s): draw them later with benchmarks.report.rebuild(%r)", err, str(run_dir))
        md += f"\n## Plots\n\nNot drawn ({err}); `python -c \"from benchmarks import report; report.rebuild('{run_dir}')\"` draws them.\n"
    else:
        md += "\n## Plots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    (run_dir / "results.md").write_text(md, encoding="utf-8")


def rebuild(run_dir: str | Path) -> dict[str, Any]:
    """Re-summarize a finished run folder from its rows (after a change to the tables); no model runs."""
    run_dir = Path(run_dir)
    old, rows = load_run(run_dir)
    with open(run_dir / "documents.jsonl", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh if line.strip()]
    peak = {m: int(s["peak_memory_mb"] * 2**20) for m, s in old["methods"].items() if s.get("peak_memory_mb") is not None}
    score_rows(rows)
    summary = summarize(rows, docs, peak, old["prices"], old["run"])
    write_run(run_dir, rows, docs, summary)
    return summary


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and rows of a finished run folder."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    with open(run_dir / "rows.jsonl", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return summary, rows


__all__ = ["load_run", "markdown", "plot_all", "rebuild", "score_rows", "summarize", "write_run"]
