"""The first steps of a fresh head on a trained encoder: per-step training KL on the same batches per variant (CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.head_start b 30      # b | b_scaler1 | ab

Variants, all on the shipped checkpoint's encoder (``hypernetwork.replace_head``): ``b`` (head_type "b", rank 32, as
built), ``b_scaler1`` (the same with scaler_B = 1, the "ab" design's start), ``ab`` (a fresh "ab" head, rank 8). The
batches come from a fixed seed, so step i of every variant sees the same documents. A cheap check that a new head
trains before GPU time is spent on it; it says nothing about quality after thousands of steps.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from d2l_integrations.engine.base_model import load_base_model
from d2l_integrations.engine.checkpoint import load_checkpoint
from d2l_integrations.engine.engine import shipped_checkpoint_path
from d2l_integrations.engine.hypernetwork import replace_head
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig

TASKS = (("facts_varied/1", 1.0), ("needle_para/1", 0.7), ("text_swap/1", 0.6))
TEACHER_ANSWERS = Path(".stage/ta/teacher_answers.json.gz")  # optional: the GPU runs' cached teacher answers


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    variant, steps = args[0], int(args[1]) if len(args) > 1 else 30
    if variant not in ("b", "b_scaler1", "ab"):
        raise SystemExit(f"Unknown variant {variant!r}; use b, b_scaler1 or ab.")
    torch.set_num_threads(2)
    base = load_base_model("default", device="cpu")
    net = load_checkpoint(shipped_checkpoint_path(base.name), base).float()
    net = replace_head(net, "ab") if variant == "ab" else replace_head(net, "b", rank=32)
    if variant == "b_scaler1":
        with torch.no_grad():
            for scaler in net.scaler_B.values():
                scaler.fill_(1.0)
    net.train().requires_grad_(True)
    kw = {"min_tokens": 128, "max_tokens": 384, "max_paragraphs": 3}
    cfg = TrainingConfig(tasks=TASKS, batch_size=6, lr=3e-4, warmup_steps=5, max_steps=1000, task_kwargs={t: dict(kw) for t, _ in TASKS},
                         eval_every=0, save_every=10**6, log_every=10**6)
    with tempfile.TemporaryDirectory() as work:
        if TEACHER_ANSWERS.is_file():
            (Path(work) / "teacher_answers.json").write_bytes(gzip.decompress(TEACHER_ANSWERS.read_bytes()))
        trainer = DistillationTrainer(base, net, cfg, out_dir=work)
        t0 = time.time()
        kl = [round(trainer.train_step()["kl"], 3) for _ in range(steps)]
    result = {"variant": variant, "steps": steps, "seconds": round(time.time() - t0), "kl_per_step": kl,
              "mean_kl_first5": round(sum(kl[:5]) / len(kl[:5]), 3), "mean_kl_last5": round(sum(kl[-5:]) / len(kl[-5:]), 3)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
