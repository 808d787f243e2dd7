"""Golden test: our engine reproduces SakanaAI's reference outputs on the tiny fixture.

The fixture (``../shared/fixtures/sakana_d2l_tiny`` beside the repo, or ``$D2L_SAKANA_FIXTURE``) holds
a tiny Mistral base, a hypernetwork pickled exactly as SakanaAI publishes it, fixed inputs and every
output the reference code produced. Its README gives the tolerance used here:
``max|got - expected| <= 1e-5 * max|expected|``, and exact greedy ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.checkpoint import (
    convert_sakana_checkpoint,
    import_sakana_checkpoint,
    load_checkpoint,
    load_internalizer,
)
from d2l_integrations.engine.hypernetwork import Hypernetwork, encode_context
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, compose_adapters
from d2l_integrations.errors import IncompatibleCheckpointError

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURE = Path(os.environ.get("D2L_SAKANA_FIXTURE", REPO_ROOT.parent / "shared" / "fixtures" / "sakana_d2l_tiny"))
RELATIVE_TOLERANCE = 1e-5
MODULE = "down_proj"

pytestmark = pytest.mark.skipif(
    not (FIXTURE / "pytorch_model.bin").is_file(),
    reason=f"SakanaAI golden fixture not found at {FIXTURE} (set D2L_SAKANA_FIXTURE to its folder)",
)


def assert_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().item()
    error = (got.float() - expected.float()).abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"{name}: max|diff| {error:.3e} > {RELATIVE_TOLERANCE} * {scale:.3e}"


@pytest.fixture(scope="module")
def fixture() -> dict[str, dict[str, torch.Tensor]]:
    return {"inputs": load_file(str(FIXTURE / "inputs.safetensors")), "expected": load_file(str(FIXTURE / "expected.safetensors"))}


@pytest.fixture(scope="module")
def base() -> BaseModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(FIXTURE / "base_model"), dtype=torch.float32).eval()
    model.requires_grad_(False)
    return BaseModel(model=model, tokenizer=None, name="base_model")  # the fixture has no tokenizer


@pytest.fixture(scope="module")
def hypernetwork() -> Hypernetwork:
    return import_sakana_checkpoint(FIXTURE / "pytorch_model.bin")


@pytest.fixture(scope="module")
def features(base: BaseModel, fixture: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    inputs = fixture["inputs"]
    with torch.inference_mode():
        return encode_context(base, inputs["ctx_ids"], inputs["ctx_attn_mask"])


@pytest.fixture(scope="module")
def chunk_adapters(hypernetwork: Hypernetwork, features: torch.Tensor, base: BaseModel, fixture: dict) -> list[LoRAAdapter]:
    mask = fixture["inputs"]["ctx_attn_mask"]
    with torch.inference_mode():
        factors = hypernetwork(features, mask)
    provenance = [AdapterProvenance(base_model="base_model", checkpoint_id=hypernetwork.checkpoint_id, source_sha256=(f"chunk{i}",)) for i in range(4)]
    return hypernetwork.to_adapters(factors, base, provenance)


@pytest.fixture(scope="module")
def doc_adapters(chunk_adapters: list[LoRAAdapter], fixture: dict) -> list[LoRAAdapter]:
    docs, start = [], 0
    for count in fixture["inputs"]["n_ctx_chunks"].tolist():
        docs.append(compose_adapters(chunk_adapters[start : start + count]))
        start += count
    return docs


def test_config_is_derived_from_the_pickle(hypernetwork: Hypernetwork) -> None:
    cfg = hypernetwork.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.rank, cfg.latent_size, cfg.num_blocks, cfg.num_latents) == (4, 64, 8, 16, 2, 8)
    assert cfg.module_dims == (("down_proj", 128, 64),)
    assert cfg.lora_alpha == pytest.approx(45.254833995939045, abs=0)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (16, 4, 128)
    assert sum(p.numel() for p in hypernetwork.parameters()) == 319_440


def test_every_tensor_is_imported_bit_exactly(hypernetwork: Hypernetwork) -> None:
    theirs = load_file(str(FIXTURE / "hypernet.safetensors"))
    ours = hypernetwork.state_dict()
    assert len(theirs) == len(ours) == 56
    for key, value in theirs.items():
        name = key.removeprefix("aggregator.")
        assert torch.equal(ours[name].reshape(value.shape), value), key


def test_ctx_features(features: torch.Tensor, fixture: dict) -> None:
    valid = fixture["inputs"]["ctx_attn_mask"].bool()[:, None, :, None].expand_as(features)
    assert_close(features[valid], fixture["expected"]["ctx_features"][valid], "ctx_features")


def test_aggregator_and_head(hypernetwork: Hypernetwork, features: torch.Tensor, fixture: dict) -> None:
    expected = fixture["expected"]
    with torch.inference_mode():
        aggregated = hypernetwork.aggregate(features, fixture["inputs"]["ctx_attn_mask"])
        head_out = hypernetwork.project(aggregated)
    assert_close(aggregated, expected["aggregator_out"], "aggregator_out")
    assert_close(head_out, expected["head_out"], "head_out")


def test_generated_factors_batched_and_unbatched(hypernetwork: Hypernetwork, base: BaseModel, features: torch.Tensor, fixture: dict) -> None:
    inputs, expected = fixture["inputs"], fixture["expected"]
    with torch.inference_mode():
        A, B = hypernetwork(features, inputs["ctx_attn_mask"])[MODULE]
        assert_close(A, expected[f"generated.{MODULE}.A"], "generated.A")
        assert_close(B, expected[f"generated.{MODULE}.B"], "generated.B")
        for row, length in enumerate(inputs["chunk_lengths"].tolist()):  # one chunk at a time, no padding
            ids = inputs["ctx_ids"][row : row + 1, :length]
            mask = torch.ones_like(ids)
            A1, B1 = hypernetwork(encode_context(base, ids, mask), mask)[MODULE]
            assert_close(A1[0], expected[f"generated_unbatched.{MODULE}.A"][row], f"generated_unbatched.A[{row}]")
            assert_close(B1[0], expected[f"generated_unbatched.{MODULE}.B"][row], f"generated_unbatched.B[{row}]")


def test_combined_factors_and_deltas(doc_adapters: list[LoRAAdapter], base: BaseModel, fixture: dict) -> None:
    expected = fixture["expected"]
    alpha = 45.254833995939045
    for doc, adapter in enumerate(doc_adapters):
        for layer in range(4):
            path = base.module_path(layer, MODULE)
            exp_A = expected[f"combined.{MODULE}.A"][doc, layer]  # [24, d_in], zero-padded past (chunks + 1) * r
            exp_B = expected[f"combined.{MODULE}.B"][doc, layer]  # [24, d_out]
            eff = adapter.effective(path)
            assert eff is not None and eff.scaling == alpha
            assert_close(eff.lora_A, exp_A[: eff.rank], f"combined.A[{doc},{layer}]")
            assert_close(eff.lora_B.T, exp_B[: eff.rank], f"combined.B[{doc},{layer}]")
            assert not exp_A[eff.rank :].any() and not exp_B[eff.rank :].any()
            assert_close(adapter.delta_weight(path), alpha * exp_B.T @ exp_A, f"delta[{doc},{layer}]")


def test_logits_base_and_lora(base: BaseModel, doc_adapters: list[LoRAAdapter], fixture: dict) -> None:
    inputs, expected = fixture["inputs"], fixture["expected"]
    with torch.inference_mode():
        logits_base = base.model(input_ids=inputs["prompt_ids"][:1]).logits
        with use_adapters(base.model, doc_adapters):  # one LoRA per row, one batch
            logits_lora = base.model(input_ids=inputs["prompt_ids"], attention_mask=inputs["prompt_attn_mask"]).logits
    assert_close(logits_base, expected["logits_base"], "logits_base")
    assert_close(logits_lora, expected["logits_lora"], "logits_lora")


def test_greedy_ids(base: BaseModel, doc_adapters: list[LoRAAdapter], fixture: dict) -> None:
    ids = fixture["inputs"]["prompt_ids"]
    with torch.inference_mode(), use_adapters(base.model, doc_adapters):
        for _ in range(8):  # no KV cache: each step re-reads the whole sequence with the adapters applied
            next_ids = base.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_ids], dim=1)
    assert torch.equal(ids, fixture["expected"]["greedy_ids"])


def test_convert_writes_an_equivalent_checkpoint(tmp_path: Path, hypernetwork: Hypernetwork, base: BaseModel) -> None:
    folder = convert_sakana_checkpoint(FIXTURE / "pytorch_model.bin", tmp_path / "converted")
    loaded = load_checkpoint(folder, base)
    assert loaded.checkpoint_id == hypernetwork.checkpoint_id
    assert loaded.config == hypernetwork.config
    for key, value in hypernetwork.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_internalizer_accepts_the_pickle(hypernetwork: Hypernetwork, base: BaseModel) -> None:
    internalizer = load_internalizer(FIXTURE / "pytorch_model.bin", base)
    assert internalizer.checkpoint_id == hypernetwork.checkpoint_id and not internalizer.prefer_over_distill
    other = BaseModel(model=base.model, tokenizer=None, name="someone/else")
    with pytest.raises(IncompatibleCheckpointError, match="'base_model'.*'someone/else'"):
        load_internalizer(FIXTURE / "pytorch_model.bin", other)


def test_old_module_paths_are_aliased(tmp_path: Path, hypernetwork: Hypernetwork) -> None:
    """Published checkpoints may name their config classes under ``ctx_to_lora.modeling_utils``."""
    import zipfile

    old = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(FIXTURE / "pytorch_model.bin") as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                for module in (b"ctx_to_lora.modeling.hypernet\n", b"ctx_to_lora.modeling.aggregator\n"):
                    assert module in data
                    data = data.replace(module, b"ctx_to_lora.modeling_utils\n")
            dst.writestr(info, data)
    imported = import_sakana_checkpoint(old)
    assert imported.checkpoint_id == hypernetwork.checkpoint_id
