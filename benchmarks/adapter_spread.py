"""Does the hypernetwork's adapter change with what the questions ask about? An adapter-space diagnostic.

For held-out documents of each task, the hypernetwork's document-dependent LoRA delta per layer is
``dW = scaling * B^T A`` (the shared bias LoRA is left out: it is the same for every document). Two
numbers per task, summed over layers:

    spread       share of the deltas' energy that differs between documents:
                 mean_i ||dW_i - mean_j dW_j||^2 / mean_i ||dW_i||^2   (0: one adapter for all documents)
    sensitivity  a minimal pair: the document with its gold answer span replaced by another
                 document's answer (everything else identical), against two different documents:
                 mean_i ||dW(doc_i) - dW(doc_i')|| / mean_i ||dW(doc_i) - dW(doc_{i+1})||
                 (0: the answer span does not move the adapter at all)

A network that reads needles but not prose shows a high needle sensitivity and a low prose one: the
encoder or aggregator does not carry the fact that is asked about into the adapter, whatever the
decoder does with it. ``--control`` adds the same ratio when the same words replace a random other
word of the document instead of the answer: a network that tracks facts moves more for the answer.
``feature sensitivity`` is the same ratio for the base model's features mean-pooled over the chunk
(what the hypernetwork reads), as a reference. These numbers are about the adapter, not about
answers: the diagnostic table of ``train_d2l`` says whether answers follow.

Run (CPU, 2 cores: 5-15 min per checkpoint at --n 24, measured in session 5; --control adds half):
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.adapter_spread --checkpoints d2l_integrations/checkpoints/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from d2l_integrations.engine.base_model import load_base_model
from d2l_integrations.engine.checkpoint import load_internalizer, read_checkpoint_config
from d2l_integrations.engine.hypernetwork import Hypernetwork, HypernetworkInternalizer, encode_context
from d2l_integrations.engine.training_data import TaskMix, make_task

TASKS = ("needle", "needle_para", "facts", "facts_bio", "text", "squad")
EVAL_SEED = 1234


def pairs(task: str, n: int) -> list[tuple[str, str, str]]:
    """``n`` (document, minimal pair, control) from the held-out split. The minimal pair swaps the gold
    answer span for the next example's answer (whole word, every occurrence); the control puts the
    same words in place of one other word of the document, chosen at random, so the two differ only
    in *where* the change is. Examples whose answer is not in their document, or equals the next
    one's, are skipped."""
    examples = TaskMix([(make_task(task, split="eval"), 1.0)], seed=EVAL_SEED).fixed(4 * n)
    rng = random.Random(EVAL_SEED)
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for ex, nxt in zip(examples, examples[1:] + examples[:1], strict=True):
        answer, other = ex.answers[0], nxt.answers[0]
        pattern = re.compile(rf"(?<!\w){re.escape(answer)}(?!\w)")
        spans = [(m.start(), m.end()) for m in pattern.finditer(ex.doc)]
        words = [m for m in re.finditer(r"[A-Za-z]{4,}", ex.doc) if not any(s < m.end() and m.start() < e for s, e in spans)]
        if ex.doc in seen or answer == other or not spans or not words:
            continue
        seen.add(ex.doc)
        w = rng.choice(words)
        out.append((ex.doc, pattern.sub(other, ex.doc), ex.doc[:w.start()] + other + ex.doc[w.end():]))
        if len(out) == n:
            break
    return out


@torch.inference_mode()
def deltas(internalizer, base, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Document-dependent ``dW`` of every document, flattened over layers and modules (``[n, D]``),
    and the base model's features mean-pooled over the chunk's tokens (``[n, L * H]``), both fp32."""
    rows, pooled = [], []
    for doc in docs:
        ids = internalizer.tokenize_chunk(base, doc)
        input_ids = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones_like(input_ids)
        features = encode_context(base, input_ids, mask)  # [1, L, T, H]
        factors = internalizer.hypernetwork(features, mask)
        scaling = internalizer.config.lora_alpha
        parts = [torch.einsum("lrd,lre->led", B[0].float(), A[0].float()).flatten() * scaling for A, B in factors.values()]
        rows.append(torch.cat(parts))
        pooled.append(features[0].float().mean(1).flatten())
    return torch.stack(rows), torch.stack(pooled)


def _ratio(x: torch.Tensor, x_pair: torch.Tensor) -> float:
    """Mean distance to the minimal pair over mean distance to another document."""
    return float((x - x_pair).norm(dim=1).mean() / (x - x.roll(1, 0)).norm(dim=1).mean())


def measure(internalizer, base, task: str, n: int, *, control: bool = False) -> dict:  # noqa: ANN001
    docs = pairs(task, n)
    d, f = deltas(internalizer, base, [a for a, _, _ in docs])
    d_pair, f_pair = deltas(internalizer, base, [b for _, b, _ in docs])
    d_ctrl, f_ctrl = deltas(internalizer, base, [c for _, _, c in docs]) if control else (None, None)
    energy = d.pow(2).sum(1).mean()
    spread = (d - d.mean(0)).pow(2).sum(1).mean() / energy
    with torch.no_grad():
        bias = sum((B.float().transpose(1, 2) @ A.float()).pow(2).sum() for A, B in internalizer.hypernetwork.bias_factors().values())
    bias_norm = float(bias.sqrt() * internalizer.config.lora_alpha) if isinstance(bias, torch.Tensor) else 0.0
    return {"task": task, "n": len(docs), "spread": round(float(spread), 4),
            "sensitivity": round(_ratio(d, d_pair), 4), "feature_sensitivity": round(_ratio(f, f_pair), 4),
            **({"control_sensitivity": round(_ratio(d, d_ctrl), 4), "control_feature_sensitivity": round(_ratio(f, f_ctrl), 4)}
               if control else {}),
            "delta_norm": round(float(energy.sqrt()), 3), "bias_norm": round(bias_norm, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="checkpoint folders to compare; 'random:<folder>' is that folder's architecture freshly initialised")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--n", type=int, default=24, help="documents per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--control", action="store_true",
                   help="also the control: the same words put in place of a random other word (one more pass)")
    p.add_argument("--out", default="", help="JSON output path (optional)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base_model("default", device="cpu")
    results = []
    for folder in args.checkpoints:
        if folder.startswith("random:"):  # what the architecture passes through before any training
            torch.manual_seed(0)
            config = read_checkpoint_config(folder.split(":", 1)[1])[0]
            internalizer = HypernetworkInternalizer(Hypernetwork(config).to(base.device), checkpoint_id="random-init")
        else:
            internalizer = load_internalizer(folder, base)
        for task in args.tasks.split(","):
            t0 = time.time()
            row = {"checkpoint": internalizer.checkpoint_id, **measure(internalizer, base, task, args.n, control=args.control),
                   "seconds": round(time.time() - t0, 1)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\n| checkpoint | task | n | spread | sensitivity (control) | feature sensitivity (control) | ‖dW‖ | ‖bias‖ |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results:
        ctrl = (f" ({r['control_sensitivity']:.3f})", f" ({r['control_feature_sensitivity']:.3f})") if "control_sensitivity" in r else ("", "")
        print(f"| `{r['checkpoint']}` | {r['task']} | {r['n']} | {r['spread']:.3f} | {r['sensitivity']:.3f}{ctrl[0]} | "
              f"{r['feature_sensitivity']:.3f}{ctrl[1]} | {r['delta_norm']:.2f} | {r['bias_norm']:.2f} |")


if __name__ == "__main__":
    main()
