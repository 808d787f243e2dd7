"""Knowledge-store benchmark: ingest throughput (parse, embed, internalize) and query latency.

Run (CPU, offline; the small run behind benchmarks/results/knowledge_cpu.md):

    HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 ANONYMIZED_TELEMETRY=False UNSTRUCTURED_DISABLE_NOTICE=1 \
        .venv/bin/python benchmarks/knowledge_bench.py --sizes 1000 10000 --internalize-chunks 2 \
        --out benchmarks/results/knowledge_cpu.md

What is measured, per corpus size N (chunks):
  * parse:       unstructured partition of Markdown files + token-aware chunking, chunks/s
  * embed:       all-MiniLM-L6-v2 (packaged) embeddings, chunks/s
  * store:       SQLite catalog + Chroma upserts under the store lock, chunks/s
  * internalize: the engine's internalizer on a few chunks (``adapters_for`` on a lazy store), chunks/s
  * query:       ``KnowledgeBase.search(k=4)`` latency, p50 / p95 over ``--queries`` queries

The corpus is synthetic Markdown: each file has sections of short facts, so every chunk is unique.
The store is built with ``lazy=True`` so ingest time is not dominated by internalization, which is
timed separately on ``--internalize-chunks`` chunks.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# ----------------------------------------------------------------------------- settings
DEFAULT_SIZES = (1000, 10000)
SECTIONS_PER_FILE = 10
FACTS_PER_SECTION = 3
CHUNK_TOKENS = 128  # small chunks so N chunks need little text; production default is 384
QUERIES = 50

logger = logging.getLogger("knowledge_bench")

WORDS = (
    "amber vault sector keeper crate lichen river valley institute archive ledger harbor signal "
    "copper glacier orchard lantern meadow quarry beacon"
).split()


def write_corpus(folder: Path, num_chunks: int, seed: int = 0) -> list[Path]:
    """Markdown files with ~one chunk per section (sections are short, titles split chunks)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    n_files = max(1, num_chunks // SECTIONS_PER_FILE)
    for f in range(n_files):
        parts = []
        for s in range(SECTIONS_PER_FILE):
            parts.append(f"# Sector {f}-{s}")
            for k in range(FACTS_PER_SECTION):
                words = " ".join(rng.choice(WORDS) for _ in range(12))
                parts.append(f"Fact {f}-{s}-{k}: the {words} is recorded with code {rng.randint(0, 10**6)}.")
        path = folder / f"doc{f:05d}.md"
        path.write_text("\n\n".join(parts))
        files.append(path)
    return files


def text_corpus(num_chunks: int, seed: int = 0, facts_per_doc: int = 50) -> list[str]:
    """Plain-text documents of short facts separated by blank lines (no unstructured NLP on this path)."""
    rng = random.Random(seed)
    docs = []
    for d in range(max(1, num_chunks // facts_per_doc)):
        facts = [f"Fact {d}-{k}: the {' '.join(rng.choice(WORDS) for _ in range(6))} has code {rng.randint(0, 10**6)}."
                 for k in range(facts_per_doc)]
        docs.append("\n\n".join(facts))
    return docs


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_size(engine: object, num_chunks: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from d2l_integrations.knowledge import KnowledgeBase

    sources: list[Path] | list[str]
    if args.corpus == "markdown":
        sources = write_corpus(workdir / f"corpus{num_chunks}", num_chunks)
    else:
        sources = text_corpus(num_chunks)
    kb = KnowledgeBase(workdir / f"kb{num_chunks}-{args.corpus}", engine, chunk_tokens=args.chunk_tokens,
                       overlap_tokens=0, lazy=True, batch_size=64, method=args.method)
    t0 = time.perf_counter()
    kb.add(sources, progress=False)
    wall = time.perf_counter() - t0
    stats = kb.last_add_stats
    chunks = stats.chunks
    row: dict[str, float] = {
        "chunks": chunks,
        "docs": stats.documents,
        "parse_cps": chunks / stats.parse_s,
        "embed_cps": chunks / stats.embed_s,
        "store_cps": chunks / stats.store_s,
        "add_wall_s": wall,
    }
    rng = random.Random(1)
    queries = [f"What is recorded about the {rng.choice(WORDS)} {rng.choice(WORDS)} in sector {rng.randint(0, 99)}?"
               for _ in range(args.queries)]
    kb.search(queries[0], k=4)  # warm up
    latencies = []
    for q in queries:
        t = time.perf_counter()
        kb.search(q, k=4)
        latencies.append((time.perf_counter() - t) * 1000)
    row["query_p50_ms"] = statistics.median(latencies)
    row["query_p95_ms"] = percentile(latencies, 0.95)
    if args.internalize_chunks > 0:
        hits = kb.chunks(kb.list()[0].doc_id)[: args.internalize_chunks]
        t = time.perf_counter()
        kb.adapters_for(hits)
        row["internalize_cps"] = len(hits) / (time.perf_counter() - t)
        row["internalized"] = len(hits)
    kb.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--corpus", choices=["markdown", "text"], default="markdown",
                        help="markdown: .md files through unstructured; text: strings of short facts (fast path)")
    parser.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS)
    parser.add_argument("--internalize-chunks", type=int, default=2, help="chunks internalized per size (0: skip)")
    parser.add_argument("--method", default="auto", help="internalization method: auto, hypernetwork, distill")
    parser.add_argument("--distill-max-steps", type=int, default=None, help="cap distill steps per chunk (CPU runs)")
    parser.add_argument("--distill-max-questions", type=int, default=None, help="cap distill questions per chunk")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

    import torch

    from d2l_integrations.engine.engine import D2LEngine

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t = time.perf_counter()
    engine = D2LEngine.default(device="cpu")
    if args.distill_max_steps is not None or args.distill_max_questions is not None:
        from d2l_integrations.engine.distill import DistillConfig

        overrides: dict[str, int] = {}
        if args.distill_max_steps is not None:
            overrides["max_steps"] = args.distill_max_steps
        if args.distill_max_questions is not None:
            overrides.update(max_questions=args.distill_max_questions, about_questions=0)
        engine = D2LEngine(engine.base, engine.hypernetwork, distill_config=DistillConfig(**overrides))
    load_s = time.perf_counter() - t
    internalizer = engine.internalizer(args.method)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="knowledge_bench_"))
    rows = {n: run_size(engine, n, args, workdir) for n in args.sizes}

    lines = [
        "# Knowledge store benchmark (CPU)",
        "",
        "Command:",
        "",
        "```",
        "HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 ANONYMIZED_TELEMETRY=False UNSTRUCTURED_DISABLE_NOTICE=1 \\",
        "    .venv/bin/python " + " ".join(["benchmarks/knowledge_bench.py", *sys.argv[1:]]),
        "```",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at the end "
        f"(shared machine), torch {torch.__version__}, {torch.get_num_threads()} torch threads. Engine: {engine.base.name} ({engine.base.dtype}), loaded in "
        f"{load_s:.1f} s; internalizer `{getattr(internalizer, 'name', args.method)}` "
        f"(`{getattr(internalizer, 'checkpoint_id', None)}`). Chunks of at most {args.chunk_tokens} tokens "
        f"(overlap 0), synthetic {args.corpus} corpus, embedded Chroma, `lazy=True` while ingesting.",
        "",
        "| chunks | docs | parse (chunks/s) | embed (chunks/s) | store (chunks/s) | internalize (chunks/s) | "
        "add wall (s) | query p50 (ms) | query p95 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        internalize = f"{row['internalize_cps']:.3f} (n={int(row['internalized'])})" if "internalize_cps" in row else "-"
        lines.append(
            f"| {int(row['chunks'])} | {int(row['docs'])} | {row['parse_cps']:.0f} | {row['embed_cps']:.0f} | "
            f"{row['store_cps']:.0f} | {internalize} | {row['add_wall_s']:.1f} | {row['query_p50_ms']:.1f} | "
            f"{row['query_p95_ms']:.1f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
