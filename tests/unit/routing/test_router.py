"""``Router`` end to end on a real D2LEngine (tiny random Llama) and a real KnowledgeBase (embedded Chroma)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.errors import InvalidMessagesError, NoAdaptersError
from d2l_integrations.knowledge import KnowledgeBase
from d2l_integrations.routing import Internalized, InternalizedDocument, Route, Router, RouterConfig

DOCS = {
    "zorblax": "The Zorblax Institute was founded in 1873 by Mira Quell in the town of Vell.",
    "banana": "Bananas are yellow fruits grown in Ecuador and shipped in cold boats.",
    "vell": "The capital of Vell is Oskar town, which lies on the river Fen.",
}
QUESTION = [{"role": "user", "content": "Who founded the Zorblax Institute?"}]
CONFIG = RouterConfig(top_k=2, min_relevance=0.5, adapter_budget=2, min_confidence=-100.0)
SETTINGS = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def kb(engine: D2LEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    store = KnowledgeBase(tmp_path_factory.mktemp("kb"), engine)
    store.add(list(DOCS.values()), doc_id=list(DOCS))
    yield store
    store.close()


@pytest.fixture()
def router(engine: D2LEngine, kb: KnowledgeBase) -> Router:
    return Router(engine, kb, CONFIG)


def test_d2l_applies_exactly_the_relevant_chunks_adapters(router: Router, engine: D2LEngine, kb: KnowledgeBase) -> None:
    answer = router.answer(QUESTION, route="d2l", **SETTINGS)
    assert answer.decision.route is Route.D2L and answer.decision.chunk_ids == ("zorblax@0#0",)
    assert answer.decision.adapter_ids == (kb.search(QUESTION[0]["content"], k=1)[0].adapter_id,)
    expected = engine.generate(QUESTION, adapters=kb.adapters_for(["zorblax@0#0"]), **SETTINGS)
    assert answer.generation.token_ids == expected.token_ids
    assert answer.generation.token_ids != engine.generate(QUESTION, adapters=None, **SETTINGS).token_ids
    assert [c.chunk_id for c in answer.chunks] == ["zorblax@0#0"]


def test_d2l_saves_prompt_tokens_against_full_context(router: Router) -> None:
    d2l = router.answer(QUESTION, route="d2l", **SETTINGS)
    full = router.answer(QUESTION, route="full_context", **SETTINGS)
    assert d2l.usage.prompt_tokens < full.usage.prompt_tokens
    assert d2l.usage.full_context_prompt_tokens == full.usage.full_context_prompt_tokens
    assert d2l.usage.prompt_tokens_saved == d2l.usage.full_context_prompt_tokens - d2l.usage.prompt_tokens > 0
    assert set(d2l.timings) >= {"retrieve_s", "internalize_s", "generate_s", "total_s"}


def test_rag_hybrid_and_full_context_prompts(router: Router) -> None:
    rag = router.plan(QUESTION, route="rag")
    assert rag.adapter is None and DOCS["zorblax"] in rag.messages[-1]["content"]
    assert QUESTION[0]["content"] in rag.messages[-1]["content"]
    hybrid = router.plan(QUESTION, route="hybrid")
    assert hybrid.adapter is not None and DOCS["zorblax"] in hybrid.messages[-1]["content"]
    full = router.plan(QUESTION, route="full_context")
    assert full.adapter is None and all(text in full.messages[-1]["content"] for text in DOCS.values())


def test_auto_falls_back_to_rag_below_min_confidence(engine: D2LEngine, kb: KnowledgeBase) -> None:
    strict = Router(engine, kb, dataclasses.replace(CONFIG, min_confidence=0.0))  # every answer is "unsure"
    answer = strict.answer(QUESTION, **SETTINGS)
    assert answer.decision.route is Route.RAG and answer.decision.fallback_from is Route.D2L
    assert answer.decision.scores["d2l_mean_logprob"] < 0.0
    assert "first_attempt_generate_s" in answer.timings
    lenient = Router(engine, kb, CONFIG).answer(QUESTION, **SETTINGS)
    assert lenient.decision.route is Route.D2L and lenient.decision.fallback_from is None


def test_internalized_documents_without_knowledge_base(engine: D2LEngine) -> None:
    text = DOCS["zorblax"]
    adapter = engine.internalize(text, activate=False)
    internalized = Internalized().add(InternalizedDocument("z", text, adapter, engine.count_tokens(text), 0.0))
    router = Router(engine, None, CONFIG)
    answer = router.answer(QUESTION, internalized=internalized, **SETTINGS)
    assert answer.decision.route is Route.D2L and answer.decision.adapter_ids == ("z",)
    assert answer.generation.token_ids == engine.generate(QUESTION, adapters=adapter, **SETTINGS).token_ids
    with pytest.raises(NoAdaptersError, match="nothing is internalized"):
        router.answer(QUESTION, route="d2l", **SETTINGS)
    assert router.answer(QUESTION, **SETTINGS).decision.route is Route.BASE
    assert internalized.remove(["z"]).adapter is None


def test_batch_rows_match_one_at_a_time(router: Router) -> None:
    questions = [QUESTION, [{"role": "user", "content": "What colour are bananas?"}], [{"role": "user", "content": "Quote the text about Vell."}]]
    batch = router.answer_batch(questions, **SETTINGS)
    single = [router.answer(q, **SETTINGS) for q in questions]
    assert [a.decision.route for a in batch] == [a.decision.route for a in single]
    assert [a.generation.token_ids for a in batch] == [a.generation.token_ids for a in single]
    assert batch[2].decision.route is Route.RAG  # the verbatim cue


def test_stream_matches_answer(router: Router) -> None:
    plan = router.plan(QUESTION, route="d2l")
    events = list(router.stream(plan, **SETTINGS))
    final = events[-1].generation
    assert final is not None
    streamed = router.finish(plan, final)
    assert "".join(e.text for e in events) == streamed.text == router.answer(QUESTION, route="d2l", **SETTINGS).text


def test_conversation_without_user_message_is_rejected(router: Router) -> None:
    with pytest.raises(InvalidMessagesError):
        router.answer([{"role": "system", "content": "Be brief."}], **SETTINGS)
    with pytest.raises(InvalidMessagesError):
        router.answer([], **SETTINGS)


def test_interleaved_streams_in_one_thread_keep_their_own_adapters(router: Router) -> None:
    d2l_plan = router.plan(QUESTION, route="d2l")
    rag_plan = router.plan(QUESTION, route="rag")
    expected = ["".join(e.text for e in router.stream(p, **SETTINGS)) for p in (d2l_plan, rag_plan)]
    streams = [router.stream(d2l_plan, **SETTINGS), router.stream(rag_plan, **SETTINGS)]
    texts = ["", ""]
    for a, b in zip(*streams, strict=False):  # step both generators alternately in this thread
        texts[0] += a.text
        texts[1] += b.text
    for i, rest in enumerate(streams):
        texts[i] += "".join(e.text for e in rest)
    assert texts == expected
