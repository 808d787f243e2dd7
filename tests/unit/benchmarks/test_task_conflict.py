from __future__ import annotations

import pytest
import torch

from benchmarks.task_conflict import (
    DEFAULT_GROUPS,
    conflict_table,
    group_gradients,
    parse_groups,
    probe,
    shares,
    task_base,
)
from d2l_integrations.engine.training import DistillationTrainer
from tests.unit.engine.test_training import config, tiny_hypernet

GROUPS = {"needle_alone": "needles", "facts": "facts"}


def test_groups_parse_and_a_task_in_two_groups_or_an_empty_spec_is_refused():
    groups = parse_groups(DEFAULT_GROUPS)
    assert groups["squad"] == "squad" and groups["wiki_swap"] == "natural" and groups["needle_para"] == "made_up"
    with pytest.raises(ValueError, match="in two groups"):
        parse_groups("a=squad;b=squad,wiki")
    with pytest.raises(ValueError, match="expected 'name=task,task'"):
        parse_groups("a=")
    assert task_base("squad/1-2+d1*5") == "squad" and task_base("facts_varied") == "facts_varied"


def test_the_group_gradients_add_up_to_the_gradient_of_the_whole_batch(tiny_base):
    """Each group's gradient is its rows' mean loss's: weighted by the rows, they sum to the batch mean's gradient."""
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(batch_size=8, prefetch=False, ce_weight=0.3))
    grads, counts = group_gradients(trainer, 0, GROUPS)
    assert set(grads) == {"needles", "facts"} and sum(counts.values()) == 8

    batch = trainer._draw(0, generate=True)[4]
    t_logits, feats, mask = trainer.teacher(batch)
    parts = trainer.losses(t_logits, trainer.student(batch, trainer.document_factors(batch, feats, mask), bias=True), batch)
    trainer.distill_loss(parts).backward()
    whole = torch.cat([p.grad.flatten() for p in trainer.hypernet.parameters() if p.requires_grad])
    combined = sum(counts[g] * grads[g] for g in grads) / 8
    assert whole.norm() > 0
    torch.testing.assert_close(combined, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads["needles"], grads["facts"])


def test_the_table_reads_agreement_and_conflict():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    per_batch = [{"x": a, "y": -a}, {"x": a * 2, "y": -a}, {"x": a + 0.1 * b, "y": b}]
    table = conflict_table(per_batch)
    assert table["x|x"]["kind"] == "within" and table["x|x"]["mean"] > 0.99 and table["x|x"]["pairs"] == 3
    assert table["x|y"]["kind"] == "across" and table["x|y"]["pairs"] == 6 and table["x|y"]["mean"] < 0
    assert table["x|y"]["summed"] < -0.5 and table["x|x"]["summed_halves"] > 0.99


def test_the_probe_runs_on_the_tiny_model_and_refuses_too_few_batches(tiny_base):
    lines = []
    table = probe(tiny_base, tiny_hypernet(tiny_base), config().tasks, groups=GROUPS, batches=3, batch_size=6,
                  config_kw={"max_doc_tokens": 48}, on_line=lines.append)
    assert [line["batch"] for line in lines] == [0, 1, 2]
    assert {"needles|needles", "facts|facts", "facts|needles"} <= set(table)
    assert all(-1.0 <= row["mean"] <= 1.0 for row in table.values() if row["pairs"])
    assert table["facts|facts"]["rows"] + table["needles|needles"]["rows"] == 18
    with pytest.raises(ValueError, match="at least 2 batches"):
        probe(tiny_base, tiny_hypernet(tiny_base), config().tasks, groups=GROUPS, batches=1)


def test_a_group_seen_in_one_batch_gets_its_norm_and_summed_cosines_but_no_pairs():
    a = torch.tensor([1.0, 2.0])
    table = conflict_table([{"x": a, "y": a}, {"x": -a}])
    assert table["y|y"] == {"kind": "within", "pairs": 0, "batches": 1, "grad_norm": round(float(a.norm()), 5)}
    assert table["x|y"]["summed"] == 0.0 and table["x|y"]["pairs"] == 1  # x's summed gradient is 0
    assert table["x|x"]["mean"] == -1.0 and table["x|x"]["summed_halves"] == -1.0


def test_the_shares_count_the_rows_drawn_and_kept_by_task(tiny_base):
    table = shares(tiny_base, tiny_hypernet(tiny_base), config().tasks, batches=4, batch_size=6, config_kw={"max_doc_tokens": 48})
    assert set(table) == {"needle_alone", "facts"}
    assert abs(sum(row["drawn"] for row in table.values()) - 1) < 1e-3 and abs(sum(row["kept"] for row in table.values()) - 1) < 1e-3
    assert all(row["kept_over_drawn"] == 1.0 for row in table.values())  # no teacher answers to miss here
