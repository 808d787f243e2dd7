"""Self-supervised training questions built from a chunk's own text (no model knowledge).

Context distillation needs prompts on which the teacher (the base model *with* the chunk) and
the student (base + LoRA *without* it) can be compared. They are built here from the text alone,
deterministically given a seed, in pure Python:

- **cloze**: one sentence with one span blanked out. Spans are numbers, dates, capitalised
  names, determiner-headed noun phrases and the sentence's last content word. The blanked span is
  kept as a gold answer.
- **copula**: ``"<subject> is <object>."`` becomes ``"What is <subject>?"`` with the object as
  gold answer (the usual shape of a factual question).
- **about**: ``"What does the text say about <X>?"`` for the most frequent names and noun
  phrases, with no gold answer (only the teacher's own answer is used).
- **wh** (``style="wh"`` only): the blanked span replaced by a question word, the sentence kept
  as it is: ``"In 1921, Gramir opened a workshop."`` -> ``"In what year, Gramir opened a
  workshop?"``. Closer to how people ask than a cloze. ``style="wh"`` also asks about dates,
  numbers, names, last words and copulas before noun phrases within each sentence.
- **context** (``style="context"`` only): each cloze quotes the two sentences before it too, and names
  the topic in full (``"Gramir Pelzutho"``, not ``"Gramir"``), so a sentence that refers back
  ("Its front door was painted ___.") is learned with what it refers to.

A few gold-answer questions are held out (never trained on) for early stopping. A question never
goes to the held-out set when it is the only question of its sentence, so every sentence is
trained on.

Example:
    >>> qs = build_questions("The special magic number is 1966. The sky is blue.", seed=0)
    >>> sorted({q.kind for q in qs.train})
    ['about', 'cloze', 'copula']
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

__all__ = ["QUESTION_STYLES", "QuestionSet", "Span", "TrainingQuestion", "build_questions", "find_spans", "split_sentences"]

_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan\\.?|Feb\\.?|Mar\\.?|Apr\\.?|Jun\\.?|Jul\\.?|Aug\\.?|Sep\\.?|Sept\\.?|Oct\\.?|Nov\\.?|Dec\\.?"
)
_DATE_RE = re.compile(
    rf"\b(?:(?:{_MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{3,4}})?"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MONTHS})(?:,?\s+\d{{3,4}})?"
    rf"|(?:{_MONTHS})\s+\d{{4}})\b"
)
_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?%?(?![\w])")
_NAME_RE = re.compile(r"\b[A-Z][\w'’.-]*(?:\s+(?:(?:of|de|da|van|von|der|du|la|le)\s+)?[A-Z][\w'’.-]*)*")
_DETERMINERS = "the|a|an|his|her|its|their|our|this|that|these|those|each|every"
_NOUN_PHRASE_RE = re.compile(rf"\b(?:{_DETERMINERS})\s+", re.IGNORECASE)
_COPULA_RE = re.compile(r"^(?P<subject>[^,;:]{3,80}?)\s+(?P<verb>is|was|are|were)\s+(?P<object>[^.!?]{1,80}?)[.!?]?$")
_WORD_RE = re.compile(r"[A-Za-z][\w'’-]*|\d[\d,.]*")
_SENTENCE_RE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"'”’)\]]*|$)")

# Words that start sentences with a capital letter without being names, and words that are too
# common to be a useful blank or topic.
_STOPWORDS = frozenset(
    """a an the and or but if then so of in on at to for from by with without as into onto over under
    about after before during between through is was are were be been being has have had do does did
    he she it they we you i his her its their our your my this that these those there here who whom
    which what when where why how not no yes all any some each every many much more most other such
    also only very can could will would shall should may might must one ones than too again back
    go we're it's there's here's""".split()
)
_MAX_SPAN_WORDS = 6
QUESTION_STYLES = ("cloze", "wh", "context")
_LEAD_SENTENCES = 2  # style="context": sentences quoted before the blanked one


@dataclass(frozen=True)
class Span:
    """A candidate blank in a sentence: ``sentence[start:end]`` of a given kind."""

    kind: str  # "date" | "number" | "name" | "noun_phrase" | "last_word"
    start: int
    end: int


@dataclass(frozen=True)
class TrainingQuestion:
    """One prompt shared by teacher and student.

    Attributes:
        question: the user-turn text, worded identically for teacher and student.
        answer: gold answer taken from the text (cloze blank or copula object), or None.
        kind: ``"cloze"``, ``"copula"`` or ``"about"``.
        offset: character offset in the chunk of the text the question was built from, so a
            chunk that must be split for the teacher's context is split where the question's
            evidence lies.
    """

    question: str
    answer: str | None
    kind: str
    offset: int


@dataclass(frozen=True)
class QuestionSet:
    """Training questions and held-out questions (for early stopping) of one chunk."""

    train: tuple[TrainingQuestion, ...]
    held_out: tuple[TrainingQuestion, ...]

    def __len__(self) -> int:
        return len(self.train) + len(self.held_out)


def split_sentences(text: str) -> list[tuple[int, str]]:
    """Split ``text`` into ``(char_offset, sentence)`` pairs, stripped, in order.

    Sentences end at ``.``, ``!``, ``?`` or a newline. Decimal numbers and initials ("3.5",
    "J. R.") are kept together where they are followed by a non-space character.
    """
    sentences: list[tuple[int, str]] = []
    # Protect dots inside numbers ("3.5") so they do not end a sentence.
    protected = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)
    for match in _SENTENCE_RE.finditer(protected):
        raw = match.group(0)
        stripped = raw.strip()
        if len(_WORD_RE.findall(stripped)) < 2:  # "Yes." or a stray fragment: nothing to ask
            continue
        offset = match.start() + (len(raw) - len(raw.lstrip()))
        sentences.append((offset, stripped.replace("\x00", ".")))
    return sentences


def find_spans(sentence: str) -> list[Span]:
    """Candidate blanks of ``sentence``: dates, numbers, names, noun phrases, last content word."""
    spans: list[Span] = []
    taken: list[tuple[int, int]] = []
    for m in _DATE_RE.finditer(sentence):
        spans.append(Span("date", m.start(), m.end()))
        taken.append((m.start(), m.end()))
    for m in _NUMBER_RE.finditer(sentence):
        end = m.end() - (len(m.group(0)) - len(m.group(0).rstrip(",")))  # "In 1921, ..." blanks "1921", not "1921,"
        if end > m.start() and not any(s <= m.start() < e for s, e in taken):
            spans.append(Span("number", m.start(), end))
    for m in _NAME_RE.finditer(sentence):
        words = [(w.start() + m.start(), w.end() + m.start()) for w in re.finditer(r"\S+", m.group(0))]
        # A capitalised stopword opening the match ("The", "In") is not part of a name.
        while words and sentence[words[0][0]:words[0][1]].lower() in _STOPWORDS:
            words = words[1:]
        if not words or len(words) > _MAX_SPAN_WORDS:
            continue
        start, end = words[0][0], words[-1][1]
        while end > start and sentence[end - 1] in ".'’-":
            end -= 1
        if end - start < 2 or any(s <= start < e for s, e in taken):
            continue
        spans.append(Span("name", start, end))
    for m in _NOUN_PHRASE_RE.finditer(sentence):
        # The phrase is the run of up to three content words after the determiner: "the special
        # magic number is" -> "special magic number"; it stops at the first stopword.
        phrase: list[tuple[int, int]] = []
        for w in _WORD_RE.finditer(sentence, m.end()):
            gap = sentence[(phrase[-1][1] if phrase else m.end()):w.start()]
            token = w.group(0).rstrip(".,")
            if gap.strip() or token.lower() in _STOPWORDS or len(phrase) == 3:
                break
            phrase.append((w.start(), w.start() + len(token)))
        if phrase:
            spans.append(Span("noun_phrase", phrase[0][0], phrase[-1][1]))
    words = list(_WORD_RE.finditer(sentence))
    for w in reversed(words):
        token = w.group(0).rstrip(".,")
        if token.lower() not in _STOPWORDS and len(token) > 2:
            spans.append(Span("last_word", w.start(), w.start() + len(token)))
            break
    unique: dict[tuple[int, int], Span] = {}
    for span in spans:  # first kind wins for identical character ranges
        unique.setdefault((span.start, span.end), span)
    return sorted(unique.values(), key=lambda s: (s.start, s.end))


def _topic(sentences: list[tuple[int, str]]) -> str | None:
    """The most frequent multi-letter name of the text (e.g. the person a biography is about)."""
    counts: Counter[str] = Counter()
    for _, sentence in sentences:
        for span in find_spans(sentence):
            if span.kind == "name":
                counts[sentence[span.start:span.end]] += 1
    if not counts:
        return None
    best, n = counts.most_common(1)[0]
    return best if n >= 2 else None


def _full_topic(topic: str | None, sentences: list[tuple[int, str]]) -> str | None:
    """The longest name of the text that contains ``topic`` as whole words ("Gramir" -> "Gramir Pelzutho")."""
    if topic is None:
        return None
    pattern = re.compile(rf"(?<!\w){re.escape(topic)}(?!\w)")
    names = [sentence[sp.start:sp.end] for _, sentence in sentences for sp in find_spans(sentence) if sp.kind == "name"]
    return max((n for n in names if pattern.search(n)), key=len, default=topic)


def _cloze_question(sentence: str, span: Span, topic: str | None, lead: str = "") -> str:
    blanked = f"{sentence[:span.start]}___{sentence[span.end:]}"
    about = f" about {topic}" if topic and topic not in blanked[span.start:span.start + 3] else ""
    quoted = f"{lead} {blanked}" if lead else blanked
    return f'Fill in the blank from what you know{about}: "{quoted}"'


_YEAR_RE = re.compile(r"^(1[0-9]{3}|20[0-9]{2})$")
_CONTENT_KINDS = ("date", "number", "name", "last_word")


def _wh_question(sentence: str, span: Span) -> str | None:
    """``sentence`` with ``span`` replaced by a question word, or None when no word fits."""
    answer = sentence[span.start:span.end]
    if span.kind == "date":
        word = "when"
    elif span.kind == "number":
        word = "what year" if _YEAR_RE.match(answer) else "how many" if answer.replace(",", "").isdigit() else "what number"
    elif span.kind == "name":
        word = "who" if span.start == 0 else "what"
    elif span.kind == "last_word":
        word = "what"
    else:  # noun phrases: "The what was quiet in the mornings?" reads worse than its cloze
        return None
    head, tail = sentence[:span.start], sentence[span.end:].rstrip().rstrip(".!?")
    if span.start == 0:
        word = word[0].upper() + word[1:]
    return f"{head}{word}{tail}?"


def _is_content(sentence: str, question: TrainingQuestion) -> bool:
    """The question's gold answer is a date, number, name or the last content word of ``sentence``."""
    return any(sp.kind in _CONTENT_KINDS and sentence[sp.start:sp.end] == question.answer for sp in find_spans(sentence))


