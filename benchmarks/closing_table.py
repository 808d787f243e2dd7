"""Closing-note table of issue #5: 20 questions about documents the base model cannot know, answered
on the ``d2l``, ``rag`` and ``auto`` routes through both integrations, with tokens and latency.

Run (CPU, offline; ~10 minutes on 2 shared cores):

    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false ANONYMIZED_TELEMETRY=False \
        .venv/bin/python -m benchmarks.closing_table --out benchmarks/results/closing_table_cpu.md

    # the same table for another hypernetwork checkpoint (e.g. a newly trained one)
    ... -m benchmarks.closing_table --checkpoint path/to/checkpoint --out benchmarks/results/closing_table_cpu.md

Documents (all invented, so a correct answer must come from the knowledge base):
  * the three shipped samples in ``d2l_integrations/samples/`` and their six questions (questions.json);
  * made-up-fact biographies from ``d2l_integrations.engine.synthetic.make_fact_documents`` (seed
    ``FACTS_SEED``; seeds 0 and 1000 are the eval/dev documents of ``benchmarks/distill_curve.py``),
    two questions each, the fact type rotating, until there are ``--questions`` questions.

Every document goes into one ``KnowledgeBase`` (a temporary folder) on ``D2LEngine.default()`` (or
``D2LEngine.from_pretrained("default", checkpoint=...)``). Each question is then asked on every route
through the public surface of each integration, exactly as a user would:
  * LangChain:  ``ChatD2L(knowledge_base=kb, max_tokens=...).invoke(question, route=route)``
  * LlamaIndex: ``D2LQueryEngine.from_knowledge_base(kb, route=route, max_tokens=...).query(question)``
Both share the knowledge base's engine and decode greedily, so on the same route they should agree.
Correct = a gold answer occurs in the answer (case-insensitive, at word boundaries, after SQuAD
normalisation: ``benchmarks.metrics.contains_answer``). Latency = wall clock of the public call
(``invoke`` / ``query``), retrieval and adapter loading included. One unrecorded warm-up call per
integration runs first. The two integrations alternate going first from question to question.

Writes the markdown table to ``--out`` and every answer, in full, to the same path with ``.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.metrics import contains_answer

# ----------------------------------------------------------------------------- settings
QUESTIONS = 20  # total questions: the six sample questions, then made-up-fact questions
FACTS_SEED = 4242  # make_fact_documents seed; 0 / 1000 are distill_curve's eval / dev documents
QUESTIONS_PER_FACT_DOC = 2  # fact types rotate over the documents (birthplace, year, count, colour, instrument)
MAX_TOKENS = 40  # answer length limit, as in `d2l demo`
ROUTES = ("d2l", "rag", "auto")
THREADS = 1  # torch threads: on a shared 2-core box a second thread mostly spin-waits (pass --threads 2 when quiet)
ANSWER_CHARS = 60  # answers are truncated to this in the markdown (full text in the .jsonl)
# -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "d2l_integrations" / "samples"
INTEGRATIONS = {"langchain": "LangChain `ChatD2L`", "llama_index": "LlamaIndex `D2LQueryEngine`"}

logger = logging.getLogger("closing_table")


@dataclass(frozen=True)
class Question:
    """One question, its gold answers and the document (id) that holds them."""

    qid: str
    question: str
    answers: tuple[str, ...]
    doc_id: str


@dataclass(frozen=True)
class Row:
    """One answer of one integration on one route (a line of the .jsonl)."""

    qid: str
    question: str
    gold: list[str]
    gold_doc: str
    integration: str
    route_asked: str
    route: str
    reason: str
    fallback_from: str | None
    answer: str
    correct: bool
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_saved: int
    latency_s: float
    cpu_s: float
    router_total_s: float
    source_chunk_ids: list[str]
    gold_doc_in_sources: bool


# ----------------------------------------------------------------------------- documents and questions
def sample_documents() -> tuple[list[Path], list[Question]]:
    """The shipped sample files (doc id = file name) and their questions."""
    questions = json.loads((SAMPLES / "questions.json").read_text(encoding="utf-8"))
    paths = sorted({SAMPLES / q["source"] for q in questions})
    return paths, [Question(f"sample-{i}", q["question"], tuple(q["answers"]), q["source"]) for i, q in enumerate(questions)]


def fact_documents(n_questions: int, seed: int) -> tuple[list[Any], list[Question]]:
    """Enough made-up-fact biographies for ``n_questions`` questions, ``QUESTIONS_PER_FACT_DOC`` each."""
    from d2l_integrations.engine.synthetic import make_fact_documents

    n_docs = math.ceil(n_questions / QUESTIONS_PER_FACT_DOC)
    docs = make_fact_documents(n_docs, seed=seed)
    questions = []
    for i, doc in enumerate(docs):
        for j in range(QUESTIONS_PER_FACT_DOC):
            fq = doc.questions[(QUESTIONS_PER_FACT_DOC * i + j) % len(doc.questions)]
            questions.append(Question(f"{doc.doc_id}-{fq.fact}", fq.question, (fq.answer,), doc.doc_id))
    return docs, questions[:n_questions]


# ----------------------------------------------------------------------------- asking
def doc_of(chunk_id: str) -> str:
    """``<doc_id>@<version>#<index>`` -> ``<doc_id>``."""
    return chunk_id.rsplit("@", 1)[0]


