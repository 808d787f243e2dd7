"""Benchmark tasks: documents plus questions about them, loaded or generated deterministically.

Every task is a ``Task``: ``documents`` (id -> text) and ``questions``, each naming the documents
that make up its knowledge (``doc_ids``). Every method answers the same questions from the same
documents: ``full_context`` puts those documents in the prompt, ``rag`` retrieves chunks of them,
``d2l`` applies their chunk adapters.

Sources (local files under ``$D2L_DATA_DIR``, default ``../shared/data`` beside the checkout):

    squad_v1      squad/squad_v1.1_dev_open.jsonl         or hf:rajpurkar/squad
    squad_v2      squad/squad_v2.0_dev_open.jsonl         or hf:rajpurkar/squad_v2
    ropes         ropes_contrast/original.jsonl           or hf:allenai/ropes
    magic_number  magic_number_niah/test_<bin>.jsonl      (Doc-to-LoRA's generator, seed 42)
    essay_niah    needle_haystack/paul_graham_essays.jsonl, needle placed here at a depth and length
    facts         made-up biographies from d2l_integrations.engine.training_data.FactsTask
    multidoc      a pool of made-up biographies; each question's knowledge is the whole pool

SQuAD tasks never use the router's calibration articles (``CALIBRATION_TITLES``) nor the articles
the hypernetwork trained on (``training_data.SQUAD_TRAIN_TITLES``): ``EVAL_EXCLUDED_TITLES``.

``source`` may also be a path (a JSONL file or a folder holding the default file name) or
``"hf:<name>"`` (needs network and the ``datasets`` package; imported only then).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2l_integrations.engine.training_data import HELD_OUT_ESSAYS, NEEDLE_QUESTION, SQUAD_TRAIN_TITLES, FactsTask

BENCH_SEED = 7919
"""Seed of everything sampled here; training uses 11 and 1011 (engine/training.py), so streams differ."""

QA_INSTRUCTION = "Answer with a short phrase from the text."
SQUAD2_INSTRUCTION = "Answer with a short phrase from the text. If the text does not say, reply 'unanswerable'."
NIAH_INSTRUCTION = ""  # the needle question already says "Reply with only the number."


@dataclass(frozen=True)
class Question:
    """One question and its references.

    Args:
        id: unique within a run (task name prefixed).
        question: the user's question, instruction included.
        answers: acceptable references; empty means "not answerable from the documents".
        doc_ids: the documents that form this question's knowledge.
        meta: free-form facts for reporting (``depth``, ``length_tokens``, ``gold_doc``, ...).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    doc_ids: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """Documents and questions of one dataset. ``kind`` picks the headline metric (``qa``: F1, ``niah``: exact number)."""

    name: str
    kind: str
    documents: dict[str, str]
    questions: list[Question]
    sweep_adapters: tuple[int, ...] = ()
    """For the summed-adapters curve: answer with this many chunk adapters (gold first, then distractors)."""


