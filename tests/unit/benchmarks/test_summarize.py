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
             {"squad": {"specific_gain_kl": 0.0666, "specific_gain_kl_se": 0.0371}})
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
    main([str(a), str(b)])
    assert "Teacher-forced" in capsys.readouterr().out


def test_a_folder_without_tables_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither eval.json nor eval_kl.json"):
        _runs([str(tmp_path)])
