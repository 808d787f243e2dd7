from __future__ import annotations

from benchmarks.syllable_words import CONDITIONS, made_up_words, own_made_up, score
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig
from d2l_integrations.engine.training_data import Example, FactsTask, TaskMix, name_syllables
from tests.unit.engine.test_training import tiny_hypernet

SYL = name_syllables("classic", "train")


def test_made_up_words_are_whole_words_of_two_or_more_training_syllables():
    assert made_up_words("Drowenbri met The Lioost of Lioost near Oxygen and Nelson.", SYL) == {"drowenbri", "lioost"}
    assert made_up_words("var and nel alone, Varnelx, Kessel", SYL) == set()  # one syllable, a stray letter, a real word


def test_own_made_up_discounts_words_the_document_or_question_holds():
    ex = Example("Lioost is a town on the river.", "Where is it?", "", "", ("river",), "wiki")
    assert not own_made_up("It is in Lioost.", ex, SYL)
    assert own_made_up("It is in Drowenbri.", ex, SYL)
    assert not own_made_up("It is on the river.", ex, SYL)


def test_score_gives_a_percentage_per_condition(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), TrainingConfig(tasks=(("facts", 1.0),), eval_every=0))
    rows = TaskMix([(FactsTask(), 1.0)], seed=3).fixed(4)
    table = score(trainer, rows, SYL, batch_size=2, max_new_tokens=3)
    assert set(table) == set(CONDITIONS) and all(0.0 <= v <= 100.0 for v in table.values())
