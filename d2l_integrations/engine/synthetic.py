"""Made-up-fact documents with natural questions, for internalization benchmarks.

Each document describes an invented person (name, birthplace, workshop year, number of
apprentices, door colour, instrument) between filler sentences. Every fact is invented from
syllables and word lists, so the base model cannot know it without the document. Questions are
phrased naturally and differently from the text (and from distill's cloze training questions):
the text says "was born in the town of Varnholm", the question asks "What is the name of the town
where ... was born?".

Example:
    >>> docs = make_fact_documents(2, seed=0)
    >>> docs[0].questions[0].answer in docs[0].text
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

_SYLLABLES = ["var", "nel", "tho", "mir", "kes", "dal", "bri", "quon", "fen", "ost", "ral", "zu", "pel", "gra", "lio", "wen"]
_COLORS = ["crimson", "teal", "ochre", "violet", "amber", "turquoise", "maroon", "lilac"]
_INSTRUMENTS = ["oboe", "cello", "banjo", "harp", "bassoon", "accordion", "trombone", "mandolin"]
_OBJECTS = ["clocks", "lanterns", "bicycles", "umbrellas", "violins", "typewriters", "kettles", "compasses"]
_FILLER = [
    "Neighbours often stopped by to talk about the weather.",
    "The street outside was quiet in the mornings.",
    "Market days brought many visitors to the square.",
    "Rain was common in the autumn months.",
    "Many people in the area kept small gardens.",
    "The old bridge nearby had been repaired several times.",
]


@dataclass(frozen=True)
class FactQuestion:
    """A natural question, its answer (scored by case-insensitive containment) and the fact type."""

    question: str
    answer: str
    fact: str


@dataclass(frozen=True)
class FactDocument:
    """An invented biography and the questions it answers."""

    doc_id: str
    text: str
    questions: tuple[FactQuestion, ...]


def _word(rng: random.Random, parts: int, syllables: Sequence[str]) -> str:
    return "".join(rng.choice(syllables) for _ in range(parts)).capitalize()


def make_fact_documents(n: int, *, seed: int = 0, syllables: Sequence[str] | None = None) -> list[FactDocument]:
    """``n`` invented biographies (~120 tokens, 5 facts each), deterministic given ``seed``.

    ``syllables``: what the names are made of (default: the 16 of ``_SYLLABLES``, which are also in the hypernetwork's
    classic training inventory; ``training_data.name_syllables("wide", "eval")`` gives names no network trained on).
    """
    syl = list(syllables) if syllables is not None else _SYLLABLES
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        name = f"{_word(rng, 2, syl)} {_word(rng, 3, syl)}"
        first = name.split()[0]
        town = _word(rng, 3, syl)
        year = str(rng.randint(1905, 1995))
        count = str(rng.randint(3, 29))
        color = rng.choice(_COLORS)
        instrument = rng.choice(_INSTRUMENTS)
        objects = rng.choice(_OBJECTS)
        fillers = rng.sample(_FILLER, 3)
        sentences = [
            f"{name} was born in the town of {town}.",
            fillers[0],
            f"In {year}, {first} opened a small workshop that repaired {objects}.",
            f"The workshop employed {count} apprentices.",
            fillers[1],
            f"Its front door was painted {color}.",
            f"In the evenings {first} played the {instrument} for friends.",
            fillers[2],
        ]
        questions = (
            FactQuestion(f"What is the name of the town where {name} was born?", town, "birthplace"),
            FactQuestion(f"In which year did {name} open a workshop?", year, "year"),
            FactQuestion(f"How many apprentices worked at {name}'s workshop?", count, "count"),
            FactQuestion(f"What colour was the front door of {name}'s workshop?", color, "color"),
            FactQuestion(f"Which musical instrument did {name} play?", instrument, "instrument"),
        )
        docs.append(FactDocument(f"facts-{seed}-{i}", " ".join(sentences), questions))
    return docs