def ask_langchain(chat: Any, q: Question, route: str) -> Row:
    t0, c0 = time.perf_counter(), time.process_time()
    message = chat.invoke(q.question, route=route)
    latency, cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = message.response_metadata
    return _row(q, "langchain", route, str(message.content), meta["route_decision"], meta["timings"],
                int(message.usage_metadata["input_tokens"]), int(message.usage_metadata["output_tokens"]),
                int(meta["prompt_tokens_saved"]), latency, cpu)


def ask_llama_index(query_engine: Any, q: Question, route: str) -> Row:
    t0, c0 = time.perf_counter(), time.process_time()
    response = query_engine.query(q.question)
    latency, cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = response.metadata
    return _row(q, "llama_index", route, str(response.response), meta["route_decision"], meta["timings"],
                int(meta["usage"]["prompt_tokens"]), int(meta["usage"]["completion_tokens"]),
                int(meta["prompt_tokens_saved"]), latency, cpu)


def _row(q: Question, integration: str, route: str, answer: str, decision: dict[str, Any], timings: dict[str, float],
         prompt_tokens: int, completion_tokens: int, saved: int, latency: float, cpu: float) -> Row:
    chunk_ids = list(decision["chunk_ids"])
    return Row(
        qid=q.qid, question=q.question, gold=list(q.answers), gold_doc=q.doc_id, integration=integration,
        route_asked=route, route=decision["route"], reason=decision["reason"], fallback_from=decision["fallback_from"],
        answer=answer, correct=bool(contains_answer(answer, q.answers)), prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, prompt_tokens_saved=saved, latency_s=round(latency, 4), cpu_s=round(cpu, 4),
        router_total_s=round(float(timings.get("total_s", 0.0)), 4), source_chunk_ids=chunk_ids,
        gold_doc_in_sources=q.doc_id in {doc_of(c) for c in chunk_ids},
    )


# ----------------------------------------------------------------------------- summary
def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    """Per integration x route: accuracy, mean prompt tokens, p50 latency, routes taken."""
    out = []
    for integration in INTEGRATIONS:
        for route in ROUTES:
            part = [r for r in rows if r.integration == integration and r.route_asked == route]
            if not part:  # a route or integration left out with --routes / --integrations
                continue
            taken = Counter(r.route + (f" (fallback from {r.fallback_from})" if r.fallback_from else "") for r in part)
            out.append({
                "integration": integration,
                "route_asked": route,
                "n": len(part),
                "correct": sum(r.correct for r in part),
                "accuracy": sum(r.correct for r in part) / len(part),
                "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in part),
                "p50_latency_s": statistics.median(r.latency_s for r in part),
                "p50_cpu_s": statistics.median(r.cpu_s for r in part),
                "gold_doc_in_sources": sum(r.gold_doc_in_sources for r in part),
                "routes_taken": dict(sorted(taken.items())),
            })
    return out