# ----------------------------------------------------------------------------- readers
def data_dir() -> Path:
    """``$D2L_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("D2L_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _doc_id(prefix: str, text: str) -> str:
    return f"{prefix}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def _resolve(source: str | Path | None, default_rel: str) -> Path:
    if source is None:
        return data_dir() / default_rel
    path = Path(source)
    return path / Path(default_rel).name if path.is_dir() else path


def _hf_rows(name: str, split: str) -> list[dict]:
    """Rows of a Hugging Face dataset in our passage-QA format (network and ``datasets`` needed)."""
    try:
        import datasets  # noqa: PLC0415 - optional, only for users with network
    except ImportError as err:
        msg = f"Loading 'hf:{name}' needs the `datasets` package (pip install datasets) and network access; or pass a local JSONL path."
        raise ImportError(msg) from err
    rows = []
    for r in datasets.load_dataset(name, split=split):
        context = r["context"] if "context" in r else f"{r['background']}\n{r['situation']}"
        answers = r["answers"]["text"] if isinstance(r["answers"], Mapping) else r["answers"]
        row = {"id": str(r["id"]), "context": context, "question": r["question"], "answers": list(answers)}
        if "title" in r:  # SQuAD: lets evaluation leave out calibration and training articles
            row["title"] = r["title"]
        rows.append(row)
    return rows


def _rows(source: str | Path | None, default_rel: str, hf_split: str = "validation") -> list[dict]:
    if isinstance(source, str) and source.startswith("hf:"):
        return _hf_rows(source[3:], hf_split)
    path = _resolve(source, default_rel)
    if not path.exists():
        msg = f"No data at {path}. Set D2L_DATA_DIR to the folder of the shared data, pass a JSONL path, or use 'hf:<dataset name>'."
        raise FileNotFoundError(msg)
    return read_jsonl(path)


# ----------------------------------------------------------------------------- passage QA
def load_passage_qa(
    name: str,
    rows: Sequence[dict],
    *,
    n_docs: int,
    per_doc: int = 1,
    kind: str = "qa",
    instruction: str = QA_INSTRUCTION,
    seed: int = BENCH_SEED,
    answerable_only: bool = False,
    exclude_titles: Sequence[str] = (),
) -> Task:
    """Pick ``n_docs`` passages at random (seeded) and up to ``per_doc`` questions on each.

    Rows are ``{"id","context","question","answers",...}``; rows sharing a context share a document.
    Rows whose ``title`` is in ``exclude_titles`` (data something was tuned on) are dropped.
    """
    by_context: dict[str, list[dict]] = {}
    for r in rows:
        if (answerable_only and not r.get("answers")) or r.get("title") in exclude_titles:
            continue
        by_context.setdefault(r["context"], []).append(r)
    contexts = sorted(by_context)
    random.Random(seed).shuffle(contexts)
    documents: dict[str, str] = {}
    questions: list[Question] = []
    for context in contexts[:n_docs]:
        doc = _doc_id(name, context)
        documents[doc] = context
        group = sorted(by_context[context], key=lambda r: str(r["id"]))
        random.Random(f"{seed}:{doc}").shuffle(group)
        for r in group[:per_doc]:
            extra = {k: r[k] for k in ("is_impossible", "token_bin", "depth", "title") if k in r}
            q = f"{r['question']} {instruction}".strip()
            questions.append(Question(f"{name}/{r['id']}", q, tuple(r.get("answers") or ()), (doc,), extra))
    return Task(name, kind, documents, questions)


CALIBRATION_TITLES = ("Normans", "Geology")
"""SQuAD dev articles benchmarks/calibrate_router.py tunes the router on by default; never evaluated on."""

EVAL_EXCLUDED_TITLES = tuple(dict.fromkeys((*CALIBRATION_TITLES, *SQUAD_TRAIN_TITLES)))
"""SQuAD dev articles no benchmark task evaluates on: the router's calibration articles and the
articles the shipped hypernetwork trained on (``training_data.SQUAD_TRAIN_TITLES``)."""


def squad(
    version: str = "1.1",
    *,
    source: str | Path | None = None,
    n_docs: int = 4,
    per_doc: int = 2,
    seed: int = BENCH_SEED,
    exclude_titles: Sequence[str] = CALIBRATION_TITLES,
) -> Task:
    """SQuAD v1.1 or v2.0 dev: one document per paragraph. v2.0 keeps unanswerable questions (abstain to score).

    ``exclude_titles``: articles the router was calibrated on (left out of evaluation). The
    hypernetwork's training articles (``SQUAD_TRAIN_TITLES``) are always left out as well.
    """
    if version not in ("1.1", "2.0"):
        msg = f"SQuAD version must be '1.1' or '2.0', got {version!r}."
        raise ValueError(msg)
    if isinstance(source, str) and source in ("hf", "hf:"):
        source = "hf:rajpurkar/squad" if version == "1.1" else "hf:rajpurkar/squad_v2"
    rows = _rows(source, f"squad/squad_v{version}_dev_open.jsonl")
    name = "squad_v1" if version == "1.1" else "squad_v2"
    instruction = QA_INSTRUCTION if version == "1.1" else SQUAD2_INSTRUCTION
    excluded = tuple(dict.fromkeys((*SQUAD_TRAIN_TITLES, *exclude_titles)))
    return load_passage_qa(name, rows, n_docs=n_docs, per_doc=per_doc, instruction=instruction, seed=seed, exclude_titles=excluded)


def ropes(*, source: str | Path | None = None, n_docs: int = 4, per_doc: int = 1, seed: int = BENCH_SEED) -> Task:
    """ROPES (background + situation as the document; questions need reasoning over both)."""
    if isinstance(source, str) and source in ("hf", "hf:"):
        source = "hf:allenai/ropes"
    rows = _rows(source, "ropes_contrast/original.jsonl")
    return load_passage_qa("ropes", rows, n_docs=n_docs, per_doc=per_doc, instruction="Answer with a word or short phrase.", seed=seed)


def magic_number(*, bins: Sequence[str] = ("32_128",), n_per_bin: int = 2, source: str | Path | None = None, seed: int = BENCH_SEED) -> Task:
    """Doc-to-LoRA's magic-number needle in a haystack of filler lines (``bins``: ``32_128``, ``128_256``)."""
    documents: dict[str, str] = {}
    questions: list[Question] = []
    for b in bins:
        path = _resolve(source, f"magic_number_niah/test_{b}.jsonl")
        part = load_passage_qa("magic_number", read_jsonl(path), n_docs=n_per_bin, kind="niah", instruction=NIAH_INSTRUCTION, seed=seed)
        documents.update(part.documents)
        questions.extend(part.questions)
    return Task("magic_number", "niah", documents, questions)


