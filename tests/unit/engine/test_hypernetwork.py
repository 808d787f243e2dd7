"""The hypernetwork module and its internalizer, on a tiny random Llama and a toy tokenizer (CPU)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.hypernetwork import (
    CrossAttention,
    Hypernetwork,
    HypernetworkInternalizer,
    add_layer_mix,
    default_module_path,
    encode_context,
    features_from_hidden_states,
    grow_latents,
    grow_rank,
    replace_head,
)
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights
from d2l_integrations.errors import ConfigError, IncompatibleCheckpointError, InvalidDocumentError

LAYERS, HIDDEN, INTERMEDIATE = 2, 16, 32


class ToyTokenizer:
    """Character tokenizer with a BOS and a chat template, enough for the internalizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    eos_token = ""
    chat_template = "toy"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + [3 + ord(c) % 60 for c in text]}

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": "S"}, *messages]
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def tiny_config(**overrides: Any) -> HypernetworkConfig:
    settings: dict[str, Any] = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, module_dims=(("down_proj", INTERMEDIATE, HIDDEN), ("q_proj", HIDDEN, HIDDEN)),
        rank=2, lora_alpha=3.0, latent_size=8, num_latents=3, num_blocks=2, num_heads=4, num_kv_heads=2, head_dim=4,
        base_model="tiny",
    )
    return HypernetworkConfig(**(settings | overrides))


