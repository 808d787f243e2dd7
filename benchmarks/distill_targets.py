"""Make ``distill`` target adapters for the hypernetwork's reconstruction loss (the ``targets`` task).

Draws training documents from a task of ``training_data`` (e.g. ``text_swap``, ``squad``), keeps
the questions the task asks about each, distills every document into a LoRA with ``DistillConfig``
(the GPU preset on CUDA), and writes, into ``--out``:

- ``<target>.safetensors``: the adapter as ``module.A [L, r, d_in]`` / ``module.B [L, r, d_out]``
  (scaling folded into B; ``training.save_target``), ``<target>`` = sha256 of the document;
- ``index.jsonl``: one line per document (``target``, ``doc``, ``questions`` as
  ``[question, answer]`` pairs, ``task``, ``seconds``), appended as blocks finish.

Re-running the same command resumes: documents already in the index are skipped. Then train with
``python -m benchmarks.train_d2l ... --targets <out> --recon-weight 1 --tasks "targets*4:1,..."``.

    python -m benchmarks.distill_targets --base /root/stage --gguf smol.gguf --task text_swap \\
        --n 2000 --questions 8 --out /root/targets --minutes 9
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from d2l_integrations.engine.base_model import BaseModel, load_base_model
from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer
from d2l_integrations.engine.lora import LoRAAdapter
from d2l_integrations.engine.training import add_base_model_arguments, save_target
from d2l_integrations.engine.training_data import _group, make_task

SEED = 2027  # document draws; other seeds than the trainer's (11) and the evaluation's (1011)


def draw_documents(task_name: str, n: int, questions: int, *, seed: int = SEED, **task_kwargs: object) -> list[dict]:
    """``n`` training documents of ``task_name`` with up to ``questions`` questions each, as index rows
    (without ``seconds``); draw ``i`` is a pure function of ``(seed, i)``."""
    task = make_task(task_name, split="train", **task_kwargs)
    rows = []
    for i in range(n):
        group = _group(task, np.random.default_rng([seed, i]), questions if hasattr(task, "sample_group") else 1)
        doc = group[0].doc
        # the gold span: SQuAD rows leave ``key`` for the trainer's teacher to fill, their ``answers`` are gold
        qa = list(dict.fromkeys((e.question, e.key or (e.answers[0] if e.answers else "")) for e in group))
        qa = [(q, a) for q, a in qa if q and a]
        rows.append({"target": hashlib.sha256(doc.encode()).hexdigest()[:20], "doc": doc,
                     "questions": [list(x) for x in qa], "task": task_name})
    return rows


def adapter_factors(adapter: LoRAAdapter, base: BaseModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A ``LoRAAdapter`` as the trainer's factors: ``module -> (A [L, r, d_in], B [L, r, d_out])``."""
    where = {base.module_path(layer, m): (m, layer) for layer in range(base.num_layers)
             for m in {p.rsplit(".", 1)[-1] for p in adapter.weights}}
    per_module: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, w in adapter.weights.items():
        m, layer = where[path]
        per_module.setdefault(m, {})[layer] = (w.lora_A.float(), (w.lora_B.float() * w.scaling).T)
    out = {}
    for m, layers in per_module.items():
        if sorted(layers) != list(range(base.num_layers)):
            msg = f"Target adapters must cover every layer of {m!r}; got layers {sorted(layers)}."
            raise ValueError(msg)
        out[m] = (torch.stack([layers[i][0] for i in range(base.num_layers)]), torch.stack([layers[i][1] for i in range(base.num_layers)]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--task", default="text_swap", help="training_data task the documents come from (train split)")
    p.add_argument("--n", type=int, default=512, help="documents to draw")
    p.add_argument("--seed", type=int, default=SEED, help="draw seed (give parallel processes different seeds and folders)")
    p.add_argument("--questions", type=int, default=8, help="questions kept per document (the trainer asks these)")
    p.add_argument("--min-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--rank", type=int, default=None, help="distill rank (default: the device's preset)")
    p.add_argument("--steps", type=int, default=None, help="distill steps (default: the device's preset)")
    p.add_argument("--block", type=int, default=64, help="documents distilled (and written) together")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after the block that passes this (0: no limit)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.n < 1 or args.questions < 1:
        p.error("--n and --questions must be >= 1")
    t_start = time.time()
    base = load_base_model(args.base, device=args.device, gguf_file=args.gguf)
    config = DistillConfig.for_device(base.device)
    overrides = {k: v for k, v in (("rank", args.rank), ("max_steps", args.steps)) if v is not None}
    if overrides:
        config = DistillConfig.from_dict({**config.to_dict(), **overrides})
    distill = DistillInternalizer(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.jsonl"
    done = {json.loads(line)["target"] for line in index.open()} if index.is_file() else set()
    rows = [r for r in draw_documents(args.task, args.n, args.questions, seed=args.seed, min_tokens=args.min_tokens,
                                      max_tokens=args.max_tokens)
            if r["target"] not in done and r["questions"]]
    rows = list({r["target"]: r for r in rows}.values())  # a document drawn twice is distilled once
    print(json.dumps({"device": str(base.device), "config": config.to_dict(), "to_do": len(rows), "already": len(done)}), flush=True)
    written = 0
    for start in range(0, len(rows), args.block):
        if args.minutes and time.time() - t_start > 60 * args.minutes:
            break
        block = rows[start:start + args.block]
        t0 = time.time()
        results = distill.distill_chunks(base, [r["doc"] for r in block])
        seconds = (time.time() - t0) / len(block)
        with index.open("a") as f:
            for r, res in zip(block, results, strict=True):
                save_target(out / f"{r['target']}.safetensors", adapter_factors(res.adapter, base))
                f.write(json.dumps({**r, "seconds": round(seconds, 2)}) + "\n")
        written += len(block)
        print(json.dumps({"written": written, "of": len(rows), "s_per_doc": round(seconds, 2),
                          "elapsed_s": round(time.time() - t_start, 1)}), flush=True)
    print(json.dumps({"done": written, "left": len(rows) - written, "index": str(index)}), flush=True)


if __name__ == "__main__":
    main()
