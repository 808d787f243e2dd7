"""Calibrate the ``auto`` router's thresholds on dev data, and write them as a RouterConfig JSON.

    HF_HUB_OFFLINE=1 D2L_DATA_DIR=../shared/data .venv/bin/python benchmarks/calibrate_router.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrate_router.py --titles Normans Geology --paragraphs 12 \
        --out d2l_integrations/routing/calibration/huggingfacetb--smollm2-135m-instruct.json

Data: SQuAD v1.1 dev paragraphs of the ``--titles`` articles (never the evaluation articles: the
JSON records which titles were used, and evaluation must exclude them; never the hypernetwork's
training articles ``training_data.SQUAD_TRAIN_TITLES``: refused). Nothing is copied into the
repository; the data is read from ``$D2L_DATA_DIR`` (default ``../shared/data``).

What is measured, per question (its gold paragraph is one document of a fresh KnowledgeBase):
  1. retrieval: the gold chunk's score and the best other chunk's score -> ``min_relevance`` is the
     threshold that best separates them (balanced accuracy);
  2. D2L vs RAG: the answer with the gold chunk's adapter (and its mean token log-prob) and the
     answer with the gold text in the prompt, each scored against the SQuAD answers ->
     ``min_confidence`` is the log-prob threshold that maximises the accuracy of "D2L if confident,
     else RAG" (ties go to the lower threshold: more D2L, more prompt tokens saved);
  3. adapter budget: D2L accuracy with the gold adapter summed with k-1 adapters of other
     paragraphs, k = 1..``--max-budget`` -> the largest k whose accuracy stays within
     ``--budget-tolerance`` of k = 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

# ----------------------------------------------------------------------------- settings
# TITLES = ("Normans", "Geology")   # calibration articles (not in any evaluation set)
# PARAGRAPHS = 8                     # documents (one SQuAD paragraph each)
# QUESTIONS_PER_PARAGRAPH = 2
# MAX_BUDGET = 3                     # largest number of summed chunk adapters tried
# MAX_NEW_TOKENS = 24
# ----------------------------------------------------------------------------- settings

logger = logging.getLogger("calibrate_router")


def normalize(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def correct(prediction: str, answers: Sequence[str]) -> bool:
    """A gold answer appears in the prediction, or token F1 >= 0.5 with one."""
    norm = normalize(prediction)
    return any(normalize(a) and normalize(a) in norm for a in answers) or max((f1(prediction, a) for a in answers), default=0.0) >= 0.5


def load_paragraphs(data_dir: Path, titles: Sequence[str], paragraphs: int, per_paragraph: int) -> list[dict]:
    """``[{"doc_id", "context", "questions": [{"question", "answers"}]}]`` from SQuAD v1.1 dev."""
    path = data_dir / "squad" / "squad_v1.1_dev_open.jsonl"
    if not path.is_file():
        msg = f"{path} not found. Set D2L_DATA_DIR to the folder holding squad/squad_v1.1_dev_open.jsonl."
        raise SystemExit(msg)
    grouped: dict[tuple[str, object], dict] = {}
    with path.open() as fh:
        for line in fh:
            row = json.loads(line)
            if row["title"] not in titles or not row["answers"]:
                continue
            key = (row["title"], row.get("para_index"))
            entry = grouped.setdefault(key, {"doc_id": f"{row['title']}-{row.get('para_index')}", "context": row["context"], "questions": []})
            if len(entry["questions"]) < per_paragraph:
                entry["questions"].append({"question": row["question"], "answers": row["answers"]})
    by_title: dict[str, list[dict]] = defaultdict(list)
    for (title, _), entry in grouped.items():
        by_title[title].append(entry)
    picked: list[dict] = []
    while len(picked) < paragraphs and any(by_title.values()):  # round-robin over titles
        for title in titles:
            if by_title[title] and len(picked) < paragraphs:
                picked.append(by_title[title].pop(0))
    return picked


def best_threshold(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Threshold t maximising balanced accuracy of ``score >= t`` (positives above, negatives below)."""
    candidates = sorted(set(positives) | set(negatives))
    best, best_acc = candidates[0] if candidates else 0.0, -1.0
    for t in candidates:
        tpr = sum(p >= t for p in positives) / max(1, len(positives))
        tnr = sum(n < t for n in negatives) / max(1, len(negatives))
        if (tpr + tnr) / 2 > best_acc:
            best, best_acc = t, (tpr + tnr) / 2
    return float(best)


