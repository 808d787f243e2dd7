"""Training and evaluation examples for context distillation, generated on the fly.

Every example is a document, a question about it and the response the student must produce
without the document. ``key`` marks the part of the response that carries the document's
information (the needle's digits, the fact, the cloze span); the trainer adds a cross-entropy on
those tokens and the evaluation scores them.

Tasks (``make_task(name, ...)``):

- ``needle``: "The special magic number is NNNN." hidden in a haystack. Filler ``line`` repeats
  the Doc-to-LoRA reference line, ``essay`` uses consecutive sentences of Paul Graham essays,
  ``none`` is the needle sentence alone (rung 2 of the capacity ladder).
- ``facts``: a short biography of a made-up person with five made-up facts; one question per fact.
- ``cloze``: a passage of WikiText-2 with one number or capitalised word blanked in a sentence.

Splits are disjoint by source: essays are split by id (the last ``HELD_OUT_ESSAYS`` sorted ids
are held out), cloze trains on WikiText-2 ``valid`` articles and evaluates on ``test`` articles,
facts and needles use disjoint seeds. Sampling is a pure function of ``(seed, index)``, so a
resumed run sees exactly the data it would have seen (the data position is the step).

Only numpy and the standard library are used: this module travels to the GPU machine.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEEDLE_QUESTION = "What is the special magic number? Reply with only the number."
FILLER_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HELD_OUT_ESSAYS = 9
CHARS_PER_TOKEN = 4.3  # rough English average for the SmolLM2 tokenizer; lengths are nominal


@dataclass(frozen=True)
class Example:
    """One distillation example.

    Args:
        doc: the document (the teacher sees it, the student does not).
        question: the user's question.
        response: the target assistant response (without the end-of-turn token).
        key: substring of ``response`` that carries the document's information ("" if none).
        answers: acceptable answers for greedy evaluation (contains-match).
        task: task name, for per-task reporting.
    """

    doc: str
    question: str
    response: str
    key: str
    answers: tuple[str, ...]
    task: str


def data_dir() -> Path:
    """``$D2L_DATA_DIR``, else ``../shared/data`` beside the checkout, else ``.stage/data``."""
    env = os.environ.get("D2L_DATA_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for cand in (root / ".stage" / "data", root.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return root.parent / "shared" / "data"


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in _SENT_RE.split(text) if len(s.strip()) > 1]


# --------------------------------------------------------------------------------------- needle
class NeedleTask:
    """Magic-number needle in a haystack of ``min_tokens``-``max_tokens`` nominal tokens."""

    def __init__(self, *, split: str = "train", filler: str | Sequence[str] = ("line", "essay"),
                 min_tokens: int = 128, max_tokens: int = 512, root: Path | None = None) -> None:
        self.split = split
        self.fillers = (filler,) if isinstance(filler, str) else tuple(filler)
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.name = "needle" if self.fillers != ("none",) else "needle_alone"
        self._essays: list[list[str]] = []
        if "essay" in self.fillers:
            rows = sorted(_read_jsonl((root or data_dir()) / "needle_haystack" / "paul_graham_essays.jsonl"), key=lambda r: r["id"])
            rows = rows[:-HELD_OUT_ESSAYS] if split == "train" else rows[-HELD_OUT_ESSAYS:]
            self._essays = [s for s in (_sentences(r["text"]) for r in rows) if len(s) > 20]

    def sample(self, rng: np.random.Generator) -> Example:
        number = str(int(rng.integers(1000, 10000)))
        needle = f"The special magic number is {number}."
        filler = self.fillers[int(rng.integers(len(self.fillers)))]
        target_chars = int(rng.integers(self.min_tokens, self.max_tokens + 1) * CHARS_PER_TOKEN)
        if filler == "none":
            doc = needle
        elif filler == "line":
            n_lines = max(1, round(target_chars / (len(FILLER_LINE) + 1)) - 1)
            lines = [FILLER_LINE] * n_lines
            lines.insert(int(rng.integers(n_lines + 1)), needle)
            doc = "\n".join(lines)
        elif filler == "essay":
            essay = self._essays[int(rng.integers(len(self._essays)))]
            start = int(rng.integers(len(essay)))
            sents: list[str] = []
            i = start
            while sum(len(s) + 1 for s in sents) < target_chars - len(needle):
                sents.append(essay[i % len(essay)])
                i += 1
            sents.insert(int(rng.integers(len(sents) + 1)), needle)
            doc = " ".join(sents)
        else:
            msg = f"Unknown needle filler {filler!r}; use 'none', 'line' or 'essay'."
            raise ValueError(msg)
        return Example(doc, NEEDLE_QUESTION, needle, number, (number,), self.name)


# ---------------------------------------------------------------------------------------- facts
_FIRST = ("Oskar", "Maren", "Tobiah", "Liesel", "Corwin", "Ysolde", "Bram", "Nerys", "Fennick", "Odalys", "Quill",
          "Sabine", "Evander", "Thora", "Caspian", "Ilse", "Darragh", "Wrenna", "Lucan", "Petra", "Anselm", "Mirela")
_LAST = ("Threlfall", "Adair", "Vantongeren", "Quist", "Marchetti", "Holloway", "Brisbane", "Okonkwo", "Lindqvist",
         "Pemberton", "Szabo", "Faircloth", "Renwick", "Castellanos", "Drummond", "Ivers", "Kowalczyk", "Ashdown")
_TOWN_A = ("Brack", "Thorn", "Wil", "Ash", "Mar", "Glen", "Hollow", "Raven", "Stan", "Kest", "Orr", "Pell", "Dun", "Fal")
_TOWN_B = ("wick", "mere", "ford", "by", "stead", "haven", "ton", "moor", "holt", "field", "crest", "vale")
_COLORS = ("teal", "maroon", "amber", "lilac", "olive", "crimson", "ochre", "indigo", "coral", "saffron")
_INSTRUMENTS = ("cello", "oboe", "banjo", "harp", "bassoon", "accordion", "sitar", "trombone", "viola", "marimba")
_JOBS = ("beekeeper", "cartographer", "glassblower", "botanist", "locksmith", "astronomer", "luthier", "archivist")
_FILLER_FACTS = ("enjoys long walks by the river", "keeps a small vegetable garden", "reads the newspaper every morning",
                 "dislikes crowded trains", "once ran a half marathon", "collects old postcards")


class FactsTask:
    """Made-up-fact biographies; knowledge-free, so the no-context answer is ~never right."""

    name = "facts"

    def sample(self, rng: np.random.Generator) -> Example:
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        name = f"{pick(_FIRST)} {pick(_LAST)}"
        first = name.split()[0]
        town = pick(_TOWN_A) + pick(_TOWN_B)
        year = str(int(rng.integers(1931, 2006)))
        cats = str(int(rng.integers(2, 10)))
        color, instrument, job = pick(_COLORS), pick(_INSTRUMENTS), pick(_JOBS)
        facts = [
            (f"{name} was born in {town} in {year}.", f"Where was {name} born?", f"{name} was born in {town}.", town),
            (f"{first} works as a {job}.", f"What does {name} work as?", f"{name} works as a {job}.", job),
            (f"{first} owns {cats} cats.", f"How many cats does {name} own?", f"{name} owns {cats} cats.", cats),
            (f"{first}'s favourite colour is {color}.", f"What is {name}'s favourite colour?",
             f"{name}'s favourite colour is {color}.", color),
            (f"{first} plays the {instrument}.", f"Which instrument does {name} play?", f"{name} plays the {instrument}.", instrument),
            (f"{first} was born in {year}.", f"In which year was {name} born?", f"{name} was born in {year}.", year),
        ]
        order = rng.permutation(5)
        sents = [facts[i][0] for i in order] + [f"{first} {pick(_FILLER_FACTS)}."]
        doc = " ".join(sents)
        _, question, response, key = facts[int(rng.integers(len(facts)))]
        return Example(doc, question, response, key, (key,), self.name)


# ---------------------------------------------------------------------------------------- cloze
_CLOZE_TARGET = re.compile(r"\b(\d[\d,.]*\d|\d|[A-Z][a-z]{3,})\b")


class ClozeTask:
    """A WikiText-2 passage; one number or capitalised word of one sentence is blanked."""

    name = "cloze"

    def __init__(self, *, split: str = "train", min_tokens: int = 64, max_tokens: int = 256, root: Path | None = None) -> None:
        fname = "valid_articles.jsonl" if split == "train" else "test_articles.jsonl"
        rows = _read_jsonl((root or data_dir()) / "wikitext2" / fname)
        self._paras: list[list[str]] = []
        for r in rows:
            for para in r["text"].split("\n"):
                para = para.strip()
                if not para or para.startswith("="):
                    continue
                para = para.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace(" ,", ",").replace(" .", ".")
                sents = [s for s in _sentences(para) if "<unk>" not in s]
                if len(sents) >= 3:
                    self._paras.append(sents)
        self.min_tokens, self.max_tokens = min_tokens, max_tokens

    def sample(self, rng: np.random.Generator) -> Example:
        while True:
            sents = self._paras[int(rng.integers(len(self._paras)))]
            target = int(rng.integers(self.min_tokens, self.max_tokens + 1) * CHARS_PER_TOKEN)
            start = int(rng.integers(len(sents)))
            chosen: list[str] = []
            for s in sents[start:]:
                if chosen and sum(len(c) + 1 for c in chosen) + len(s) > target:
                    break
                chosen.append(s)
            j = int(rng.integers(len(chosen)))
            spans = [m for m in _CLOZE_TARGET.finditer(chosen[j]) if m.start() > 0]
            if not spans:
                continue
            m = spans[int(rng.integers(len(spans)))]
            blanked = chosen[j][: m.start()] + "___" + chosen[j][m.end():]
            question = f"Fill in the blank with the word or number from the text: {blanked}"
            return Example(" ".join(chosen), question, m.group(0), m.group(0), (m.group(0),), self.name)


# ----------------------------------------------------------------------------------------- mix
def make_task(name: str, *, split: str = "train", **kwargs):  # noqa: ANN201 - one of the task classes
    """``needle`` / ``needle_alone`` / ``needle_line`` / ``needle_essay`` / ``facts`` / ``cloze``."""
    if name == "needle":
        return NeedleTask(split=split, **kwargs)
    if name == "needle_alone":
        return NeedleTask(split=split, filler="none", **kwargs)
    if name in ("needle_line", "needle_essay"):
        return NeedleTask(split=split, filler=name.split("_")[1], **kwargs)
    if name == "facts":
        return FactsTask()
    if name == "cloze":
        return ClozeTask(split=split, **kwargs)
    msg = f"Unknown task {name!r}. Known: needle, needle_alone, needle_line, needle_essay, facts, cloze."
    raise ValueError(msg)


class TaskMix:
    """Weighted mixture of tasks; ``batch(step)`` is a pure function of ``(seed, step)``."""

    def __init__(self, tasks: Sequence[tuple[object, float]], *, seed: int) -> None:
        self.tasks = [t for t, _ in tasks]
        w = np.asarray([w for _, w in tasks], dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = seed

    def batch(self, step: int, size: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, step])
        out = []
        for _ in range(size):
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.weights))]
            out.append(task.sample(rng))  # type: ignore[attr-defined]
        return out

    def fixed(self, n: int, *, step: int = 0) -> list[Example]:
        """A fixed list of ``n`` examples (validation / evaluation sets)."""
        return self.batch(step, n)
