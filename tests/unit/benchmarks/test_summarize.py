from __future__ import annotations

import json

import pytest

from benchmarks.device.summarize import _runs, greedy_table, main, teacher_forced_table


def _run(folder, greedy=None, kl=None):
    folder.mkdir(parents=True)
    if greedy is not None:
        (folder / "eval.json").write_text(json.dumps(greedy))
    if kl is not None:
        (folder / "eval_kl.json").write_text(json.dumps(kl))
    return folder


def test_tables_read_each_run_and_leave_missing_cells_empty(tmp_path, capsys):
    a = _run(tmp_path / "a", {"facts": {"accuracy": {"d2l": 49.2, "mismatched": 8.2}},
                              "squad": {"accuracy": {"d2l": 6.25, "mismatched": 2.3}, "score": {"d2l": 4.2, "mismatched": 3.2}}},
             {"squad": {"matched_key_kl": 2.3, "none_key_kl": 1.1, "doc_gain_kl": 0.012, "doc_gain_kl_se": 0.01}})
    b = _run(tmp_path / "b" / "out", {"facts": {"accuracy": {"d2l": 43.0, "mismatched": 7.0, "doc_only": 40.0,
                                                             "doc_only_mismatched": 5.5}}},
             {"squad": {"specific_gain_kl": 0.0666, "specific_gain_kl_se": 0.0371, "doc_gain_kl": 0.02}})
    runs = _runs([f"S10s2={a}", str(b)])
    assert list(runs) == ["S10s2", "b"]  # a run's out/ folder is named by its parent
    greedy = greedy_table(runs).splitlines()
    assert greedy[0] == "| task | S10s2 | b |"
    assert "| facts | 49.2 / 8.2 | 43.0 / 7.0 |" in greedy
    assert "| facts (doc only) |  | 40.0 / 5.5 |" in greedy
    assert "| squad | 6.2 / 2.3 |  |" in greedy and "| squad F1 | 4.2 / 3.2 |  |" in greedy
    tf = teacher_forced_table(runs).splitlines()
    assert "| squad: key KL bias+doc / none | 2.30 / 1.10 |  |" in tf
    assert "| squad: specific gain |  | 0.067 ± 0.037 |" in tf
    assert "| squad: doc_gain | 0.012 ± 0.010 | 0.020 |" in tf  # no SE kept: the value alone, not "± 0.000"
    main([str(a), str(b)])
    assert "Teacher-forced" in capsys.readouterr().out


def test_a_folder_without_tables_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither eval.json nor eval_kl.json"):
        _runs([str(tmp_path)])
    (tmp_path / "stdout.txt").write_text('{"step": 25, "loss": 1.9}\n')  # training lines alone are no table
    with pytest.raises(SystemExit, match="nor a stdout.txt with evaluation lines"):
        _runs([str(tmp_path)])


def test_a_run_packed_before_its_tables_is_read_from_its_stdout(tmp_path):
    """Session 25: the device time ran out while s26m was evaluating; its tables came back only as printed lines."""
    run = tmp_path / "s26m"
    (run / "out").mkdir(parents=True)
    (run / "stdout.txt").write_text("\n".join([
        "base loaded in 11.3s on cuda:0",
        '{"step": 1721, "stopped": "steps"}',
        '{"eval": "squad", "n": 768, "accuracy": {"d2l": 6.0, "mismatched": 3.4}, "f1": {"d2l": 4.1, "mismatched": 3.6}, "samples": {}}',
        '{"eval": "facts", "n": 256, "accuracy": {"d2l": 38.7, "mismatched": 5.1}, "f1": {}, "samples": {}}',
        '{"eval_kl": "squad", "n": 128, "matched": 0.94, "none": 0.73, "doc_only": 0.81, "doc_gain": -0.071, '
        '"doc_gain_se": 0.019, "specific_gain": 0.1137, "doc_only_specific_gain": 0.0957, "s": 10.1}',
        '{"eval": "train:squad", "n": 256, "accu',  # cut off mid-line by the packing
    ]))
    runs = _runs([str(run / "out")])
    assert list(runs) == ["s26m"]
    greedy = greedy_table(runs).splitlines()
    assert "| squad | 6.0 / 3.4 |" in greedy and "| squad F1 | 4.1 / 3.6 |" in greedy and "| facts | 38.7 / 5.1 |" in greedy
    assert not any(line.startswith("| facts F1") or "train:squad" in line for line in greedy)
    tf = teacher_forced_table(runs).splitlines()
    assert "| squad: doc_gain | -0.071 ± 0.019 |" in tf
    assert "| squad: specific gain | 0.114 |" in tf  # printed without its SE (before session 25): no "± 0.000"
    assert "| squad: KL doc only / matched | 0.81 / 0.94 |" in tf