def confidence_threshold(rows: Sequence[dict]) -> tuple[float, float]:
    """(threshold, accuracy) of the policy 'D2L answer if mean log-prob >= t, else the RAG answer'."""
    candidates = sorted({r["d2l_logprob"] for r in rows}) + [float("inf")]
    best_t, best_acc = candidates[0], -1.0
    for t in candidates:
        acc = sum(r["d2l_correct"] if r["d2l_logprob"] >= t else r["rag_correct"] for r in rows) / len(rows)
        if acc > best_acc + 1e-12:  # strictly better only: ties keep the lower t (more D2L)
            best_t, best_acc = t, acc
    if best_t == float("inf"):  # RAG always better: a threshold above every observed log-prob
        best_t = max(r["d2l_logprob"] for r in rows) + 1e-3
    return float(best_t), float(best_acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("D2L_DATA_DIR", "../shared/data")))
    parser.add_argument("--titles", nargs="+", default=["Normans", "Geology"])
    parser.add_argument("--paragraphs", type=int, default=8)
    parser.add_argument("--questions-per-paragraph", type=int, default=2)
    parser.add_argument("--max-budget", type=int, default=3)
    parser.add_argument("--budget-tolerance", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--method", default="auto", help="internalization method: auto, hypernetwork or distill")
    parser.add_argument("--device", default=None)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / "calibrate_router" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--out", type=Path, default=None, help="where to write the RouterConfig JSON (default: RUN_DIR/router.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from d2l_integrations.engine.engine import D2LEngine
    from d2l_integrations.engine.lora import compose_adapters
    from d2l_integrations.engine.training_data import SQUAD_TRAIN_TITLES
    from d2l_integrations.knowledge import KnowledgeBase
    from d2l_integrations.routing import RouterConfig

    trained_on = sorted(set(args.titles) & set(SQUAD_TRAIN_TITLES))
    if trained_on:  # the hypernetwork has seen these articles: its confidence there would be optimistic
        parser.error(f"--titles {trained_on} are hypernetwork training articles (SQUAD_TRAIN_TITLES); calibrate on others (default: Normans Geology).")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = load_paragraphs(args.data_dir, args.titles, args.paragraphs, args.questions_per_paragraph)
    logger.info("Calibrating on %d paragraphs of %s", len(paragraphs), args.titles)
    engine = D2LEngine.default(device=args.device)
    kb = KnowledgeBase(args.run_dir / "kb", engine, method=args.method)
    t0 = time.perf_counter()
    kb.add([p["context"] for p in paragraphs], doc_id=[p["doc_id"] for p in paragraphs])
    internalize_s = time.perf_counter() - t0
    logger.info("Indexed and internalized in %.0f s", internalize_s)

    settings = {"max_new_tokens": args.max_new_tokens}
    template = RouterConfig().context_template
    rows: list[dict] = []
    gold_scores: list[float] = []
    other_scores: list[float] = []
    chunk_of = {p["doc_id"]: kb.chunks(p["doc_id"]) for p in paragraphs}
    for p in paragraphs:
        gold_chunks = chunk_of[p["doc_id"]]
        for q in p["questions"]:
            hits = kb.search(q["question"], k=8)
            gold = [h.score for h in hits if h.doc_id == p["doc_id"]]
            other = [h.score for h in hits if h.doc_id != p["doc_id"]]
            if gold:
                gold_scores.append(max(gold))
            if other:
                other_scores.append(max(other))
            messages = [{"role": "user", "content": q["question"]}]
            d2l = engine.generate(messages, adapters=kb.adapters_for(gold_chunks), **settings)
            context = "\n\n".join(f"[{i + 1}] {c.text}" for i, c in enumerate(gold_chunks))
            rag = engine.generate([{"role": "user", "content": template.format(context=context, question=q["question"])}], adapters=None, **settings)
            rows.append({
                "doc_id": p["doc_id"], "question": q["question"], "answers": q["answers"],
                "d2l": d2l.text, "d2l_logprob": d2l.mean_logprob, "d2l_correct": correct(d2l.text, q["answers"]),
                "rag": rag.text, "rag_correct": correct(rag.text, q["answers"]),
            })
            logger.info("%s | d2l=%s (%.2f) rag=%s", q["question"][:60], rows[-1]["d2l_correct"], d2l.mean_logprob, rows[-1]["rag_correct"])

    budget_acc: dict[int, float] = {}
    for k in range(1, args.max_budget + 1):
        hits = 0
        for i, row in enumerate(rows):
            others = [d for d in chunk_of if d != row["doc_id"]]
            distractors = [others[(i + j) % len(others)] for j in range(k - 1)] if others else []
            adapter = compose_adapters([kb.adapters_for(chunk_of[row["doc_id"]]), *(kb.adapters_for(chunk_of[d]) for d in distractors)])
            out = engine.generate([{"role": "user", "content": row["question"]}], adapters=adapter, **settings)
            hits += correct(out.text, row["answers"])
        budget_acc[k] = hits / len(rows)
        logger.info("adapter budget k=%d: D2L accuracy %.3f", k, budget_acc[k])
    floor = budget_acc[1] * (1 - args.budget_tolerance)
    adapter_budget = max(k for k, acc in budget_acc.items() if acc >= floor or k == 1)

    min_relevance = best_threshold(gold_scores, other_scores)
    min_confidence, auto_acc = confidence_threshold(rows)
    n = len(rows)
    config = RouterConfig(
        min_relevance=round(min_relevance, 4),
        min_confidence=round(min_confidence, 4),
        adapter_budget=adapter_budget,
        base_model=engine.base.name,
        calibrated_on=(
            f"squad_v1.1_dev_open titles={list(args.titles)} paragraphs={len(paragraphs)} questions={n} "
            f"method={args.method} max_new_tokens={args.max_new_tokens}; exclude these titles from evaluation"
        ),
        measurements={
            "questions": float(n),
            "d2l_accuracy": sum(r["d2l_correct"] for r in rows) / n,
            "rag_accuracy": sum(r["rag_correct"] for r in rows) / n,
            "auto_accuracy": auto_acc,
            "gold_score_mean": sum(gold_scores) / max(1, len(gold_scores)),
            "other_score_mean": sum(other_scores) / max(1, len(other_scores)),
            "internalize_s": internalize_s,
            **{f"d2l_accuracy_k{k}": acc for k, acc in budget_acc.items()},
        },
    )
    out = config.save(args.out or args.run_dir / "router.json")
    (args.run_dir / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("Wrote %s: min_relevance=%.3f min_confidence=%.3f adapter_budget=%d (auto acc %.3f)",
                out, config.min_relevance, config.min_confidence, config.adapter_budget, auto_acc)
    kb.close()


if __name__ == "__main__":
    main()
