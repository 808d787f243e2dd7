"""Ship a trained checkpoint as the package default, keeping the record of the one it replaces.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ship_checkpoint .stage/ckpt_s18bW --source "run s18bW, session 17: ..."

A run's exported ``checkpoint/`` (``train_d2l --export``) holds the weights and the run's own evaluation (D2L and its
controls). The checkpoint it replaces (``--shipped``, the package folder by default) carries what a run does not
measure again: the no-context and full-context columns of the same held-out examples, ``prefer_over_distill`` and
``comparison_with_distill``. This copies the new weights into ``--shipped`` with the new run's evaluation, those
columns added per task where the old table has them (held-out examples are fixed by task, split and seed, so they are
the same rows), and the old record of the comparison with ``distill``, its hypernetwork lines marked as measured on
the checkpoint they came from. The weights are loaded and checked against the config's ``checkpoint_id`` first, so
a corrupt or mismatched file is refused before anything is replaced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from d2l_integrations.engine.checkpoint import CONFIG_NAME, WEIGHTS_NAME, compute_checkpoint_id, read_checkpoint_config

SHIPPED = Path(__file__).resolve().parent.parent / "d2l_integrations" / "checkpoints" / "smollm2-135m-instruct"
CARRIED_COLUMNS = ("no_context", "full_context")


def merged_eval(new: dict[str, Any] | None, old: dict[str, Any] | None) -> dict[str, Any]:
    """The new run's table with the old table's ``no_context`` / ``full_context`` cells added where the task and the
    metric exist in both (never overwriting a cell the new run measured)."""
    out = json.loads(json.dumps(new or {}))
    for task, row in out.items():
        old_row = (old or {}).get(task)
        if not isinstance(row, dict) or not isinstance(old_row, dict):
            continue
        for metric in ("accuracy", "f1"):
            if isinstance(row.get(metric), dict) and isinstance(old_row.get(metric), dict):
                for col in CARRIED_COLUMNS:
                    if col in old_row[metric]:
                        row[metric].setdefault(col, old_row[metric][col])
    return out


def compact_eval(table: dict[str, Any]) -> dict[str, Any]:
    """A run's ``out/eval.json`` (``train_d2l``'s greedy table) as a checkpoint's eval table: n, accuracy, F1 per task."""
    return {t: {"n": r["n"], "accuracy": r["accuracy"], **({"f1": r["score"]} if "score" in r else {})} for t, r in table.items()}


def ship(run_checkpoint: Path, shipped: Path, source: str, *, eval_json: Path | None = None) -> dict[str, Any]:
    """Replace ``shipped`` by ``run_checkpoint`` (see the module docstring); returns the new metadata. ``eval_json``:
    the run's ``out/eval.json``, for an export written before the evaluation (``train_d2l --export``'s early copy,
    whose config has no table); refused if the config already has one."""
    from safetensors.torch import load_file

    new_config, _ = read_checkpoint_config(run_checkpoint)  # a clear error if either is not a checkpoint folder
    read_checkpoint_config(shipped)
    new_doc = json.loads((run_checkpoint / CONFIG_NAME).read_text())
    old_doc = json.loads((shipped / CONFIG_NAME).read_text())
    if new_doc["hypernetwork"]["base_model"] != old_doc["hypernetwork"]["base_model"]:
        msg = (f"{run_checkpoint} is for {new_doc['hypernetwork']['base_model']!r}, the shipped folder for "
               f"{old_doc['hypernetwork']['base_model']!r}: ship it into that base model's folder instead.")
        raise ValueError(msg)
    state = load_file(str(run_checkpoint / WEIGHTS_NAME))
    checkpoint_id = compute_checkpoint_id(state, new_config)
    if checkpoint_id != new_doc["metadata"]["checkpoint_id"]:
        msg = (f"{run_checkpoint / WEIGHTS_NAME} hashes to {checkpoint_id}, its config says "
               f"{new_doc['metadata']['checkpoint_id']}: the weights or the config are not the run's; export it again.")
        raise ValueError(msg)
    old_meta, meta = old_doc["metadata"], new_doc["metadata"]
    if eval_json is not None:
        if meta.get("eval"):
            msg = f"{run_checkpoint / CONFIG_NAME} already has its run's evaluation: leave out --eval-json."
            raise ValueError(msg)
        meta["eval"] = compact_eval(json.loads(Path(eval_json).read_text()))
    meta["eval"] = merged_eval(meta.get("eval"), old_meta.get("eval"))
    meta["source"] = source
    meta["replaces"] = old_meta["checkpoint_id"]
    meta["prefer_over_distill"] = old_meta.get("prefer_over_distill", False)
    if "comparison_with_distill" in old_meta:
        comparison = json.loads(json.dumps(old_meta["comparison_with_distill"]))
        comparison["hypernetwork_lines_measured_on"] = old_meta["checkpoint_id"]
        meta["comparison_with_distill"] = comparison
    with tempfile.TemporaryDirectory(dir=shipped.parent) as tmp:  # write both files, then swap them in
        staged = Path(tmp)
        shutil.copyfile(run_checkpoint / WEIGHTS_NAME, staged / WEIGHTS_NAME)
        (staged / CONFIG_NAME).write_text(json.dumps(new_doc, indent=2, sort_keys=True) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            (staged / name).replace(shipped / name)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a run's exported checkpoint folder (config.json + hypernetwork.safetensors)")
    parser.add_argument("--shipped", type=Path, default=SHIPPED, help="the package folder to replace (default: the default model's)")
    parser.add_argument("--source", required=True, help="where the weights come from, for the record (run, session, why chosen)")
    parser.add_argument("--eval-json", type=Path, default=None,
                        help="the run's out/eval.json, when the checkpoint is the export written before the evaluation")
    args = parser.parse_args(argv)
    meta = ship(args.checkpoint, args.shipped, args.source, eval_json=args.eval_json)
    print(json.dumps({"shipped": meta["checkpoint_id"], "replaces": meta["replaces"], "folder": str(args.shipped)}))


if __name__ == "__main__":
    main()
