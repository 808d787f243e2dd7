"""LoRAAdapter values: composition, save/load, PEFT export (tiny random Llama on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights, compose_adapters, concat_ranks
from d2l_integrations.errors import ExportError, IncompatibleAdapterError

LAYERS, HIDDEN, INTERMEDIATE = 2, 16, 32


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def random_weights(d_in: int, d_out: int, rank: int, scaling: float, generator: torch.Generator) -> LoRAWeights:
    return LoRAWeights(torch.randn(rank, d_in, generator=generator) * 0.1, torch.randn(d_out, rank, generator=generator) * 0.1, scaling)


def make_adapter(seed: int, *, rank: int = 2, scaling: float = 1.5, bias: bool = True, checkpoint_id: str = "ckpt",
                 q_rank: int | None = None) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {f"model.layers.{i}.mlp.down_proj": random_weights(INTERMEDIATE, HIDDEN, rank, scaling, g) for i in range(LAYERS)}
    if q_rank is not None:
        weights |= {f"model.layers.{i}.self_attn.q_proj": random_weights(HIDDEN, HIDDEN, q_rank, scaling, g) for i in range(LAYERS)}
    bias_g = torch.Generator().manual_seed(1234)  # the same bias for every adapter of one checkpoint
    bias_weights = {f"model.layers.{i}.mlp.down_proj": random_weights(INTERMEDIATE, HIDDEN, 2, 2.0, bias_g) for i in range(LAYERS)}
    provenance = AdapterProvenance(base_model="tiny", checkpoint_id=checkpoint_id, source_sha256=(f"sha{seed}",), chunk_ids=(f"c{seed}",))
    return LoRAAdapter(weights, provenance, bias_weights if bias else None)


def test_delta_weight_is_scaled_product() -> None:
    w = random_weights(5, 3, 2, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.delta_weight(), 0.5 * w.lora_B @ w.lora_A, rtol=0, atol=0)
    torch.testing.assert_close(w.folded().delta_weight(), w.delta_weight(), rtol=1e-7, atol=1e-9)


def test_factor_shapes_are_checked() -> None:
    with pytest.raises(IncompatibleAdapterError, match="Rank mismatch"):
        LoRAWeights(torch.zeros(2, 5), torch.zeros(3, 4))
    with pytest.raises(IncompatibleAdapterError, match="different module shapes"):
        concat_ranks([LoRAWeights(torch.zeros(2, 5), torch.zeros(3, 2)), LoRAWeights(torch.zeros(2, 6), torch.zeros(3, 2))])


def test_composition_is_the_sum_of_deltas_with_bias_once() -> None:
    adapters = [make_adapter(1, scaling=1.5), make_adapter(2, scaling=0.25), make_adapter(3, rank=3, scaling=1.5)]
    composed = compose_adapters(adapters)
    assert composed.provenance.source_sha256 == ("sha1", "sha2", "sha3")
    assert composed.provenance.chunk_ids == ("c1", "c2", "c3")
    assert composed.rank == 2 + 2 + 3
    for name in composed.module_names:
        expected = sum(a.weights[name].delta_weight() for a in adapters) + adapters[0].bias[name].delta_weight()
        torch.testing.assert_close(composed.delta_weight(name), expected, rtol=1e-6, atol=1e-7)


def test_composition_refuses_mixed_bases_and_checkpoints() -> None:
    other_base = make_adapter(2)
    other_base = LoRAAdapter(other_base.weights, AdapterProvenance(base_model="other"), other_base.bias)
    with pytest.raises(IncompatibleAdapterError, match="different base models"):
        compose_adapters([make_adapter(1), other_base])
    with pytest.raises(IncompatibleAdapterError, match="different hypernetwork checkpoints"):
        compose_adapters([make_adapter(1, checkpoint_id="a"), make_adapter(2, checkpoint_id="b")])


def test_missing_module_is_reported() -> None:
    adapter = make_adapter(1)
    assert adapter.effective("model.layers.0.self_attn.q_proj") is None
    with pytest.raises(IncompatibleAdapterError, match="no factors"):
        adapter.delta_weight("model.layers.0.self_attn.q_proj")


def test_save_load_round_trip(tmp_path: Path, tiny_llama: torch.nn.Module) -> None:
    adapter = make_adapter(1, q_rank=3)
    loaded = LoRAAdapter.load(adapter.save(tmp_path / "adapter"))
    assert loaded.provenance == adapter.provenance
    assert set(loaded.weights) == set(adapter.weights) and set(loaded.bias or {}) == set(adapter.bias or {})
    for group, other in ((adapter.weights, loaded.weights), (adapter.bias or {}, loaded.bias or {})):
        for name, w in group.items():
            assert torch.equal(w.lora_A, other[name].lora_A) and torch.equal(w.lora_B, other[name].lora_B)
            assert w.scaling == other[name].scaling
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.inference_mode():
        with use_adapters(tiny_llama, adapter):
            expected = tiny_llama(input_ids=ids).logits
        with use_adapters(tiny_llama, loaded):
            got = tiny_llama(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_save_replaces_an_existing_adapter(tmp_path: Path) -> None:
    target = make_adapter(1).save(tmp_path / "a")
    make_adapter(2).save(target)
    assert LoRAAdapter.load(target).provenance.source_sha256 == ("sha2",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folders left behind


@pytest.mark.parametrize("q_rank", [None, 3], ids=["one-rank", "mixed-ranks"])
def test_peft_export_matches_our_apply(tmp_path: Path, tiny_llama: torch.nn.Module, q_rank: int | None) -> None:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    adapter = make_adapter(1, q_rank=q_rank)
    folder = adapter.to_peft(tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 3, 7], [2, 4, 6, 8, 10]])
    with torch.inference_mode():
        with use_adapters(tiny_llama, adapter):
            expected = tiny_llama(input_ids=ids).logits
        fresh = LlamaForCausalLM(tiny_llama.config).eval()
        fresh.load_state_dict(tiny_llama.state_dict())
        peft_model = PeftModel.from_pretrained(fresh, str(folder)).eval()
        got = peft_model(input_ids=ids).logits
        base = tiny_llama(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_peft_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        make_adapter(1).to_peft(tmp_path / "peft")
    assert [p.name for p in (tmp_path / "peft").iterdir()] == ["keep.txt"]
