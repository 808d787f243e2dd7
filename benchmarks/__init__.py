"""Side-by-side benchmarks of base, full_context, rag, d2l, hybrid and auto (see ``benchmarks/run.py``).

    from benchmarks import run_suite
    summary = run_suite("tiny", out_dir="runs/tiny")      # writes rows.jsonl, summary.json, results.md, plots/

``run_suite`` and ``main`` load lazily, so ``python -m benchmarks.run`` imports ``run`` only once.
"""

from typing import Any

__all__ = ["main", "run_suite"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from benchmarks import run

        return getattr(run, name)
    msg = f"module 'benchmarks' has no attribute {name!r}"
    raise AttributeError(msg)
