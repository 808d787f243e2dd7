"""Markdown tables of a plan's runs: the greedy table (``eval.json``) and the teacher-forced one (``eval_kl.json``).

Each run is a folder holding the two files (``training_runs/S17w/``, or ``<run>/out/`` as they come back from the
device); a column is named by its folder, or ``NAME=PATH``. The first run is the reference the others are read against.
A run whose JSON tables are missing (stopped, or packed before its evaluation ended) is read from the JSON lines
``train_d2l`` printed to its ``stdout.txt`` (in the folder, or beside its ``out/``): rounded, and the tasks it reached.

    python -m benchmarks.device.summarize S10s2=benchmarks/results/training_runs/S16z /tmp/s18/*/out
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

GREEDY_PAIRS = (("d2l", "mismatched"), ("doc_only", "doc_only_mismatched"))
TF_ROWS = (
    ("key KL bias+doc / none", lambda x: _pair(x, "matched_key_kl", "none_key_kl", "{:.2f}")),
    ("KL doc only / matched", lambda x: _pair(x, "doc_only_kl", "matched_kl", "{:.2f}")),
    ("doc_gain", lambda x: _pm(x, "doc_gain_kl")),
    ("specific gain", lambda x: _pm(x, "specific_gain_kl")),
    ("specific gain, doc only", lambda x: _pm(x, "doc_only_specific_gain_kl")),
)


def _pair(x: dict, a: str, b: str, fmt: str) -> str:
    return f"{fmt.format(x[a])} / {fmt.format(x[b])}" if a in x and b in x else ""


def _pm(x: dict, key: str) -> str:
    """``value ± SE``; the value alone where the run kept no SE (a table rebuilt from a run's stdout)."""
    if key not in x:
        return ""
    return f"{x[key]:.3f} ± {x[key + '_se']:.3f}" if key + "_se" in x else f"{x[key]:.3f}"


def _runs(specs: list[str]) -> dict[str, Path]:
    runs = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        folder = Path(path)
        if not any((folder / f).is_file() for f in ("eval.json", "eval_kl.json")) and not any(_from_stdout(folder)):
            msg = (f"{folder} holds neither eval.json nor eval_kl.json, nor a stdout.txt with evaluation lines: "
                   "give a run's output folder.")
            raise SystemExit(msg)
        label = name or (folder.parent.name if folder.name == "out" else folder.name)
        runs[label] = folder
    return runs


@functools.cache  # one read per run: the check in _runs and both tables ask
def _from_stdout(folder: Path) -> tuple[dict, dict]:
    """``(eval.json, eval_kl.json)`` as far as a run's ``stdout.txt`` printed them (``train_d2l``'s JSON lines)."""
    out = next((f for f in (folder / "stdout.txt", folder.parent / "stdout.txt") if f.is_file()), None)
    greedy: dict = {}
    kl: dict = {}
    for line in out.read_text(errors="replace").splitlines() if out is not None else ():
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row.get("eval"), str):
            greedy[row["eval"]] = {"n": row.get("n"), "accuracy": row.get("accuracy", {}),
                                   **({"score": row["f1"]} if row.get("f1") else {})}
        elif isinstance(row.get("eval_kl"), str):  # "specific_gain" -> "specific_gain_kl", "doc_gain_se" -> "doc_gain_kl_se"
            kl[row["eval_kl"]] = {(f"{k[:-3]}_kl_se" if k.endswith("_se") else f"{k}_kl"): v
                                  for k, v in row.items() if k not in ("eval_kl", "n", "s")}
    return greedy, kl


def _load(folder: Path, name: str) -> dict:
    f = folder / name
    if f.is_file():
        return json.loads(f.read_text())
    return _from_stdout(folder)[0 if name == "eval.json" else 1]


def greedy_table(runs: dict[str, Path]) -> str:
    """Per task: ``d2l / mismatched`` (and ``doc_only / doc_only_mismatched`` where scored), answer-contains %;
    a ``<task> F1`` row where the task has a score."""
    tables = {n: _load(f, "eval.json") for n, f in runs.items()}
    tasks = list(dict.fromkeys(t for tab in tables.values() for t in tab))
    lines = ["| task | " + " | ".join(tables) + " |", "|---" * (len(tables) + 1) + "|"]
    for t in tasks:
        for a, b in GREEDY_PAIRS:
            cells = [_pair(tab[t]["accuracy"], a, b, "{:.1f}") if t in tab else "" for tab in tables.values()]
            if any(cells):
                lines.append(f"| {t}{'' if a == 'd2l' else ' (doc only)'} | " + " | ".join(cells) + " |")
        scores = [_pair(tab[t]["score"], "d2l", "mismatched", "{:.1f}") if "score" in tab.get(t, {}) else "" for tab in tables.values()]
        if any(scores):
            lines.append(f"| {t} F1 | " + " | ".join(scores) + " |")
    return "\n".join(lines)


def teacher_forced_table(runs: dict[str, Path]) -> str:
    """Per task, the rows of ``TF_ROWS`` (empty cells where a run lacks the condition)."""
    tables = {n: _load(f, "eval_kl.json") for n, f in runs.items()}
    tasks = list(dict.fromkeys(t for tab in tables.values() for t in tab))
    lines = ["| task: value | " + " | ".join(tables) + " |", "|---" * (len(tables) + 1) + "|"]
    for t in tasks:
        for label, cell in TF_ROWS:
            cells = [cell(tab[t]) if t in tab else "" for tab in tables.values()]
            if any(cells):
                lines.append(f"| {t}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (eval.json / eval_kl.json), optionally NAME=PATH")
    args = p.parse_args(argv)
    runs = _runs(args.runs)
    print("Greedy (answer-contains %, D2L / mismatched):\n")
    print(greedy_table(runs))
    print("\nTeacher-forced:\n")
    print(teacher_forced_table(runs))


if __name__ == "__main__":
    main()
