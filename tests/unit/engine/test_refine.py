"""Tests of engine/refine.py (and distill's warm start) on the tiny random Llama of test_distill (CPU, seconds).

One ``slow`` test refines a document on the real default model with the shipped checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.base_model import BaseModel
from d2l_integrations.engine.distill import DistillConfig, DistillInternalizer, _RowLoRA
from d2l_integrations.engine.engine import D2LEngine
from d2l_integrations.engine.hypernetwork import HypernetworkInternalizer
from d2l_integrations.engine.internalizer import Internalizer
from d2l_integrations.engine.lora import AdapterProvenance, LoRAAdapter, LoRAWeights, compose_adapters
from d2l_integrations.engine.refine import RefineInternalizer
from d2l_integrations.errors import HypernetworkUnavailableError, IncompatibleAdapterError
from tests.unit.engine.test_distill import DOC_A, DOC_B, _config, _sha, _tiny_base
from tests.unit.engine.test_training import tiny_hypernet

QUESTION = [{"role": "user", "content": "What is the special magic number?"}]


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return _tiny_base()


@pytest.fixture(scope="module")
def hyper(base: BaseModel) -> HypernetworkInternalizer:
    torch.manual_seed(1)
    net = tiny_hypernet(base)
    with torch.no_grad():  # a bias LoRA that does something, so "applied once" is visible
        for p in net.bias_B.values():
            p.normal_(0, 0.05)
    return HypernetworkInternalizer(net, checkpoint_id="tiny-hyper")


def _logits(base: BaseModel, adapter: LoRAAdapter | None) -> torch.Tensor:
    ids = torch.tensor([base.chat_ids(QUESTION)])
    with torch.no_grad(), use_adapters(base.model, adapter):
        return base.model(ids).logits


def test_implements_the_internalizer_protocol(hyper: HypernetworkInternalizer) -> None:
    refine = RefineInternalizer(hyper, DistillConfig())
    assert isinstance(refine, Internalizer) and refine.name == "refine"
    assert refine.checkpoint_id.startswith("refine-tiny-hyper-")
    assert refine.checkpoint_id.endswith(DistillConfig().settings_hash())
    assert refine.checkpoint_id != RefineInternalizer(hyper, DistillConfig(rank=4)).checkpoint_id


def test_training_starts_exactly_at_the_hypernetwork_adapter(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    """The warm-start hook with untrained factors (B = 0) is the start adapter, bias included."""
    [start] = hyper.internalize_chunks(base, [DOC_A])
    names = [base.module_path(layer, "down_proj") for layer in range(base.num_layers)]
    row = _RowLoRA(base, names, 1, _config(), seeds=[0], start=[start])
    ids = torch.tensor([base.chat_ids(QUESTION)])
    row.row_chunk = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), row.attached(base.model):
        hooked = base.model(ids).logits
    expected = _logits(base, start)
    assert (expected - _logits(base, None)).abs().max() > 1e-4, "the start adapter should change the model"
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    assert (_logits(base, start.without_bias()) - expected).abs().max() > 1e-5  # the bias is part of the start


def test_refined_adapter_is_the_start_plus_what_was_trained(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    cfg = _config(patience=0, max_steps=8)
    [start] = hyper.internalize_chunks(base, [DOC_A], chunk_ids=["a"])
    [result] = RefineInternalizer(hyper, cfg).distill_chunks(base, [DOC_A], chunk_ids=["a"])
    adapter = result.adapter
    prov = adapter.provenance
    assert (prov.method, prov.checkpoint_id, prov.source_sha256, prov.chunk_ids) == ("refine", "tiny-hyper", (_sha(DOC_A),), ("a",))
    assert prov.extra["refined_from"] == "hypernetwork" and "distill_config" in prov.extra
    assert adapter.rank == start.rank + cfg.rank
    assert adapter.bias is not None and set(adapter.bias) == set(start.bias or {})
    for name, w in adapter.weights.items():
        s = start.weights[name]
        # the start's rows come first, unchanged; the trained rows follow and did change the delta
        torch.testing.assert_close(w.lora_A[: s.rank], s.lora_A.float())
        torch.testing.assert_close(w.lora_B[:, : s.rank] * w.scaling, s.lora_B.float() * s.scaling)
        trained = LoRAWeights(w.lora_A[s.rank :], w.lora_B[:, s.rank :], w.scaling)
        assert trained.delta_weight().abs().max() > 0
        torch.testing.assert_close(adapter.delta_weight(name), start.delta_weight(name) + trained.delta_weight(), atol=1e-5, rtol=1e-4)
    assert result.train_kl[1] < result.train_kl[0]


def test_returned_adapter_reproduces_the_trained_function(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    """Applied by engine.apply, the refined adapter is the function the hook trained (start + LoRA)."""
    cfg = _config(patience=0)
    [start] = hyper.internalize_chunks(base, [DOC_B])
    [adapter] = RefineInternalizer(hyper, cfg).internalize_chunks(base, [DOC_B])
    names = [base.module_path(layer, "down_proj") for layer in range(base.num_layers)]
    row = _RowLoRA(base, names, 1, cfg, seeds=[0], start=[start])
    with torch.no_grad():
        for name in names:
            r = start.weights[name].rank
            row.lora_A[name].copy_(adapter.weights[name].lora_A[r:][None])
            row.lora_B[name].copy_(adapter.weights[name].lora_B[:, r:][None] * adapter.weights[name].scaling / cfg.scaling)
    ids = torch.tensor([base.chat_ids(QUESTION)])
    row.row_chunk = torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), row.attached(base.model):
        trained = base.model(ids).logits
    torch.testing.assert_close(_logits(base, adapter), trained, atol=1e-4, rtol=1e-4)
    assert (_logits(base, adapter) - _logits(base, start)).abs().max() > 1e-5


def test_given_start_adapters_replace_the_hypernetwork_pass(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    """Refining stored adapters gives the same result as refining from scratch (the hypernetwork is deterministic)."""
    cfg = _config(patience=0, max_steps=3)
    refine = RefineInternalizer(hyper, cfg)
    stored = hyper.internalize_chunks(base, [DOC_A, DOC_B])
    given = refine.distill_chunks(base, [DOC_A, DOC_B], start=stored)
    fresh = refine.distill_chunks(base, [DOC_A, DOC_B])
    for x, y in zip(given, fresh, strict=True):
        for name in x.adapter.weights:
            torch.testing.assert_close(x.adapter.weights[name].lora_B, y.adapter.weights[name].lora_B)


def test_composed_refined_adapters_count_the_bias_once(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    refined = RefineInternalizer(hyper, _config(patience=0, max_steps=2)).internalize_chunks(base, [DOC_A, DOC_B])
    composed = compose_adapters(refined)
    name = next(iter(composed.weights))
    expected = refined[0].delta_weight(name) + refined[1].delta_weight(name) - refined[0].bias[name].delta_weight()  # type: ignore[index]
    torch.testing.assert_close(composed.delta_weight(name), expected, atol=1e-5, rtol=1e-4)
    assert composed.provenance.method == "refine"


def test_bad_start_adapters_are_refused(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    distill = DistillInternalizer(_config())
    [start] = hyper.internalize_chunks(base, [DOC_A])
    with pytest.raises(IncompatibleAdapterError, match="one per chunk"):
        distill.distill_chunks(base, [DOC_A, DOC_B], start=[start])
    other = LoRAAdapter(start.weights, AdapterProvenance(base_model="another-model"), start.bias)
    with pytest.raises(IncompatibleAdapterError, match="another-model"):
        distill.distill_chunks(base, [DOC_A], start=[other])
    w = next(iter(start.weights.values()))
    unknown = LoRAAdapter({"model.layers.9.mlp.down_proj": w}, AdapterProvenance(base_model=base.name))
    with pytest.raises(IncompatibleAdapterError, match="does not have"):
        distill.distill_chunks(base, [DOC_A], start=[unknown])
    path = base.module_path(0, "down_proj")
    wrong = LoRAAdapter({path: LoRAWeights(torch.zeros(2, 5), torch.zeros(7, 2))}, AdapterProvenance(base_model=base.name))
    with pytest.raises(IncompatibleAdapterError, match="shape"):
        distill.distill_chunks(base, [DOC_A], start=[wrong])


def test_engine_refine_method(base: BaseModel, hyper: HypernetworkInternalizer) -> None:
    cfg = _config(patience=0, max_steps=2)
    engine = D2LEngine(base, hyper, distill_config=cfg)
    refine = engine.internalizer("refine")
    assert isinstance(refine, RefineInternalizer) and refine.config == engine.internalizer("distill").config
    assert refine is engine.internalizer("refine")  # built once
    adapter = engine.internalize(DOC_A, method="refine", activate=False)
    assert adapter.provenance.method == "refine" and adapter.rank == hyper.config.rank + cfg.rank
    with pytest.raises(HypernetworkUnavailableError, match="method='refine' needs one"):
        D2LEngine(base, None, distill_config=cfg).internalizer("refine")


@pytest.mark.slow
def test_real_model_refines_the_shipped_hypernetwork_adapter() -> None:
    """On the real default model with the shipped checkpoint, the trained part lowers the KL to the teacher
    and the needle is still answered."""
    torch.set_num_threads(2)
    engine = D2LEngine.default(device="cpu")
    if engine.hypernetwork is None:
        pytest.skip("no shipped hypernetwork checkpoint for the default model")
    doc = "The grass is green. The sky is blue.\nThe special magic number is 4821.\nThe sun is yellow."
    cfg = DistillConfig(max_steps=6, batch_size=64, max_questions=6, about_questions=1, teacher_max_new_tokens=8, patience=0)
    [result] = RefineInternalizer(engine.hypernetwork, cfg).distill_chunks(engine.base, [doc])
    first, last = result.train_kl  # batch_size above the example count: the same batch every step
    assert last < first
    assert result.adapter.provenance.method == "refine"
    answer = engine.generate(QUESTION, adapters=result.adapter).text
    assert "4821" in answer, answer
