"""benchmarks.closing_table: summary and markdown for all routes or a subset (--routes / --integrations)."""

from __future__ import annotations

import pytest

from benchmarks.closing_table import Question, Row, main, render, summarize


def _row(qid: str, integration: str, route: str, correct: bool) -> Row:
    return Row(qid=qid, question=f"Q {qid}?", gold=["x"], gold_doc="doc", integration=integration, route_asked=route, route=route,
               reason="because", fallback_from=None, answer="x" if correct else "y", correct=correct, prompt_tokens=10,
               completion_tokens=2, prompt_tokens_saved=0, latency_s=0.5, cpu_s=1.0, router_total_s=0.1,
               source_chunk_ids=["doc@1#0"], gold_doc_in_sources=True)


QUESTIONS = [Question("a", "Q a?", ("x",), "doc"), Question("b", "Q b?", ("x",), "doc")]
INFO = {k: "-" for k in ("command", "base_model", "dtype", "device", "threads", "max_tokens", "method", "checkpoint_id",
                         "checkpoint_source", "internalizer", "cpus", "machine", "git", "date", "load_start", "load_end",
                         "wall_s", "documents", "ingest", "questions", "router_config")}
INFO["wall_s"] = 1.0


def test_a_subset_of_routes_and_one_integration_renders_only_what_was_asked():
    rows = [_row("a", "langchain", "d2l", True), _row("b", "langchain", "d2l", False)]
    summary = summarize(rows)
    assert [(s["integration"], s["route_asked"], s["correct"], s["n"]) for s in summary] == [("langchain", "d2l", 1, 2)]
    md = render(rows, QUESTIONS, summary, INFO)
    assert "1/2" in md and "LlamaIndex" not in md.split("## Summary")[1] and "rag: answer" not in md
    assert "not checked" in md  # agreement needs both integrations


def test_all_routes_and_both_integrations_check_agreement():
    rows = [_row(q, i, r, True) for q in "ab" for i in ("langchain", "llama_index") for r in ("d2l", "rag", "auto")]
    md = render(rows, QUESTIONS, summarize(rows), INFO)
    assert "on all 6 (question, route) pairs" in md and "`auto`, per question" in md


def test_unknown_route_is_refused():
    with pytest.raises(SystemExit):
        main(["--routes", "d2l,telepathy"])
