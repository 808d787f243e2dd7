"""Tests of engine/questions.py: self-supervised questions from a chunk's own text."""

from __future__ import annotations

import re

import pytest

from d2l_integrations.engine.questions import build_questions, find_spans, split_sentences

BIO = (
    "Oskar Threlfall was born in Varnholm in 1977. He worked as a botanist at the Kessel Institute. "
    "On March 3, 2001, Oskar Threlfall bought 14 green bicycles. His favourite instrument is the oboe. "
    "The greenhouse he built in 1999 held 312 orchids."
)
HAYSTACK = "\n".join(["The grass is green. The sky is blue. Here we go."] * 4 + ["The special magic number is 1966."])


def _spans(sentence: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for span in find_spans(sentence):
        out.setdefault(span.kind, set()).add(sentence[span.start:span.end])
    return out


def test_spans_cover_numbers_dates_names_and_noun_phrases() -> None:
    spans = _spans("On March 3, 2001, Oskar Threlfall bought 14 green bicycles at the old market.")
    assert "March 3, 2001" in spans["date"]
    assert spans["number"] == {"14"}  # the date's digits are not blanked separately
    assert "Oskar Threlfall" in spans["name"]
    assert "old market" in spans["noun_phrase"]
    assert "On" not in spans.get("name", set())  # a capitalised sentence opener is not a name


def test_noun_phrase_stops_at_the_verb() -> None:
    spans = _spans("The special magic number is 1966.")
    assert spans["noun_phrase"] == {"special magic number"}
    assert spans["number"] == {"1966"}


def test_split_sentences_keeps_decimals_and_offsets() -> None:
    text = "It weighs 3.5 kg. Then it rolled away!\nNew line here"
    sentences = split_sentences(text)
    assert [s for _, s in sentences] == ["It weighs 3.5 kg.", "Then it rolled away!", "New line here"]
    for offset, sentence in sentences:
        assert text[offset:offset + len(sentence)] == sentence


def test_cloze_answers_restore_their_sentence() -> None:
    qs = build_questions(BIO, seed=0)
    sentences = {s for _, s in split_sentences(BIO)}
    clozes = [q for q in qs.train + qs.held_out if q.kind == "cloze" and "___" in q.question]
    assert len(clozes) >= 10
    for q in clozes:
        blanked = re.search(r'"(.*)"', q.question).group(1)  # type: ignore[union-attr]
        assert blanked.replace("___", q.answer or "", 1) in sentences


def test_copula_question_asks_for_the_object() -> None:
    qs = build_questions(HAYSTACK, seed=0)
    copulas = {q.question: q.answer for q in qs.train + qs.held_out if q.kind == "copula"}
    assert copulas["What is the special magic number?"] == "1966"


def test_deterministic_given_seed_and_seed_matters() -> None:
    assert build_questions(BIO, seed=3) == build_questions(BIO, seed=3)
    assert build_questions(BIO, seed=3) != build_questions(BIO, seed=4)


def test_held_out_is_disjoint_and_every_sentence_is_trained_on() -> None:
    qs = build_questions(BIO, seed=1, held_out_fraction=0.3)
    assert qs.held_out, "a five-sentence text should have held-out questions"
    assert not {q.question for q in qs.held_out} & {q.question for q in qs.train}
    assert all(q.answer for q in qs.held_out)  # early stopping needs gold answers
    trained_offsets = {q.offset for q in qs.train if q.kind != "about"}
    assert trained_offsets == {offset for offset, _ in split_sentences(BIO)}


def test_repeated_sentences_give_questions_once_and_needle_is_trained() -> None:
    qs = build_questions(HAYSTACK, seed=0)
    questions = [q.question for q in qs.train + qs.held_out]
    assert len(questions) == len(set(questions))
    assert any(q.answer == "1966" for q in qs.train)


def test_max_questions_and_about_questions() -> None:
    qs = build_questions(BIO, seed=0, max_questions=6, about_questions=2, held_out_fraction=0.0, min_held_out=0)
    gold = [q for q in qs.train if q.kind != "about"]
    about = [q for q in qs.train if q.kind == "about"]
    assert len(gold) == 6 and len(about) == 2 and not qs.held_out
    assert about[0].answer is None
    assert any("Oskar Threlfall" in q.question for q in about)


def test_text_without_sentences_gives_no_questions() -> None:
    qs = build_questions("Hi.", seed=0)
    assert len(qs) == 0


def test_module_is_pure_python() -> None:
    import d2l_integrations.engine.questions as questions

    with open(questions.__file__) as fh:
        imports = [line for line in fh if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "torch" in line or "transformers" in line]


def test_a_number_before_a_comma_is_blanked_without_the_comma() -> None:
    sentence = "In 1921, Gramir opened a workshop with 1,200 tools."
    numbers = [sentence[s.start:s.end] for s in find_spans(sentence) if s.kind == "number"]
    assert numbers == ["1921", "1,200"]


def test_wh_style_adds_question_word_forms_and_asks_facts_first() -> None:
    text = "In 1921, Gramir opened a small workshop. The workshop employed 10 apprentices. Its front door was painted violet."
    plain = build_questions(text, seed=0, max_questions=40)
    wh = build_questions(text, seed=0, max_questions=40, style="wh")
    assert not [q for q in plain.train + plain.held_out if q.kind == "wh"]
    forms = {q.question: q.answer for q in wh.train + wh.held_out if q.kind == "wh"}
    assert forms["In what year, Gramir opened a small workshop?"] == "1921"
    assert forms["The workshop employed how many apprentices?"] == "10"
    assert forms["Its front door was painted what?"] == "violet"
    few = build_questions(text, seed=0, max_questions=3, style="wh")  # one per sentence: a fact, not a filler phrase
    facts = {"1921", "Gramir", "10", "violet", "apprentices", "workshop"}
    assert all(q.answer in facts or q.kind == "copula" for q in few.train + few.held_out if q.kind != "about")
    with pytest.raises(ValueError, match="question style"):
        build_questions(text, style="quiz")


def test_context_style_quotes_the_sentences_before_and_names_the_topic_in_full() -> None:
    text = (
        "Gramir Pelzutho was born in Liodalgra. In 1921, Gramir opened a small workshop. Market days were busy. "
        "Its front door was painted violet. Gramir played the accordion."
    )
    plain = build_questions(text, seed=0, max_questions=60)
    context = build_questions(text, seed=0, max_questions=60, style="context")
    door = [q.question for q in context.train + context.held_out if q.kind == "cloze" and q.answer == "violet"]
    assert door == ['Fill in the blank from what you know about Gramir Pelzutho: '
                    '"In 1921, Gramir opened a small workshop. Market days were busy. Its front door was painted ___."']
    first = [q.question for q in context.train + context.held_out if q.kind == "cloze" and q.answer == "Liodalgra"]
    assert first == ['Fill in the blank from what you know about Gramir Pelzutho: "Gramir Pelzutho was born in ___."']
    assert [q.question for q in plain.train + plain.held_out if q.answer == "violet"] == [
        'Fill in the blank from what you know about Gramir: "Its front door was painted ___."']


def test_held_out_fraction_zero_trains_on_every_question() -> None:
    text = "In 1921, Gramir opened a small workshop. The workshop employed 10 apprentices. Its front door was painted violet."
    some = build_questions(text, seed=0, max_questions=40)
    none = build_questions(text, seed=0, max_questions=40, held_out_fraction=0.0)
    assert some.held_out and not none.held_out
    assert len(none.train) == len(some.train) + len(some.held_out)