def _copula_question(sentence: str) -> tuple[str, str] | None:
    m = _COPULA_RE.match(sentence.strip())
    if m is None:
        return None
    subject, verb, obj = m.group("subject"), m.group("verb"), m.group("object").strip()
    if len(subject.split()) > 8 or not obj:
        return None
    first = subject.split()[0]
    if first.lower() in _STOPWORDS:  # "The sky" -> "the sky"; keep names capitalised
        subject = first.lower() + subject[len(first):]
    return f"What {verb} {subject}?", obj


def build_questions(
    text: str,
    *,
    seed: int = 0,
    max_questions: int = 40,
    about_questions: int = 3,
    held_out_fraction: float = 0.15,
    min_held_out: int = 2,
    style: str = "cloze",
) -> QuestionSet:
    """Build training and held-out questions from ``text`` alone.

    Args:
        text: the chunk.
        seed: makes the selection and the held-out split deterministic.
        max_questions: cap on cloze + copula questions (before the held-out split).
        about_questions: number of "what does the text say about X" questions (train only).
        held_out_fraction: share of gold-answer questions held out for early stopping.
        min_held_out: hold out at least this many when there are enough questions.
        style: ``"cloze"`` (cloze, copula and about questions, in random order per sentence),
            ``"wh"`` (also question-word forms of date, number, name and last-word blanks, and
            those blanks and copulas first within each sentence) or ``"context"`` (clozes quote
            the two sentences before theirs and name the topic in full).

    Returns:
        A ``QuestionSet``; ``train`` is never empty for text with at least one sentence of two
        or more words. Identical sentences (e.g. a repeated filler line) yield questions once.
    """
    if style not in QUESTION_STYLES:
        msg = f"Unknown question style {style!r}; use one of {', '.join(QUESTION_STYLES)}."
        raise ValueError(msg)
    rng = random.Random(seed)
    sentences = split_sentences(text)
    seen_sentences: set[str] = set()
    distinct: list[tuple[int, str]] = []
    for offset, sentence in sentences:
        if sentence not in seen_sentences:
            seen_sentences.add(sentence)
            distinct.append((offset, sentence))
    topic = _topic(sentences)
    if style == "context":
        topic = _full_topic(topic, sentences)

    # Candidate gold-answer questions grouped by sentence.
    by_sentence: list[list[TrainingQuestion]] = []
    for index, (offset, sentence) in enumerate(distinct):
        lead = " ".join(prev for _, prev in distinct[max(0, index - _LEAD_SENTENCES):index]) if style == "context" else ""
        group: list[TrainingQuestion] = []
        copula = _copula_question(sentence)
        if copula is not None:
            group.append(TrainingQuestion(copula[0], copula[1], "copula", offset))
        for span in find_spans(sentence):
            answer = sentence[span.start:span.end]
            group.append(TrainingQuestion(_cloze_question(sentence, span, topic, lead), answer, "cloze", offset))
            wh = _wh_question(sentence, span) if style == "wh" else None
            if wh is not None:
                group.append(TrainingQuestion(wh, answer, "wh", offset))
        if not group:  # no span matched: blank the whole predicate is impossible; ask about it
            group.append(TrainingQuestion(f'What comes next in the text: "{sentence[: len(sentence) // 2]}"?',
                                          sentence[len(sentence) // 2:], "cloze", offset))
        rng.shuffle(group)
        if style == "wh":  # the facts a reader would ask about first (stable: random order within a tier)
            group.sort(key=lambda q: 0 if q.kind == "copula" or _is_content(sentence, q) else 1)
        by_sentence.append(group)

    # Round-robin over sentences (in a shuffled order) so every sentence is covered before any
    # sentence gets a second question.
    order = list(range(len(by_sentence)))
    rng.shuffle(order)
    selected: list[list[TrainingQuestion]] = [[] for _ in by_sentence]
    remaining = max_questions
    depth = 0
    while remaining > 0 and any(depth < len(g) for g in by_sentence):
        for i in order:
            if remaining <= 0:
                break
            if depth < len(by_sentence[i]):
                selected[i].append(by_sentence[i][depth])
                remaining -= 1
        depth += 1

    # Hold out at most one question per sentence, only from sentences that keep another one.
    eligible = [i for i, group in enumerate(selected) if len(group) >= 2]
    rng.shuffle(eligible)
    n_gold = sum(len(g) for g in selected)
    n_held = max(min_held_out, round(held_out_fraction * n_gold)) if n_gold >= 2 * min_held_out else 0
    if held_out_fraction == 0:  # no early stopping wanted: every question is trained on
        n_held = 0
    held_idx = set(eligible[:n_held])
    train: list[TrainingQuestion] = []
    held_out: list[TrainingQuestion] = []
    for i, group in enumerate(selected):
        if i in held_idx:
            held_out.append(group[-1])
            train.extend(group[:-1])
        else:
            train.extend(group)

    # Open "about" questions on the most frequent names and noun phrases (teacher answers only).
    subjects: Counter[str] = Counter()
    first_offset: dict[str, int] = {}
    for offset, sentence in sentences:
        for span in find_spans(sentence):
            if span.kind in ("name", "noun_phrase"):
                key = sentence[span.start:span.end]
                subjects[key] += 1
                first_offset.setdefault(key, offset)
    ranked = sorted(subjects, key=lambda s: (-subjects[s], first_offset[s], s))
    templates = ("What does the text say about {x}?", "Tell me what you know about {x}.")
    for k, subject in enumerate(ranked[:about_questions]):
        train.append(TrainingQuestion(templates[k % len(templates)].format(x=subject), None, "about", first_offset[subject]))

    rng.shuffle(train)
    return QuestionSet(train=tuple(train), held_out=tuple(held_out))
