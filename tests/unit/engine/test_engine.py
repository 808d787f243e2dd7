"""D2LEngine on a tiny random llama: decoding, batching, streaming, state, and bad input."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights
from d2l_integrations.errors import (
    ConfigError,
    ContextLengthError,
    HypernetworkUnavailableError,
    IncompatibleAdapterError,
    InvalidDocumentError,
    InvalidMessagesError,
)
from tests.tiny_models import SeededInternalizer

USER = [{"role": "user", "content": "What is the special magic number?"}]
OTHER = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who founded Zorblax?"}]


def random_adapter(base, seed: int, *, rank: int = 4, scale: float = 0.5, name: str | None = None) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(base.num_layers):
        path = base.module_path(layer, "down_proj")
        lin = base.model.get_submodule(path)
        weights[path] = LoRAWeights(
            torch.randn(rank, lin.in_features, generator=g) * scale,
            torch.randn(lin.out_features, rank, generator=g) * scale,
            2.0,
        )
    return LoRAAdapter(weights, AdapterProvenance(base_model=name or base.name, method="external"))


@pytest.fixture()
def engine(tiny_base):
    return D2LEngine(tiny_base)


def test_stream_concatenates_to_generate(engine):
    adapter = random_adapter(engine.base, 1)
    full = engine.generate(USER, adapters=adapter, max_new_tokens=12)
    events = list(engine.stream(USER, adapters=adapter, max_new_tokens=12))
    assert events[-1].generation == full or events[-1].generation.text == full.text
    assert "".join(e.text for e in events) == full.text
    assert full.completion_tokens == len(full.token_ids) > 0
    assert full.prompt_tokens == len(engine.base.chat_ids(USER))
    assert set(full.timings) >= {"prefill_s", "first_token_s", "decode_s", "total_s"}


def test_batch_rows_with_own_adapters_equal_separate_runs(engine):
    a, b = random_adapter(engine.base, 1), random_adapter(engine.base, 2, rank=2)
    convs = [USER, OTHER, USER]
    rows = [a, b, None]
    batch = engine.generate_batch(convs, adapters=rows, max_new_tokens=10)
    single = [engine.generate(c, adapters=r, max_new_tokens=10) for c, r in zip(convs, rows)]
    assert [g.token_ids for g in batch] == [g.token_ids for g in single]
    # the adapters really change the output (otherwise the test above proves nothing)
    assert batch[0].token_ids != batch[2].token_ids


def test_adapter_changes_logits_and_base_is_restored(engine):
    ids = torch.tensor([engine.base.chat_ids(USER)])
    before = engine.base.model(input_ids=ids).logits
    from d2l_integrations.engine.apply import use_adapters

    with use_adapters(engine.base.model, random_adapter(engine.base, 3)):
        during = engine.base.model(input_ids=ids).logits
    after = engine.base.model(input_ids=ids).logits
    assert not torch.allclose(before, during)
    assert torch.equal(before, after)


def test_stop_strings_and_length(engine):
    g = engine.generate(USER, adapters=None, max_new_tokens=6)
    assert g.finish_reason in ("length", "stop")
    if g.finish_reason == "length":
        assert g.completion_tokens == 6
    text = engine.generate(USER, adapters=None, max_new_tokens=12).text
    assert len(text) > 2
    stop = text[1:3]
    stopped = engine.generate(USER, adapters=None, max_new_tokens=12, stop=[stop])
    assert stop not in stopped.text and stopped.finish_reason == "stop"
    assert text.startswith(stopped.text)


def test_sampling_is_reproducible_with_seed(engine):
    kw = dict(adapters=None, max_new_tokens=8, temperature=1.0, seed=7)
    assert engine.generate(USER, **kw).token_ids == engine.generate(USER, **kw).token_ids


def test_internalize_composes_and_reset_forgets(engine):
    internalizer = SeededInternalizer()
    engine.hypernetwork = internalizer
    doc = "The special magic number is 4821. " * 40
    adapter = engine.internalize(doc, method="hypernetwork", chunk_tokens=64)
    chunks = engine.chunk(doc, chunk_tokens=64)
    assert len(chunks) > 1 and internalizer.calls == [hashlib.sha256(c.encode()).hexdigest() for c in chunks]
    assert adapter.num_chunks == len(chunks)
    assert adapter.rank == 4 * len(chunks)
    assert engine.active_adapter is adapter
    with_knowledge = engine.generate(USER, max_new_tokens=8)
    second = engine.internalize("Paris is the capital of France.", method="hypernetwork")
    assert engine.active_adapter.num_chunks == len(chunks) + 1
    engine.reset()
    assert engine.active_adapter is None
    plain = engine.generate(USER, max_new_tokens=8)
    assert plain.token_ids == engine.generate(USER, adapters=None, max_new_tokens=8).token_ids
    assert with_knowledge.token_ids != plain.token_ids
    assert second.num_chunks == 1


def test_hypernetwork_method_without_checkpoint_says_what_to_do(engine):
    with pytest.raises(HypernetworkUnavailableError, match="method='distill'"):
        engine.internalize("Some text.", method="hypernetwork")
    with pytest.raises(ConfigError, match="Choose one of"):
        engine.internalizer("magic")


def test_chunking_long_document_is_exact_and_bounded(engine):
    words = [f"w{i % 997}" for i in range(210_000)]
    text = " ".join(words)  # ~1.1M characters
    assert len(text) > 1_000_000
    chunks = engine.chunk(text, chunk_tokens=256)
    tok = engine.base.tokenizer
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 256 + 2 for c in chunks[:50])
    assert all(c in text for c in chunks[:20])
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")  # nothing lost, nothing duplicated
    overlapping = engine.chunk(" ".join(words[:3000]), chunk_tokens=128, overlap_tokens=16)
    assert len(overlapping) > len(engine.chunk(" ".join(words[:3000]), chunk_tokens=128))


@pytest.mark.parametrize("bad", ["", "   \n\t ", b"\x00\x01\xff\xfe" * 100, "\x00\x01\x02\x03" * 200, 42])
def test_bad_documents_raise_typed_errors(engine, bad):
    with pytest.raises(InvalidDocumentError):
        engine.chunk(bad)


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "system", "content": "only system"}], [{"role": "user", "content": ["image"]}], [{"role": "tool", "content": "x"}]],
)
def test_bad_messages_raise_typed_errors(engine, messages):
    with pytest.raises(InvalidMessagesError):
        engine.generate(messages, adapters=None, max_new_tokens=2)


def test_prompt_longer_than_context_window(engine):
    long = [{"role": "user", "content": "magic number " * 400}]
    with pytest.raises(ContextLengthError, match="Internalize long documents"):
        engine.generate(long, adapters=None, max_new_tokens=4)


def test_adapter_from_other_base_model_is_refused(engine):
    foreign = random_adapter(engine.base, 5, name="some/other-model")
    with pytest.raises(IncompatibleAdapterError, match="some/other-model"):
        engine.generate(USER, adapters=foreign, max_new_tokens=2)


def test_unknown_generation_setting(engine):
    with pytest.raises(ConfigError, match="Unknown generation settings"):
        engine.generate(USER, adapters=None, beams=3)


def test_concurrent_requests_see_only_their_own_adapters(engine):
    adapters = [random_adapter(engine.base, s) for s in range(6)]
    expected = [engine.generate(USER, adapters=a, max_new_tokens=6).token_ids for a in adapters]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda a: engine.generate(USER, adapters=a, max_new_tokens=6).token_ids, adapters * 3))
    assert got == expected * 3


def test_score_prefers_the_models_own_answer(engine):
    g = engine.generate(USER, adapters=None, max_new_tokens=6)
    own = engine.score(USER, g.text)
    assert own > engine.score(USER, "zzzz qqqq xxxx")


def test_interleaved_streams_keep_their_own_adapters(engine):
    a, b = random_adapter(engine.base, 11), random_adapter(engine.base, 12)
    expected_a = engine.generate(USER, adapters=a, max_new_tokens=8).text
    expected_b = engine.generate(USER, adapters=b, max_new_tokens=8).text
    assert expected_a != expected_b
    sa, sb = engine.stream(USER, adapters=a, max_new_tokens=8), engine.stream(USER, adapters=b, max_new_tokens=8)
    got_a, got_b = [], []
    live = {"a": (sa, got_a), "b": (sb, got_b)}
    while live:  # advance the two streams alternately, one event each
        for name in list(live):
            stream, sink = live[name]
            try:
                sink.append(next(stream).text)
            except StopIteration:
                del live[name]
    assert "".join(got_a) == expected_a and "".join(got_b) == expected_b


def test_cached_greedy_decoding_equals_recomputing_the_whole_sequence(engine):
    """The decoder's KV cache must be used: a cache passed under the wrong keyword (transformers
    renamed ``past_key_values`` to ``cache``) is swallowed by ``**kwargs`` and every step after
    the first then sees only its last token."""
    adapter = random_adapter(engine.base, 3)
    got = engine.generate(USER, adapters=adapter, max_new_tokens=10)
    ids = list(engine.base.chat_ids(USER))
    want = []
    from d2l_integrations.engine.apply import use_adapters

    with torch.no_grad(), use_adapters(engine.base.model, [adapter]):
        for _ in range(len(got.token_ids)):
            logits = engine.base.model(input_ids=torch.tensor([ids + want]), use_cache=False).logits[0, -1]
            want.append(int(logits.argmax()))
    assert list(got.token_ids) == want


def test_cache_kwarg_follows_the_forward_signature():
    from d2l_integrations.engine.base_model import cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            return input_ids

    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"


def test_distill_settings_follow_the_device_unless_given(tiny_base):
    from d2l_integrations.engine.distill import DistillConfig

    assert D2LEngine(tiny_base).internalizer("distill").config == DistillConfig.for_device(tiny_base.device)
    mine = DistillConfig(rank=4)
    assert D2LEngine(tiny_base, distill_config=mine).internalizer("distill").config is mine


@pytest.mark.parametrize(("preference", "expected"), [
    (True, "hypernetwork"), (False, "distill"), ({"cpu": True, "cuda": False}, "hypernetwork"),
    ({"cpu": False, "cuda": True}, "distill"), ({"cuda": True}, "distill"),
])
def test_auto_follows_the_checkpoints_preference_for_this_device(tiny_base, preference, expected):
    from tests.tiny_models import SeededInternalizer

    net = SeededInternalizer()
    net.prefer_over_distill = preference
    assert tiny_base.device.type == "cpu"
    assert D2LEngine(tiny_base, net).internalizer("auto").name == expected
