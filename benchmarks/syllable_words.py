"""How often a checkpoint answers with a made-up name of its own: the share of greedy answers that hold a word built
from the training names' syllables (``training_data.name_syllables``) that neither the document nor the question has.

Training makes every made-up name from a small syllable inventory (the classic 24). A bias LoRA that learned the
inventory answers real passages in it ("The Lioost of Lioost"): this measures that prior per condition, on held-out
documents (session 15: S10s2's D2L answers on Wikipedia cue questions held such a word 84 % of the time, 0 % without
the bias).

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.syllable_words --checkpoint d2l_integrations/checkpoints/smollm2-135m-instruct \
        --tasks wiki,squad,text --n 64 --out /tmp/syllable_words.json      # ~17 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
from collections.abc import Sequence

import torch

from benchmarks.train_d2l import EVAL_SEED
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig, _generate, add_base_model_arguments
from d2l_integrations.engine.training_data import Example, TaskMix, make_task, name_syllables

CONDITIONS = ("no_context", "d2l", "doc_only")


def made_up_words(text: str, syllables: Sequence[str]) -> set[str]:
    """Lower-cased words of ``text`` made of two or more of ``syllables`` (and nothing else)."""
    return {w.lower() for w in _pattern(tuple(syllables)).findall(text)}


@functools.lru_cache(maxsize=4)
def _pattern(syllables: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(sorted(syllables, key=len, reverse=True)) + r"){2,}\b", re.IGNORECASE)


def own_made_up(answer: str, example: Example, syllables: Sequence[str]) -> bool:
    """Whether ``answer`` holds a made-up word that the document and the question do not."""
    return bool(made_up_words(answer, syllables) - made_up_words(f"{example.doc} {example.question}", syllables))


def score(trainer: DistillationTrainer, examples: Sequence[Example], syllables: Sequence[str], *,
          batch_size: int = 16, max_new_tokens: int = 24) -> dict[str, float]:
    """% of ``examples`` whose greedy answer holds a made-up word of its own, per condition of ``CONDITIONS``."""
    hits = dict.fromkeys(CONDITIONS, 0)
    for i in range(0, len(examples), batch_size):
        rows = list(examples[i:i + batch_size])
        batch = trainer.tokens.batch([e if e.response else dataclasses.replace(e, response=" ") for e in rows], trainer.device)
        with torch.no_grad():
            _, feats, mask = trainer.teacher(batch)
            factors = trainer.document_factors(batch, feats, mask)
            prompts = [trainer.tokens.student_prompt(e.question) for e in rows]
            for cond in CONDITIONS:
                texts = _generate(trainer, prompts, None if cond == "no_context" else factors, cond == "d2l", max_new_tokens)
                hits[cond] += sum(own_made_up(t, e, syllables) for e, t in zip(rows, texts, strict=True))
    return {c: round(100.0 * h / max(1, len(examples)), 1) for c, h in hits.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--checkpoint", required=True, help="hypernetwork checkpoint folder")
    p.add_argument("--tasks", default="wiki,squad,text", help="held-out tasks (training_data.make_task names)")
    p.add_argument("--n", type=int, default=64, help="documents per task")
    p.add_argument("--names", choices=("classic", "wide"), default="classic", help="the inventory the checkpoint was trained on")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import load_checkpoint

    base = load_base_model(args.base, device=args.device, gguf_file=args.gguf)
    hyper = load_checkpoint(args.checkpoint, base, allow_other_base=True).float().to(base.device).eval()
    trainer = DistillationTrainer(base, hyper, TrainingConfig(tasks=(("facts", 1.0),), eval_every=0))
    syllables = name_syllables(args.names, "train")
    table = {}
    for name in [t for t in args.tasks.split(",") if t]:
        task = make_task(name, split="eval", min_tokens=128, max_tokens=512, max_paragraphs=3)
        table[name] = score(trainer, TaskMix([(task, 1.0)], seed=EVAL_SEED).fixed(args.n), syllables)
        print(json.dumps({"task": name, **table[name]}), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