def randomized(net: Hypernetwork, seed: int = 0) -> Hypernetwork:
    """Give every parameter (scalers and norms included) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.25 * noise if ("scaler" in name or "norm" in name) else 0.3 * noise)
    return net.eval()


@pytest.fixture(scope="module")
def base() -> BaseModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=48,
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.model.norm.weight.normal_(1.0, 0.2)  # a misplaced final norm must show
    return BaseModel(model=model, tokenizer=ToyTokenizer(), name="tiny", revision="rev-1")


@pytest.fixture(scope="module")
def net() -> Hypernetwork:
    torch.manual_seed(1)
    return randomized(Hypernetwork(tiny_config()))


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


ROWS = [[1, 5, 9, 3, 7, 11, 13], [1, 4, 6], [8, 10, 12, 14, 16]]


def test_forward_shapes_for_several_modules(net: Hypernetwork, base: BaseModel) -> None:
    ids, mask = padded(ROWS)
    with torch.inference_mode():
        factors = net(encode_context(base, ids, mask), mask)
    assert list(factors) == ["down_proj", "q_proj"]
    assert factors["down_proj"][0].shape == (3, LAYERS, 2, INTERMEDIATE)
    assert factors["down_proj"][1].shape == (3, LAYERS, 2, HIDDEN)
    assert factors["q_proj"][0].shape == (3, LAYERS, 2, HIDDEN)
    assert all(torch.isfinite(t).all() for pair in factors.values() for t in pair)


def test_features_equal_the_base_without_its_last_layer(base: BaseModel) -> None:
    ids, mask = padded(ROWS[:1])
    truncated = copy.deepcopy(base.model)
    truncated.model.layers = truncated.model.layers[:-1]
    with torch.inference_mode():
        reference = torch.stack(truncated.model(input_ids=ids, output_hidden_states=True).hidden_states, dim=1)
        got = encode_context(base, ids, mask)
        out = base.model(input_ids=ids, output_hidden_states=True)
        from_teacher = features_from_hidden_states(out.hidden_states, base.model.model.norm)
    assert got.shape == (1, LAYERS, 7, HIDDEN)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    assert torch.equal(from_teacher, got)


def test_encode_context_ignores_active_adapters(base: BaseModel) -> None:
    ids, mask = padded(ROWS)
    g = torch.Generator().manual_seed(0)
    adapter = LoRAAdapter(
        {"model.layers.0.self_attn.q_proj": LoRAWeights(torch.randn(2, HIDDEN, generator=g), torch.randn(HIDDEN, 2, generator=g), 5.0)},
        AdapterProvenance(base_model="tiny"),
    )
    with torch.inference_mode():
        plain = encode_context(base, ids, mask)
        with use_adapters(base.model, adapter):
            assert torch.equal(encode_context(base, ids, mask), plain)


def test_padding_never_changes_the_factors(net: Hypernetwork, base: BaseModel) -> None:
    ids, mask = padded(ROWS)
    with torch.inference_mode():
        batched = net(encode_context(base, ids, mask), mask)
        for row, tokens in enumerate(ROWS):
            one_ids, one_mask = padded([tokens])
            alone = net(encode_context(base, one_ids, one_mask), one_mask)
            for module, (A, B) in alone.items():
                # fused attention sums a padded row in another order: float noise (~3e-6), where a leak is O(1)
                torch.testing.assert_close(batched[module][0][row], A[0], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(batched[module][1][row], B[0], rtol=1e-4, atol=1e-5)
    garbage = encode_context(base, ids, mask).clone()
    garbage[mask.bool()[:, None, :, None].logical_not().expand_as(garbage)] = 1e4  # padded positions
    with torch.inference_mode():
        again = net(garbage, mask)
    torch.testing.assert_close(again["down_proj"][0], batched["down_proj"][0], rtol=1e-5, atol=1e-6)


def test_cross_attention_groups_query_heads_like_sdpa() -> None:
    torch.manual_seed(0)
    attention = CrossAttention(tiny_config()).eval()
    latents, context = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    q = attention.q_proj(latents).view(2, 3, 4, 4).transpose(1, 2)
    k = attention.k_proj(context).view(2, 5, 2, 4).transpose(1, 2)
    v = attention.v_proj(context).view(2, 5, 2, 4).transpose(1, 2)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], enable_gqa=True)
    expected = attention.o_proj(expected.transpose(1, 2).reshape(2, 3, 16))
    with torch.no_grad():
        torch.testing.assert_close(attention(latents, context, mask), expected, rtol=1e-5, atol=1e-6)


def test_untrained_network_with_the_published_init_leaves_the_base_unchanged(base: BaseModel) -> None:
    fresh = Hypernetwork(tiny_config(scaler_b_init=0.0)).eval()
    ids, mask = padded(ROWS[:1])
    with torch.inference_mode():
        adapter = fresh.to_adapters(fresh(encode_context(base, ids, mask), mask), base, AdapterProvenance(base_model="tiny"))[0]
    for name in adapter.module_names:
        assert not adapter.delta_weight(name).any()
    lora_A = adapter.weights[base.module_path(0, "down_proj")].lora_A
    assert torch.linalg.matrix_rank(lora_A) == 2  # distinct latent queries: the ranks are not copies


def test_default_init_opens_the_document_path(base: BaseModel) -> None:
    fresh = Hypernetwork(tiny_config()).eval()  # scaler_b_init = 1.0: generated B is not zero, so gradients reach it
    assert all(bool((p == 1.0).all()) for p in fresh.scaler_B.values())
    ids, mask = padded(ROWS[:2])
    with torch.inference_mode():
        adapters = fresh.to_adapters(fresh(encode_context(base, ids, mask), mask), base, AdapterProvenance(base_model="tiny"))
    name = adapters[0].module_names[0]
    assert adapters[0].delta_weight(name).abs().sum() > 0
    assert not torch.allclose(adapters[0].delta_weight(name), adapters[1].delta_weight(name))  # depends on the document


def test_to_adapters_layout(net: Hypernetwork, base: BaseModel) -> None:
    ids, mask = padded(ROWS[:2])
    provenance = [AdapterProvenance(base_model="tiny", source_sha256=(s,)) for s in ("a", "b")]
    with torch.inference_mode():
        factors = net(encode_context(base, ids, mask), mask)
        adapters = net.to_adapters(factors, base, provenance)
    assert [a.provenance.source_sha256 for a in adapters] == [("a",), ("b",)]
    assert adapters[0].bias is adapters[1].bias  # one bias LoRA, shared
    bias = net.bias_factors()
    for row, adapter in enumerate(adapters):
        for module, (A, B) in factors.items():
            for layer in range(LAYERS):
                path = base.module_path(layer, module)
                assert path == default_module_path(layer, module)
                w = adapter.weights[path]
                assert torch.equal(w.lora_A, A[row, layer]) and torch.equal(w.lora_B, B[row, layer].T)
                assert w.scaling == 3.0 and adapter.bias is not None
                assert torch.equal(adapter.bias[path].lora_B, bias[module][1][layer].T)
                delta = 3.0 * (B[row, layer].T @ A[row, layer] + bias[module][1][layer].T @ bias[module][0][layer])
                torch.testing.assert_close(adapter.delta_weight(path), delta, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="provenance"):
        net.to_adapters(factors, base, provenance[:1] * 3)


def test_no_bias_lora_when_disabled(base: BaseModel) -> None:
    net = randomized(Hypernetwork(tiny_config(use_bias_lora=False)))
    assert net.bias_factors() == {}
    ids, mask = padded(ROWS[:1])
    with torch.inference_mode():
        adapter = net.to_adapters(net(encode_context(base, ids, mask), mask), None, AdapterProvenance(base_model="tiny"))[0]
    assert adapter.bias is None


def test_internalizer_results_do_not_depend_on_batching(net: Hypernetwork, base: BaseModel) -> None:
    chunks = ["A long chunk of text here.", "short", "medium sized", "x"]
    calls: list[tuple[int, int]] = []
    one_batch = HypernetworkInternalizer(net, checkpoint_id="ckpt", max_batch_size=8).internalize_chunks(
        base, chunks, chunk_ids=["c0", "c1", "c2", "c3"], progress=lambda done, total: calls.append((done, total)))
    singles = HypernetworkInternalizer(net, checkpoint_id="ckpt", max_batch_size=1).internalize_chunks(base, chunks)
    by_tokens = HypernetworkInternalizer(net, checkpoint_id="ckpt", max_batch_tokens=30).internalize_chunks(base, chunks)
    assert calls == [(4, 4)]
    for i, chunk in enumerate(chunks):
        prov = one_batch[i].provenance
        assert prov.source_sha256 == (hashlib.sha256(chunk.encode()).hexdigest(),)
        assert prov.chunk_ids == (f"c{i}",) and prov.checkpoint_id == "ckpt" and prov.method == "hypernetwork"
        assert (prov.base_model, prov.base_model_revision) == ("tiny", "rev-1")
        for other in (singles[i], by_tokens[i]):
            assert other.provenance.source_sha256 == prov.source_sha256
            for name in one_batch[i].weights:
                torch.testing.assert_close(other.delta_weight(name), one_batch[i].delta_weight(name), rtol=1e-5, atol=1e-6)


def test_an_open_layer_mix_keeps_internalizing_independent_of_batching(net: Hypernetwork, base: BaseModel) -> None:
    mixed = add_layer_mix(net)
    with torch.no_grad():
        mixed.layer_mix_delta.copy_(0.1 * torch.randn(LAYERS, LAYERS, generator=torch.Generator().manual_seed(1)))
    chunks = ["A long chunk of text here.", "short", "medium sized"]
    together = HypernetworkInternalizer(mixed, max_batch_size=8).internalize_chunks(base, chunks)
    alone = HypernetworkInternalizer(mixed, max_batch_size=1).internalize_chunks(base, chunks)  # no padding
    plain = HypernetworkInternalizer(net, max_batch_size=8).internalize_chunks(base, chunks)
    for a, b, c in zip(together, alone, plain, strict=True):  # the mix is per token: padding cannot leak into it
        for name in a.weights:
            torch.testing.assert_close(a.delta_weight(name), b.delta_weight(name), rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(a.delta_weight(n), c.delta_weight(n)) for n in a.weights)  # and it is used


def test_internalizer_batches_respect_the_bounds(net: Hypernetwork, base: BaseModel) -> None:
    calls: list[tuple[int, int]] = []
    HypernetworkInternalizer(net, max_batch_size=2).internalize_chunks(
        base, ["a", "bb", "ccc", "dddd", "eeeee"], progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    internalizer = HypernetworkInternalizer(net, max_batch_size=8, max_batch_tokens=10)
    token_ids = [[0] * n for n in (3, 3, 3, 6)]
    assert internalizer._batches(token_ids) == [[0, 1, 2], [3]]


def test_context_formats(net: Hypernetwork, base: BaseModel) -> None:
    tokenizer = base.tokenizer
    chunk = " some text "
    raw = HypernetworkInternalizer(net).tokenize_chunk(base, chunk)
    assert raw == [1] + tokenizer(chunk, add_special_tokens=False)["input_ids"]
    prefix_net = Hypernetwork(tiny_config(context_format="chat_prefix"))
    prefix = HypernetworkInternalizer(prefix_net).tokenize_chunk(base, chunk)
    assert prefix == tokenizer("<system>S</><user>" + chunk, add_special_tokens=False)["input_ids"]
    custom = HypernetworkInternalizer(Hypernetwork(tiny_config(context_format="chat_prefix", chat_system_prompt="Be brief.")))
    assert custom.tokenize_chunk(base, chunk) == tokenizer("<system>Be brief.</><user>" + chunk, add_special_tokens=False)["input_ids"]
    chat = HypernetworkInternalizer(Hypernetwork(tiny_config(context_format="chat"))).tokenize_chunk(base, chunk)
    assert chat == tokenizer("<system></><user>some text</><assistant>", add_special_tokens=False)["input_ids"]
    with pytest.raises(ConfigError, match="context_format"):
        tiny_config(context_format="nope")


def test_internalizer_refuses_bad_input(net: Hypernetwork, base: BaseModel) -> None:
    internalizer = HypernetworkInternalizer(net)
    with pytest.raises(InvalidDocumentError, match="empty"):
        internalizer.internalize_chunks(base, ["fine", "   "])
    with pytest.raises(InvalidDocumentError, match="single str"):
        internalizer.internalize_chunks(base, "a document")
    with pytest.raises(InvalidDocumentError, match="context window"):
        internalizer.internalize_chunks(base, ["y" * 100])
    with pytest.raises(ValueError, match="chunk_ids"):
        internalizer.internalize_chunks(base, ["a", "b"], chunk_ids=["only one"])
    with pytest.raises(ConfigError, match="max_batch_size"):
        HypernetworkInternalizer(net, max_batch_size=0)
    other = HypernetworkInternalizer(Hypernetwork(tiny_config(num_layers=3, base_model="bigger")))
    with pytest.raises(IncompatibleCheckpointError, match="'bigger'.*'tiny'"):
        other.internalize_chunks(base, ["text"])


def test_bf16_base_with_fp32_hypernetwork(net: Hypernetwork, base: BaseModel) -> None:
    bf16 = BaseModel(model=copy.deepcopy(base.model).to(torch.bfloat16), tokenizer=base.tokenizer, name="tiny", revision="rev-1")
    internalizer = HypernetworkInternalizer(net)
    [reference] = internalizer.internalize_chunks(base, ["some document text"])
    [low] = internalizer.internalize_chunks(bf16, ["some document text"])
    for name in reference.weights:
        assert low.weights[name].lora_A.dtype == torch.float32
        expected = reference.delta_weight(name)
        assert (low.delta_weight(name) - expected).abs().max() <= 0.1 * expected.abs().max()
    with torch.inference_mode(), use_adapters(bf16.model, low):
        assert torch.isfinite(bf16.model(input_ids=torch.tensor([[1, 4, 5]])).logits).all()


def test_bf16_checkpoint_computes_in_float32_on_a_float32_base(net: Hypernetwork, base: BaseModel) -> None:
    # a CPU without native bf16 loads the base in float32; emulated bf16 matmuls there cost 2.5x per chunk
    stored = copy.deepcopy(net).to(torch.bfloat16)
    internalizer = HypernetworkInternalizer(stored)
    assert internalizer.compute_dtype(base) == torch.float32
    [adapter] = internalizer.internalize_chunks(base, ["some document text"])
    assert next(internalizer.hypernetwork.parameters()).dtype == torch.float32
    [exact] = HypernetworkInternalizer(copy.deepcopy(stored).float()).internalize_chunks(base, ["some document text"])
    for name in adapter.weights:
        assert adapter.weights[name].lora_A.dtype == torch.bfloat16  # handed out in the checkpoint's dtype, as before
        torch.testing.assert_close(adapter.weights[name].lora_A, exact.weights[name].lora_A.to(torch.bfloat16))
    bf16 = BaseModel(model=copy.deepcopy(base.model).to(torch.bfloat16), tokenizer=base.tokenizer, name="tiny", revision="rev-1")
    assert HypernetworkInternalizer(copy.deepcopy(net).to(torch.bfloat16)).compute_dtype(bf16) == torch.bfloat16


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_chat_prefix_equals_the_trainers_document_prefix(base: BaseModel, system_prompt: str | None) -> None:
    """Inference features must be computed over exactly the prefix the trainer encoded."""
    from d2l_integrations.engine.training import Tokenizer

    teacher_ids, prefix_length = Tokenizer(base.tokenizer, system_prompt=system_prompt).teacher_prompt("the document", "a question?")
    net = Hypernetwork(tiny_config(context_format="chat_prefix", chat_system_prompt=system_prompt))
    assert HypernetworkInternalizer(net).tokenize_chunk(base, "the document") == teacher_ids[:prefix_length]


def test_grow_rank_keeps_every_adapter_and_lets_the_new_ranks_learn():
    net = randomized(Hypernetwork(tiny_config()))  # two modules, so the module-major decoder queries are reordered right
    features, mask = torch.randn(3, LAYERS, 5, HIDDEN), torch.ones(3, 5)
    mask[1, 3:] = 0

    def deltas(h: Hypernetwork) -> list[torch.Tensor]:
        out = [torch.einsum("nlri,nlro->nlio", A, B) for A, B in h(features, mask).values()]
        return out + [torch.einsum("lri,lro->lio", A, B) for A, B in h.bias_factors().values()]

    grown = grow_rank(net, 5)
    assert grown.config.rank == 5 and grown.config.lora_alpha == net.config.lora_alpha
    assert grown(features, mask)["q_proj"][0].shape == (3, LAYERS, 5, HIDDEN)
    for before, after in zip(deltas(net), deltas(grown), strict=True):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    new_queries = grown.perceiver.decoder.latents_q.reshape(2, 5, -1)[:, 2:]
    assert torch.cdist(new_queries.flatten(0, 1), new_queries.flatten(0, 1)).triu(1).gt(0).sum() == 15  # all distinct

    sum(d.pow(2).sum() for d in deltas(grown.train())).backward()
    assert grown.scaler_B["down_proj"].grad[0, :, 2:].abs().sum() > 0  # training reaches the new ranks

    with pytest.raises(ValueError, match="rank >= 2"):
        grow_rank(net, 1)


def test_grow_latents_keeps_every_adapter_exactly_without_noise_and_nearly_with_it():
    net = randomized(Hypernetwork(tiny_config()))
    features, mask = torch.randn(3, LAYERS, 5, HIDDEN), torch.ones(3, 5)
    mask[1, 3:] = 0
    before = net(features, mask)

    exact = grow_latents(net, 3, noise=0.0)
    assert exact.config.num_latents == 3 * net.config.num_latents
    for m, (A, B) in exact(features, mask).items():
        torch.testing.assert_close(A, before[m][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(B, before[m][1], rtol=1e-5, atol=1e-6)

    grown = grow_latents(net)  # default: doubled, a little noise so the copies can drift apart
    q = grown.perceiver.encoder.latents_q
    n = net.config.num_latents
    assert torch.equal(q[:n], net.perceiver.encoder.latents_q) and not torch.equal(q[n:], q[:n])
    for m, (A, _) in grown(features, mask).items():
        assert (A - before[m][0]).norm() < 0.1 * before[m][0].norm()
    loss = sum(A.pow(2).sum() for A, _ in grown.train()(features, mask).values())
    loss.backward()
    assert grown.perceiver.encoder.latents_q.grad[n:].abs().sum() > 0  # the new latents learn

    with pytest.raises(ValueError, match="factor >= 1"):
        grow_latents(net, 0)


def test_add_layer_mix_keeps_every_adapter_and_lets_early_layers_read_late_features():
    net = randomized(Hypernetwork(tiny_config()))
    features, mask = 3.0 * torch.randn(3, LAYERS, 5, HIDDEN), torch.ones(3, 5)
    features[:, -1] *= 10  # layers on very different scales, as a real residual stream
    mask[1, 3:] = 0
    before = net(features, mask)

    mixed = add_layer_mix(net)
    assert mixed.config.layer_mix and not net.config.layer_mix and add_layer_mix(mixed) is mixed
    assert torch.equal(mixed.layer_mix_delta, torch.zeros(LAYERS, LAYERS))
    for m, (A, B) in mixed(features, mask).items():  # at zero: exactly the published design
        assert torch.equal(A, before[m][0]) and torch.equal(B, before[m][1])
    for m, (A, B) in mixed.to(torch.bfloat16)(features.bfloat16(), mask).items():  # in bf16 too (a GPU's features)
        ref = net.to(torch.bfloat16)(features.bfloat16(), mask)[m]
        assert torch.equal(A, ref[0]) and torch.equal(B, ref[1])
    mixed, net = mixed.float(), net.float()

    late = features.clone()
    late[:, -1] += torch.randn_like(late[:, -1])  # only the last layer's features change
    first = lambda n, f: n(f, mask)["down_proj"][0][:, 0]  # noqa: E731  # layer 0's A
    torch.testing.assert_close(first(mixed, late), first(mixed, features))  # closed: layer 0 reads its own features only
    loss = sum(A.pow(2).sum() + B.pow(2).sum() for A, B in mixed.train()(features, mask).values())
    loss.backward()
    assert mixed.layer_mix_delta.grad is not None and mixed.layer_mix_delta.grad[0, -1].abs() > 0  # the mix learns
    with torch.no_grad():
        mixed.layer_mix_delta[0, -1] = 0.1
    assert not torch.allclose(first(mixed, late), first(mixed, features))  # open: layer 0 now reads the last layer

    padded = features.clone()
    padded[1, :, 3:] = 0.0  # zero padding stays finite through the RMS
    assert all(torch.isfinite(A).all() for A, _ in mixed(padded, mask).values())


def test_a_layer_mix_checkpoint_round_trips(tmp_path):
    from d2l_integrations.engine.checkpoint import load_checkpoint, save_checkpoint

    net = add_layer_mix(randomized(Hypernetwork(tiny_config())))
    with torch.no_grad():
        net.layer_mix_delta.normal_()
    save_checkpoint(net, tmp_path / "mixed")
    back = load_checkpoint(tmp_path / "mixed", None)
    assert back.config.layer_mix and torch.equal(back.layer_mix_delta, net.layer_mix_delta)


def test_b_head_a_is_the_same_for_every_document_and_b_rows_leave_one_subspace():
    net = randomized(Hypernetwork(tiny_config(head_type="b", rank=6, latent_size=4)))
    features, mask = torch.randn(5, LAYERS, 5, HIDDEN), torch.ones(5, 5)
    factors = net(features, mask)
    for module, (A, B) in factors.items():
        d_in, d_out = net.module_dims[module]
        assert A.shape == (5, LAYERS, 6, d_in) and B.shape == (5, LAYERS, 6, d_out)
        assert torch.equal(A[0], A[3])  # A does not depend on the document
        assert not torch.allclose(B[0], B[3])  # B does
    # the six B rows of one layer, over five documents, span more than one latent_size-dimensional subspace:
    # each rank has its own map (W_l + U_j), where the "ab" head has one per layer
    B = factors["down_proj"][1][:, 0]  # (n, r, d_out) with d_out = HIDDEN = 16
    assert torch.linalg.matrix_rank(B.reshape(-1, B.shape[-1])) > net.config.latent_size
    ab = randomized(Hypernetwork(tiny_config(rank=6, latent_size=4)))
    B_ab = ab(features, mask)["down_proj"][1][:, 0]
    assert torch.linalg.matrix_rank(B_ab.reshape(-1, B_ab.shape[-1])) <= ab.config.latent_size
    # no normalisation: a latent twice as large gives B twice as large (the ResMLP is bypassed to see it)
    z = torch.randn(1, LAYERS, 2, 6, 4)
    net.layers = torch.nn.Identity()
    torch.testing.assert_close(net.project(2 * z), 2 * net.project(z))
    with pytest.raises(ConfigError, match="head_type"):
        tiny_config(head_type="abc")


def test_b_head_round_trips_and_ab_checkpoint_ids_are_unchanged(tmp_path, base: BaseModel) -> None:  # noqa: ANN001
    from d2l_integrations.engine.checkpoint import compute_checkpoint_id, load_checkpoint, save_checkpoint

    ab = tiny_config()
    assert "head_type" not in ab.to_dict()  # ids of checkpoints saved before head_type existed stay the same
    assert HypernetworkConfig.from_dict(ab.to_dict()) == ab
    b = tiny_config(head_type="b")
    assert b.to_dict()["head_type"] == "b" and HypernetworkConfig.from_dict(b.to_dict()) == b
    net = randomized(Hypernetwork(b))
    assert compute_checkpoint_id(net.state_dict(), b) != compute_checkpoint_id(net.state_dict(), dataclasses.replace(b, head_type="ab"))
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "b"), base)
    assert loaded.config.head_type == "b"
    features, mask = torch.randn(2, LAYERS, 5, HIDDEN), torch.ones(2, 5)
    for (A, B), (A2, B2) in zip(net(features, mask).values(), loaded(features, mask).values(), strict=True):
        torch.testing.assert_close(A2, A)
        torch.testing.assert_close(B2, B)


def test_replace_head_keeps_the_encoder_and_the_bias_and_grows_the_rank():
    net = randomized(Hypernetwork(tiny_config()))
    new = replace_head(net, "b", rank=4)
    assert (new.config.head_type, new.config.rank) == ("b", 4)
    old_state, new_state = net.state_dict(), new.state_dict()
    for key in old_state:
        if key.startswith(("perceiver.encoder.", "layers.", "perceiver.projection")) and key in new_state:
            assert torch.equal(old_state[key], new_state[key]), key
    for m in net.module_dims:  # the bias LoRA: old ranks kept, new ranks with B = 0, so its delta is unchanged
        torch.testing.assert_close(torch.einsum("lri,lro->lio", *new.bias_factors()[m]),
                                   torch.einsum("lri,lro->lio", *net.bias_factors()[m]))
    features, mask = torch.randn(2, LAYERS, 5, HIDDEN), torch.ones(2, 5)
    out = new.train()(features, mask)
    assert all(torch.count_nonzero(B) == 0 for _, B in out.values())  # a fresh head starts at the bias LoRA alone
    target = {m: torch.randn_like(B) for m, (_, B) in out.items()}
    sum((B - target[m]).pow(2).sum() for m, (_, B) in out.items()).backward()
    assert new.slot_head.grad.abs().sum() > 0 and new.head.weight.grad.abs().sum() > 0  # the maps train first
    with torch.no_grad():
        new.slot_head.add_(0.1 * torch.randn_like(new.slot_head))
    new.zero_grad()
    sum((B - target[m]).pow(2).sum() for m, (_, B) in new(features, mask).items()).backward()
    assert new.perceiver.encoder.latents_q.grad.abs().sum() > 0  # then the encoder's gradient opens
    assert torch.equal(replace_head(net, "b", seed=3).slot_head, replace_head(net, "b", seed=3).slot_head)  # seeded
    with pytest.raises(ValueError, match="'ab'"):
        replace_head(new, "b")
    control = replace_head(net, "ab", seed=1)  # a fresh head of the published design, on the same encoder
    assert control.config == net.config and not torch.equal(control.head.weight, net.head.weight)
    assert torch.equal(control.perceiver.encoder.latents_q, net.perceiver.encoder.latents_q)
    with pytest.raises(ValueError, match="replace_head"):
        grow_rank(new, 8)


def test_b_head_fits_the_shipped_size_budget_for_the_default_model():
    """At rank 32 for SmolLM2-135M's shape (30 layers, down_proj 1536 -> 576), stored in bf16, <= 24 MB."""
    from d2l_integrations.engine.checkpoint import read_checkpoint_config
    from d2l_integrations.engine.engine import shipped_checkpoint_path

    folder = shipped_checkpoint_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    if folder is None:
        pytest.skip("no checkpoint ships for the default model")
    shipped = read_checkpoint_config(folder)[0]
    with torch.device("meta"):
        net = Hypernetwork(dataclasses.replace(shipped, head_type="b", rank=32))
    size = sum(p.numel() for p in net.parameters()) * 2
    assert size <= 24 * 10**6, size


def test_b_head_starts_at_distillations_scaling():
    net = Hypernetwork(tiny_config(head_type="b", lora_alpha=8.0, scaler_b_init=1.0))
    for scaler in net.scaler_B.values():  # lora_alpha x scaler_B = 2 = DistillConfig's alpha / rank
        torch.testing.assert_close(scaler * net.config.lora_alpha, torch.full_like(scaler, 2.0))
    assert all(torch.all(s == 1.0) for s in Hypernetwork(tiny_config(scaler_b_init=1.0)).scaler_B.values())  # "ab" unchanged