# ----------------------------------------------------------------------------- essay NIAH
def essay_haystack(
    count_tokens: Callable[[str], int],
    *,
    lengths: Sequence[int] = (256, 1024),
    depths: Sequence[float] = (0.25, 0.75),
    source: str | Path | None = None,
    seed: int = BENCH_SEED,
) -> Task:
    """"The special magic number is NNNN." inside Paul Graham essays at ``depths`` x ``lengths`` (tokens).

    Only the essays that training holds out (the last ``HELD_OUT_ESSAYS`` sorted ids) are used. A
    length beyond the base model's context window makes ``full_context`` unable to answer.
    """
    essays = sorted(read_jsonl(_resolve(source, "needle_haystack/paul_graham_essays.jsonl")), key=lambda r: r["id"])
    held_out = essays[-HELD_OUT_ESSAYS:]
    rng = random.Random(seed)
    documents: dict[str, str] = {}
    questions: list[Question] = []
    for length in lengths:
        for depth in depths:
            start = rng.randrange(len(held_out))
            order = held_out[start:] + held_out[:start]
            hay = "\n\n".join(" ".join(r["text"].split()) for r in order)
            while count_tokens(hay) < length * 1.2 and len(hay) < 10_000_000:  # short pool: repeat the essays
                hay = hay + "\n\n" + hay
            number = str(rng.randrange(1000, 10000))
            needle = f"The special magic number is {number}."
            hay = _cut_to_tokens(hay, length - count_tokens(needle) - 1, count_tokens)
            doc = _insert_at_depth(hay, needle, depth)
            doc_id = f"essay_niah:L{length}:D{depth:g}"
            documents[doc_id] = doc
            meta = {"depth": float(depth), "length_tokens": int(length), "doc_tokens": count_tokens(doc)}
            questions.append(Question(f"essay_niah/L{length}-D{depth:g}", NEEDLE_QUESTION, (number,), (doc_id,), meta))
    return Task("essay_niah", "niah", documents, questions)


