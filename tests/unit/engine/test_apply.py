"""use_adapters / merged_adapter on a tiny random Llama (CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from d2l_integrations.engine.apply import merged_adapter, remove_hooks, use_adapters
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights
from d2l_integrations.errors import IncompatibleAdapterError, UnknownTargetModuleError

LAYERS, HIDDEN, INTERMEDIATE = 2, 16, 32
IDS = torch.tensor([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10], [11, 12, 13, 14, 15]])


@pytest.fixture()
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_adapter(seed: int, *, module: str = "mlp.down_proj", d_in: int = INTERMEDIATE, d_out: int = HIDDEN,
                 rank: int = 2, bias: bool = True) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)

    def weights(r: int) -> LoRAWeights:
        return LoRAWeights(torch.randn(r, d_in, generator=g) * 0.2, torch.randn(d_out, r, generator=g) * 0.2, 1.7)

    names = [f"model.layers.{i}.{module}" for i in range(LAYERS)]
    return LoRAAdapter({n: weights(rank) for n in names}, AdapterProvenance(base_model="tiny"),
                       {n: weights(1) for n in names} if bias else None)


def logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def test_base_outputs_are_bit_identical_outside_the_context(tiny_llama: torch.nn.Module) -> None:
    before = logits(tiny_llama)
    with use_adapters(tiny_llama, make_adapter(1)):
        inside = logits(tiny_llama)
        with use_adapters(tiny_llama, None):
            assert torch.equal(logits(tiny_llama), before)
    assert not torch.allclose(inside, before, atol=1e-4)
    assert torch.equal(logits(tiny_llama), before)  # hooks stay installed but inert
    with pytest.raises(RuntimeError, match="boom"), use_adapters(tiny_llama, make_adapter(2)):
        raise RuntimeError("boom")
    assert torch.equal(logits(tiny_llama), before)
    remove_hooks(tiny_llama)
    assert torch.equal(logits(tiny_llama), before)


def test_per_row_adapters_in_one_batch_equal_separate_runs(tiny_llama: torch.nn.Module) -> None:
    adapters = [make_adapter(1), None, make_adapter(3, rank=4, bias=False)]
    with use_adapters(tiny_llama, adapters):
        batched = logits(tiny_llama)
    for row, adapter in enumerate(adapters):
        with use_adapters(tiny_llama, adapter):
            alone = logits(tiny_llama, IDS[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=1e-5, atol=1e-6)


def test_single_adapter_applies_to_every_row_and_matches_merging(tiny_llama: torch.nn.Module) -> None:
    adapter = make_adapter(1)
    with use_adapters(tiny_llama, adapter):
        hooked = logits(tiny_llama)
    with merged_adapter(tiny_llama, adapter):
        merged = logits(tiny_llama)
    torch.testing.assert_close(hooked, merged, rtol=1e-5, atol=1e-5)


def test_merged_adapter_restores_weights_exactly(tiny_llama: torch.nn.Module) -> None:
    original = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with merged_adapter(tiny_llama, make_adapter(1)):
        assert not torch.equal(tiny_llama.model.layers[0].mlp.down_proj.weight, original["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(RuntimeError, match="boom"), merged_adapter(tiny_llama, make_adapter(2)):
        raise RuntimeError("boom")
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_unknown_target_module_is_refused(tiny_llama: torch.nn.Module) -> None:
    bad = make_adapter(1, module="mlp.nonexistent_proj")
    with pytest.raises(UnknownTargetModuleError, match="nonexistent_proj"), use_adapters(tiny_llama, bad):
        pass
    with pytest.raises(UnknownTargetModuleError, match="nonexistent_proj"), merged_adapter(tiny_llama, bad):
        pass
    original = tiny_llama.state_dict()["model.layers.0.mlp.down_proj.weight"].clone()
    with pytest.raises(UnknownTargetModuleError), merged_adapter(tiny_llama, LoRAAdapter(
        {**make_adapter(1).weights, **bad.weights}, AdapterProvenance(base_model="tiny"))):
        pass
    assert torch.equal(tiny_llama.state_dict()["model.layers.0.mlp.down_proj.weight"], original)


def test_batch_size_mismatch_is_refused(tiny_llama: torch.nn.Module) -> None:
    with pytest.raises(IncompatibleAdapterError, match="batch size"), use_adapters(tiny_llama, [make_adapter(1), make_adapter(2)]):
        logits(tiny_llama)


def test_adapters_are_local_to_the_thread(tiny_llama: torch.nn.Module) -> None:
    base = logits(tiny_llama)
    seen: dict[str, torch.Tensor] = {}
    with use_adapters(tiny_llama, make_adapter(1)):
        worker = threading.Thread(target=lambda: seen.setdefault("other", logits(tiny_llama)))
        worker.start()
        worker.join()
        inside = logits(tiny_llama)
    assert torch.equal(seen["other"], base)
    assert not torch.allclose(inside, base, atol=1e-4)


def test_generate_inside_the_context_uses_the_adapter(tiny_llama: torch.nn.Module) -> None:
    adapter = make_adapter(1)
    prompt = IDS[:1]
    with torch.inference_mode(), use_adapters(tiny_llama, adapter):
        generated = tiny_llama.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                        do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(5):  # the same greedy path without a KV cache
            ids = torch.cat([ids, tiny_llama(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_hooks_of_a_submodel_do_not_disable_the_model(tiny_llama: torch.nn.Module) -> None:
    """Adapters keyed by the inner decoder (``model.model``) and by the causal LM both keep working."""
    outer = make_adapter(1)
    inner = LoRAAdapter({k.removeprefix("model."): w for k, w in outer.weights.items()}, outer.provenance,
                        {k.removeprefix("model."): w for k, w in (outer.bias or {}).items()})
    with use_adapters(tiny_llama, outer):
        expected = logits(tiny_llama)
    with torch.inference_mode(), use_adapters(tiny_llama.model, inner):
        hidden = tiny_llama.model(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(tiny_llama.lm_head(hidden), expected, rtol=1e-5, atol=1e-6)
    with use_adapters(tiny_llama, outer):
        assert torch.equal(logits(tiny_llama), expected)


def test_a_deep_copy_of_a_hooked_model_applies_its_own_adapters(tiny_llama: torch.nn.Module) -> None:
    import copy

    adapter = make_adapter(1)
    with use_adapters(tiny_llama, adapter):
        expected = logits(tiny_llama)
    clone = copy.deepcopy(tiny_llama)
    base = logits(clone)
    with use_adapters(clone, adapter):
        assert torch.equal(logits(clone), expected)
        assert torch.equal(logits(tiny_llama), base)  # the original is not the active model here