def disagreements(rows: list[Row]) -> list[tuple[str, str, Row, Row]]:
    """(qid, route, langchain row, llama_index row) wherever the answer text or the route taken differ."""
    by_key = {(r.qid, r.route_asked, r.integration): r for r in rows}
    out = []
    for (qid, route, integration), lc in by_key.items():
        if integration != "langchain":
            continue
        li = by_key.get((qid, route, "llama_index"))
        if li is not None and (lc.answer, lc.route, lc.fallback_from) != (li.answer, li.route, li.fallback_from):
            out.append((qid, route, lc, li))
    return out


# ----------------------------------------------------------------------------- markdown
def _cell(text: str, limit: int | None = None) -> str:
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _route_cell(r: Row) -> str:
    return f"{r.fallback_from}→{r.route}" if r.fallback_from else r.route


def render(rows: list[Row], questions: list[Question], summary: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        "# Closing table (issue #5): questions about documents the base model cannot know",
        "",
        f"Command: `{info['command']}`",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {info['base_model']} ({info['dtype']}, {info['device']}, torch threads: {info['threads']}) |",
        f"| hypernetwork checkpoint | `{info['checkpoint_id']}` ({info['checkpoint_source']}) |",
        f"| internalizer used by the knowledge base | {info['internalizer']} (method={info['method']!r}) |",
        f"| documents | {info['documents']} |",
        f"| ingest | {info['ingest']} |",
        f"| questions | {info['questions']} |",
        f"| decoding | greedy (temperature 0), at most {info['max_tokens']} new tokens, same for both integrations |",
        f"| router config | {info['router_config']} |",
        "| scoring | a gold answer occurs in the answer (case-insensitive, word boundaries, SQuAD normalisation); lenient: an answer that lists several candidates or states the fact in the wrong relation still counts, so read the answers |",
        "| latency | wall clock of `invoke` / `query` (retrieval, adapter loading, generation); one warm-up call per integration first. CPU s = process CPU time of the call (all threads), less sensitive to other jobs on the machine |",
        f"| load average (1/5/15 min) | start {info['load_start']}, end {info['load_end']} ({info['cpus']} CPUs, shared with other jobs) |",
        f"| machine | {info['machine']} |",
        f"| code | {info['git']} |",
        f"| wall time | {info['wall_s']:.0f} s ({info['date']}) |",
        "",
        "## Summary",
        "",
        "| integration | route asked | correct | accuracy | mean prompt tokens | p50 latency s | p50 CPU s | gold doc in sources | routes taken |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        taken = ", ".join(f"{k} ×{v}" for k, v in s["routes_taken"].items())
        lines.append(
            f"| {INTEGRATIONS[s['integration']]} | {s['route_asked']} | {s['correct']}/{s['n']} | {s['accuracy']:.0%} "
            f"| {s['mean_prompt_tokens']:.1f} | {s['p50_latency_s']:.2f} | {s['p50_cpu_s']:.2f} | {s['gold_doc_in_sources']}/{s['n']} | {taken} |"
        )
    lines.append("")
    diff = disagreements(rows)
    routes = [route for route in ROUTES if any(r.route_asked == route for r in rows)]
    integrations = {k: v for k, v in INTEGRATIONS.items() if any(r.integration == k for r in rows)}
    pairs = len(questions) * len(routes)
    if len(integrations) < 2:
        lines.append(f"**Agreement:** not checked; only {', '.join(integrations.values())} was asked.")
    elif not diff:
        lines.append(f"**Agreement:** on all {pairs} (question, route) pairs the two integrations gave the same answer "
                     "text and took the same route (shared engine, greedy decoding).")
    else:
        lines.append(f"**Disagreement:** the integrations differ on {len(diff)} of {pairs} (question, route) pairs:")
        lines.append("")
        for qid, route, lc, li in diff:
            lines.append(f"- `{qid}` / {route}: LangChain {_route_cell(lc)} {_cell(lc.answer, ANSWER_CHARS)!r} vs "
                         f"LlamaIndex {_route_cell(li)} {_cell(li.answer, ANSWER_CHARS)!r}")
    lines.append("")
    lines.append("\"gold doc in sources\": the document holding the answer is among the chunks whose adapters were "
                 "applied (d2l) or whose text was in the prompt (rag). Prompt tokens are what the model read; "
                 "d2l's prompt is the question alone. "
                 "For `d2l→rag` (auto's confidence fallback) tokens are those of the final RAG prompt, and latency covers both generations.")

    index = {(r.qid, r.integration, r.route_asked): r for r in rows}
    for integration, title in integrations.items():
        lines += ["", f"## Answers through {title}", "", "✓ = correct. Columns per route: answer, route taken, prompt tokens, latency (s).", ""]
        header = ["#", "question", "gold"]
        for route in routes:
            header += [f"{route}: answer", "route", "tok", "s"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for i, q in enumerate(questions, 1):
            cells = [str(i), _cell(q.question), _cell(" / ".join(q.answers))]
            for route in routes:
                r = index[(q.qid, integration, route)]
                mark = "✓" if r.correct else "✗"
                cells += [f"{mark} {_cell(r.answer, ANSWER_CHARS)}", _route_cell(r), str(r.prompt_tokens), f"{r.latency_s:.2f}"]
            lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Route reasons (RouteDecision.reason)", "",
              "Forced routes (every question, both integrations):", ""]
    forced = Counter((r.route_asked, r.reason) for r in rows if r.route_asked != "auto")
    for (route, reason), n in sorted(forced.items()):
        lines.append(f"- {route} ×{n}: {_cell(reason)}")
    if "auto" not in routes or len(integrations) < 2:
        lines.append("")
        return "\n".join(lines)
    lines += ["", "`auto`, per question:", "", "| # | LangChain: route — reason | LlamaIndex: route — reason |", "|---|---|---|"]
    for i, q in enumerate(questions, 1):
        lc, li = index[(q.qid, "langchain", "auto")], index[(q.qid, "llama_index", "auto")]
        lines.append(f"| {i} | {_route_cell(lc)} — {_cell(lc.reason)} | {_route_cell(li)} — {_cell(li.reason)} |")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run
def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _git() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "closing_table_cpu.md",
                        help="markdown output; the raw rows go beside it with the suffix .jsonl")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="hypernetwork checkpoint folder (default: the one shipped for the default model)")
    parser.add_argument("--seed", type=int, default=FACTS_SEED, help="make_fact_documents seed of the made-up-fact documents")
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="number of questions (the six sample questions first)")
    parser.add_argument("--method", default="hypernetwork", choices=["hypernetwork", "auto", "distill", "refine"],
                        help="internalizer of the knowledge base (distill takes minutes per chunk on CPU)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of the routes to ask (e.g. d2l, to compare checkpoints)")
    parser.add_argument("--integrations", default="langchain,llama_index", help="comma-separated subset of langchain,llama_index")
    args = parser.parse_args(argv)
    routes = [r for r in args.routes.split(",") if r]
    integrations = [i for i in args.integrations.split(",") if i]
    if not set(routes) <= set(ROUTES) or not routes or not set(integrations) <= {"langchain", "llama_index"} or not integrations:
        parser.error(f"--routes must be a subset of {','.join(ROUTES)} and --integrations of langchain,llama_index")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv_used = sys.argv[1:] if argv is None else argv
    command = "HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.closing_table " + shlex.join(argv_used)
    load_start, started, date = _load(), time.perf_counter(), time.strftime("%Y-%m-%d %H:%M %Z")
    torch.set_num_threads(args.threads)

    from d2l_integrations.engine.engine import D2LEngine
    from d2l_integrations.knowledge import KnowledgeBase
    from d2l_integrations.langchain import ChatD2L
    from d2l_integrations.llama_index import D2LQueryEngine

    sample_paths, questions = sample_documents()
    if args.questions <= len(questions):
        questions = questions[: args.questions]
        fact_docs: list[Any] = []
    else:
        fact_docs, fact_questions = fact_documents(args.questions - len(questions), args.seed)
        questions += fact_questions

    engine = (D2LEngine.from_pretrained("default", checkpoint=args.checkpoint, device=args.device) if args.checkpoint
              else D2LEngine.default(device=args.device))
    internalizer = engine.internalizer(args.method)
    hypernetwork = engine.hypernetwork
    info: dict[str, Any] = {
        "command": command, "base_model": engine.base.name, "dtype": str(engine.base.dtype), "device": str(engine.base.device),
        "threads": torch.get_num_threads(), "max_tokens": args.max_tokens, "method": args.method,
        "checkpoint_id": getattr(hypernetwork, "checkpoint_id", None),
        "checkpoint_source": str(args.checkpoint) if args.checkpoint else "shipped with the package",
        "internalizer": internalizer.name + (f" `{internalizer.checkpoint_id}`" if getattr(internalizer, "checkpoint_id", None) else ""),
        "cpus": os.cpu_count(), "machine": f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}",
        "git": _git(), "date": date, "load_start": load_start,
    }

    with tempfile.TemporaryDirectory(prefix="closing_table_kb_") as folder:
        kb = KnowledgeBase(folder, engine, method=args.method)
        try:
            t0 = time.perf_counter()
            kb.add(sample_paths, doc_id=[p.name for p in sample_paths], progress=False)
            sample_stats = kb.last_add_stats
            if fact_docs:
                kb.add([d.text for d in fact_docs], doc_id=[d.doc_id for d in fact_docs], progress=False)
            fact_stats = kb.last_add_stats if fact_docs else None
            ingest_s = time.perf_counter() - t0
            chunks = sum(d.num_chunks for d in kb.list())
            internalize_s = sample_stats.internalize_s + (fact_stats.internalize_s if fact_stats else 0.0)
            internalized = sample_stats.internalized + (fact_stats.internalized if fact_stats else 0)
            info["documents"] = (f"{len(sample_paths)} shipped samples ({', '.join(p.name for p in sample_paths)}) + "
                                 f"{len(fact_docs)} made-up-fact biographies (make_fact_documents seed {args.seed}) = "
                                 f"{len(kb)} documents, {chunks} chunks")
            info["ingest"] = f"{ingest_s:.1f} s ({internalized} chunks internalized in {internalize_s:.1f} s)"
            n_sample = sum(q.qid.startswith("sample-") for q in questions)
            info["questions"] = (f"{len(questions)}: {n_sample} from samples/questions.json + {len(questions) - n_sample} "
                                 f"made-up-fact questions ({QUESTIONS_PER_FACT_DOC} per biography, fact type rotating)")

            chat = ChatD2L(knowledge_base=kb, max_tokens=args.max_tokens)
            query_engines = {route: D2LQueryEngine.from_knowledge_base(kb, route=route, max_tokens=args.max_tokens) for route in ROUTES}
            config = query_engines["auto"].router.config
            info["router_config"] = (f"calibration for {config.base_model}: min_relevance={config.min_relevance:g}, "
                                     f"adapter_budget={config.adapter_budget}, top_k={config.top_k}, "
                                     f"min_confidence={config.min_confidence:g}, full_context_max_tokens={config.full_context_max_tokens}")

            chat.invoke(questions[0].question, route="rag")  # warm-up, not recorded
            query_engines["rag"].query(questions[0].question)

            rows: list[Row] = []
            for i, q in enumerate(questions):
                for route in routes:
                    calls = [lambda: ask_langchain(chat, q, route), lambda: ask_llama_index(query_engines[route], q, route)]
                    calls = [c for c, name in zip(calls, ("langchain", "llama_index"), strict=True) if name in integrations]
                    for call in calls if i % 2 == 0 else calls[::-1]:
                        row = call()
                        rows.append(row)
                        print(f"[{i + 1:2d}/{len(questions)}] {row.integration:11s} {route:4s} -> {_route_cell(row):8s} "
                              f"{'✓' if row.correct else '✗'} {row.prompt_tokens:4d} tok {row.latency_s:5.2f} s  "
                              f"{_cell(row.answer, 50)}", flush=True)
        finally:
            kb.close()

    info["load_end"] = _load()
    info["wall_s"] = time.perf_counter() - started
    summary = summarize(rows)
    markdown = render(rows, questions, summary, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown, encoding="utf-8")
    jsonl = args.out.with_suffix(".jsonl")
    jsonl.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(markdown.split("## Answers through")[0])
    print(f"Wrote {args.out} and {jsonl}")
    return {"info": info, "summary": summary, "disagreements": len(disagreements(rows))}


if __name__ == "__main__":
    main()