def _cut_to_tokens(text: str, tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest whitespace-cut prefix of ``text`` with at most ``tokens`` tokens (binary search on characters)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    cut = text.rfind(" ", 0, lo)
    return text[: cut if cut > 0 else lo]


def _insert_at_depth(text: str, needle: str, depth: float) -> str:
    """Put ``needle`` at the sentence boundary nearest ``depth`` (0 = start, 1 = end) of ``text``."""
    if not 0.0 <= depth <= 1.0:
        msg = f"depth must be in [0, 1], got {depth}."
        raise ValueError(msg)
    target = int(len(text) * depth)
    boundaries = [0] + [i + 2 for i in range(len(text) - 1) if text[i] == "." and text[i + 1] == " "] + [len(text)]
    at = min(boundaries, key=lambda b: abs(b - target))
    left, right = text[:at].rstrip(), text[at:].lstrip()
    return " ".join(p for p in (left, needle, right) if p)


# ----------------------------------------------------------------------------- made-up facts
def synthetic_facts(*, n: int = 4, seed: int = BENCH_SEED, name: str = "facts") -> Task:
    """Made-up biographies from the project's ``FactsTask`` (the base model cannot know them); one question each."""
    import numpy as np

    task = FactsTask()
    documents: dict[str, str] = {}
    questions: list[Question] = []
    for i in range(n):
        ex = task.sample(np.random.default_rng([seed, i]))
        doc = _doc_id(name, ex.doc)
        documents[doc] = ex.doc
        questions.append(Question(f"{name}/{i}", f"{ex.question} {QA_INSTRUCTION}", ex.answers, (doc,), {"gold_doc": doc}))
    return Task(name, "qa", documents, questions)


def multidoc(*, n_docs: int = 4, seed: int = BENCH_SEED, sweep: Sequence[int] = (1, 2, 4)) -> Task:
    """A pool of ``n_docs`` made-up biographies; each question's knowledge is the whole pool.

    With the default seed the pool is the first ``n_docs`` documents of ``synthetic_facts`` (same
    ids), so a suite with both tasks internalizes each biography once; the questions differ in
    their knowledge (one biography vs the pool).

    ``full_context`` reads every biography, ``rag`` must retrieve the right one, ``d2l`` sums the
    adapters of the retrieved chunks (up to the router's adapter budget). ``sweep`` drives the
    accuracy-vs-summed-adapters curve.
    """
    part = synthetic_facts(n=n_docs, seed=seed)
    pool = tuple(part.documents)
    questions = [Question(q.id.replace("facts/", "multidoc/"), q.question, q.answers, pool, q.meta) for q in part.questions]
    return Task("multidoc", "qa", part.documents, questions, sweep_adapters=tuple(k for k in sweep if k <= n_docs))


# ----------------------------------------------------------------------------- suites
CPU_DISTILL_BUDGET = {"max_steps": 12, "max_questions": 12, "about_questions": 1, "batch_size": 2,
                      "teacher_max_new_tokens": 16, "eval_every": 4}
"""A smaller distill budget for the CPU suites (the default, 40 steps on 40+ questions per chunk, takes
minutes per chunk on 2 CPU cores). Fixed in advance, not tuned on any result; D2L numbers of these
suites understate what the default budget (the ``full`` suite) reaches."""

SUITES: dict[str, dict[str, Any]] = {
    # seconds to a couple of minutes on CPU (tests and the notebook)
    # four chunks to internalize: one distill batch, with a small distill budget
    "tiny": {
        "magic_number": {"bins": ("32_128",), "n_per_bin": 1},
        "essay_niah": {"lengths": (160, 9000), "depths": (0.5,)},
        "multidoc": {"n_docs": 2, "sweep": (1, 2)},
        "max_chunks_per_doc": 1,
        "distill": CPU_DISTILL_BUDGET,
    },
    # nine chunks to internalize (three distill batches); minutes on 2 idle CPU cores
    "quick": {
        "facts": {"n": 3},
        "squad_v1": {"n_docs": 1, "per_doc": 3},
        "squad_v2": {"n_docs": 1, "per_doc": 2},
        "ropes": {"n_docs": 1, "per_doc": 2},
        "magic_number": {"bins": ("32_128",), "n_per_bin": 1},
        "essay_niah": {"lengths": (200, 9000), "depths": (0.1, 0.9)},
        "multidoc": {"n_docs": 3, "sweep": (1, 2, 3)},  # the same 3 biographies as "facts"
        "max_chunks_per_doc": 1,
        "distill": CPU_DISTILL_BUDGET,
    },
    "full": {
        "facts": {"n": 20},
        "squad_v1": {"n_docs": 20, "per_doc": 3},
        "squad_v2": {"n_docs": 10, "per_doc": 3},
        "ropes": {"n_docs": 20},
        "magic_number": {"bins": ("32_128", "128_256"), "n_per_bin": 10},
        "essay_niah": {"lengths": (256, 1024, 2048, 4096, 9000, 16000), "depths": (0.0, 0.25, 0.5, 0.75, 1.0)},
        "multidoc": {"n_docs": 8, "sweep": (1, 2, 4, 8)},
        "max_chunks_per_doc": None,
        "distill": None,  # the engine's default DistillConfig
    },
}
"""Per suite: task name -> loader keyword arguments; ``max_chunks_per_doc`` caps internalization per
document; ``distill`` overrides DistillConfig fields when the harness builds the engine itself."""


def load_task(name: str, count_tokens: Callable[[str], int], **kwargs: Any) -> Task:
    """One task by name (see the module docstring), ``kwargs`` passed to its loader."""
    if name == "squad_v1":
        return squad("1.1", **kwargs)
    if name == "squad_v2":
        return squad("2.0", **kwargs)
    if name == "ropes":
        return ropes(**kwargs)
    if name == "magic_number":
        return magic_number(**kwargs)
    if name == "essay_niah":
        return essay_haystack(count_tokens, **kwargs)
    if name == "facts":
        return synthetic_facts(**kwargs)
    if name == "multidoc":
        return multidoc(**kwargs)
    msg = f"Unknown task {name!r}. Known: squad_v1, squad_v2, ropes, magic_number, essay_niah, facts, multidoc."
    raise ValueError(msg)


def load_suite(
    suite: str,
    count_tokens: Callable[[str], int],
    *,
    tasks: Sequence[str] | None = None,
    exclude_titles: Sequence[str] = (),
) -> tuple[list[Task], dict[str, Any]]:
    """The tasks of ``suite`` (optionally only ``tasks``) and the suite's settings.

    ``exclude_titles`` are added to ``EVAL_EXCLUDED_TITLES`` (calibration and hypernetwork-training
    articles) for the SQuAD tasks; ``settings["excluded_titles"]`` records the whole list.
    """
    if suite not in SUITES:
        msg = f"Unknown suite {suite!r}. Choose one of {sorted(SUITES)}."
        raise ValueError(msg)
    spec = dict(SUITES[suite])
    settings = {"max_chunks_per_doc": spec.pop("max_chunks_per_doc", None), "distill": spec.pop("distill", None)}
    names = [t for t in spec if tasks is None or t in tasks]
    excluded = tuple(dict.fromkeys((*EVAL_EXCLUDED_TITLES, *exclude_titles)))
    settings["excluded_titles"] = list(excluded)
    loaded = []
    for t in names:
        kwargs = dict(spec[t])
        if t.startswith("squad"):
            kwargs["exclude_titles"] = excluded
        loaded.append(load_task(t, count_tokens, **kwargs))
    return loaded, settings


__all__ = [
    "CALIBRATION_TITLES",
    "EVAL_EXCLUDED_TITLES",
    "SUITES",
    "Question",
    "Task",
    "essay_haystack",
    "load_passage_qa",
    "load_suite",
    "load_task",
    "magic_number",
    "multidoc",
    "read_jsonl",
    "ropes",
    "squad",
    "synthetic_facts",
]
