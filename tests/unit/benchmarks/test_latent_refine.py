"""benchmarks/latent_refine.py on a tiny random Llama and a tiny random hypernetwork (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.latent_refine import ComposedLoRA, ComposedTrainer, composed_adapter, encoder_latents, refine
from d2l_integrations.engine.apply import use_adapters
from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.distill import DistillInternalizer, _GroupTrainer
from d2l_integrations.engine.hypernetwork import Hypernetwork, HypernetworkInternalizer
from tests.unit.engine.test_distill import _config, _tiny_base

LR_B = 1e-3  # B-only variants start at the base model, whose KL to the teacher is ~4e-5 here: small steps

DOCS = ["Mira Kellan was born in Ostravel in 1984. The special magic number is 4821.",
        "The lighthouse at Brenn Point has 212 steps. Its keeper was Tomas Arvid."]


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    base = _tiny_base()
    cfg = HypernetworkConfig(num_layers=2, hidden_size=32, module_dims=(("down_proj", 64, 32),), rank=2, lora_alpha=3.0,
                             latent_size=8, num_latents=2, num_blocks=1, num_heads=2, num_kv_heads=2, head_dim=4, base_model="tiny",
                             context_format="raw")
    torch.manual_seed(0)
    net = Hypernetwork(cfg)
    with torch.no_grad():  # a bias LoRA that is not zero, so the test sees it
        for p in net.bias_B.values():
            p.normal_(0, 0.1)
    hyper = HypernetworkInternalizer(net.eval(), checkpoint_id="tiny-hn")
    distill = DistillInternalizer(_config(max_steps=4, lr=3e-2, patience=0))  # as distill_curve: snapshots are plain step counts
    data = [distill._prepare_chunk(base, d, None) for d in DOCS]
    return base, hyper, distill, data


def _composed(setup, *, cfg=None, latent_lr=5e-2, **kwargs):  # noqa: ANN001, ANN202
    """A ComposedLoRA over both documents (``kwargs``: its flags) and its trainer."""
    base, hyper, distill, data = setup
    cfg = cfg or distill.config
    paths = distill._module_paths(base)
    lora = ComposedLoRA(base, paths, cfg, [0, 1], hyper, encoder_latents(hyper, base, DOCS), **kwargs)
    return lora, ComposedTrainer(base, cfg, data, paths, lora, latent_lr=latent_lr)


def _logits(base, adapters):  # noqa: ANN001, ANN202
    ids = torch.tensor([base.chat_ids([{"role": "user", "content": "Where was Mira born?"}])] * len(adapters))
    with use_adapters(base.model, adapters):
        return base.model(input_ids=ids).logits


def _assert_training_lowers_the_loss(base, lora, trainer, data) -> None:  # noqa: ANN001
    """Run ``trainer``; the loss on every training question of both documents must go down."""
    batch = [(c, ex) for c in range(2) for ex in data[c].train]
    with lora.attached(base.model), torch.no_grad():
        before = trainer._loss(batch)
    trainer.run([], lambda *a: None)
    with lora.attached(base.model), torch.no_grad():
        after = trainer._loss(batch)
    assert (after < before).all(), (before, after)


@pytest.mark.parametrize("variant", ["head", "head_ab", "head_gain", "warm"])
def test_step_zero_is_the_hypernetworks_own_adapter(setup, variant) -> None:  # noqa: ANN001
    base, hyper, distill, data = setup
    _, trainer = _composed(setup, train_latents=variant.startswith("head"), free=variant == "warm", untie=variant == "head_ab",
                           gain=variant == "head_gain")
    composed = [composed_adapter(base, data[c], trainer.final_factors(c), variant) for c in range(2)]
    own = hyper.internalize_chunks(base, DOCS)
    torch.testing.assert_close(_logits(base, composed), _logits(base, own), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(base, own), _logits(base, [None, None]))  # the adapters do something


def test_head_trains_only_the_latents_and_lowers_the_loss(setup) -> None:  # noqa: ANN001
    base, hyper, distill, data = setup
    head_before = hyper.hypernetwork.head.weight.detach().clone()
    snaps, kl = refine(base, distill.config, data, distill._module_paths(base), "head", internalizer=hyper, texts=DOCS,
                       latent_lr=5e-2, snapshot_steps=[1, 4])
    assert len(kl) == 2
    own = hyper.internalize_chunks(base, DOCS)
    assert not torch.allclose(_logits(base, snaps[4]), _logits(base, own))
    assert torch.equal(hyper.hypernetwork.head.weight, head_before)  # the network itself is untouched
    # every adapter stays in the head's range: rank = the hypernetwork's rank + its bias LoRA's
    w = next(iter(snaps[4][0].weights.values()))
    assert w.lora_A.shape[0] == 2 * hyper.config.rank
    # and the distillation loss on every training question goes down
    lora, trainer = _composed(setup, train_latents=True, free=False)
    _assert_training_lowers_the_loss(base, lora, trainer, data)


def test_warm_and_free_train_a_free_lora(setup) -> None:  # noqa: ANN001
    base, hyper, distill, data = setup
    paths = distill._module_paths(base)
    free, _ = refine(base, distill.config, data, paths, "free", internalizer=None, texts=DOCS, latent_lr=0.0, snapshot_steps=[4])
    warm, _ = refine(base, distill.config, data, paths, "warm", internalizer=hyper, texts=DOCS, latent_lr=0.0, snapshot_steps=[4])
    assert next(iter(free[4][0].weights.values())).lora_A.shape[0] == distill.config.rank
    assert next(iter(warm[4][0].weights.values())).lora_A.shape[0] == 2 * hyper.config.rank + distill.config.rank
    own = hyper.internalize_chunks(base, DOCS)
    assert not torch.allclose(_logits(base, warm[4]), _logits(base, own))
    # the free variant is plain distillation: the same factors as _GroupTrainer's
    plain = _GroupTrainer(base, distill.config, data, paths)
    plain.run([], lambda *a: None)
    a_free = next(iter(free[4][0].weights.values())).lora_A
    torch.testing.assert_close(a_free, plain.final_factors(0)[paths[0]][0])


def test_bad_variant_and_missing_hypernetwork(setup) -> None:  # noqa: ANN001
    base, hyper, distill, data = setup
    with pytest.raises(ValueError, match="Unknown variant"):
        refine(base, distill.config, data, distill._module_paths(base), "nope", internalizer=hyper, texts=DOCS, latent_lr=1e-2,
               snapshot_steps=[])
    with pytest.raises(ValueError, match="needs a hypernetwork"):
        refine(base, distill.config, data, distill._module_paths(base), "head", internalizer=None, texts=DOCS, latent_lr=1e-2,
               snapshot_steps=[])


def test_cosine_schedule_decays_each_group_from_its_own_lr(setup) -> None:  # noqa: ANN001
    import dataclasses
    import math

    base, hyper, distill, data = setup
    cfg = dataclasses.replace(distill.config, lr_schedule="cosine", max_steps=4)
    _, trainer = _composed(setup, cfg=cfg, latent_lr=0.5, train_latents=True, free=True)
    trainer.run([], lambda *a: None)
    last = 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the schedule's factor at the last step
    latent_group, free_group = trainer.optimizer.param_groups
    assert latent_group["lr"] == pytest.approx(0.5 * last) and free_group["lr"] == pytest.approx(cfg.lr * last)


def test_head_ab_unties_the_b_latents(setup) -> None:  # noqa: ANN001
    base, hyper, distill, data = setup
    lora, trainer = _composed(setup, train_latents=True, free=False, untie=True)
    assert len(trainer.optimizer.param_groups[0]["params"]) == 2
    trainer.run([], lambda *a: None)
    assert not torch.allclose(lora.z, lora.z_b)  # A and B latents moved apart
    snaps, _ = refine(base, distill.config, data, distill._module_paths(base), "head_ab", internalizer=hyper, texts=DOCS, latent_lr=5e-2, snapshot_steps=[4])
    assert next(iter(snaps[4][0].weights.values())).lora_A.shape[0] == 2 * hyper.config.rank


def test_head_gain_trains_a_gain_per_rank(setup) -> None:  # noqa: ANN001
    hyper = setup[1]
    lora, trainer = _composed(setup, train_latents=True, free=False, gain=True)
    trainer.run([], lambda *a: None)
    assert lora.gain.shape == (2, hyper.config.num_layers, 1, hyper.config.rank, 1)
    assert not torch.allclose(lora.gain, torch.ones_like(lora.gain))


def test_free_proj_is_free_projected_onto_the_heads_row_spaces(setup) -> None:  # noqa: ANN001
    from benchmarks.latent_refine import head_projectors

    base, hyper, distill, data = setup
    paths = distill._module_paths(base)
    free, _ = refine(base, distill.config, data, paths, "free", internalizer=None, texts=DOCS, latent_lr=0.0, snapshot_steps=[4])
    proj, _ = refine(base, distill.config, data, paths, "free_proj", internalizer=hyper, texts=DOCS, latent_lr=0.0, snapshot_steps=[4])
    P = head_projectors(hyper, base)
    d_in = hyper.hypernetwork.module_dims["down_proj"][0]
    for name in paths:
        a, b = free[4][0].weights[name].lora_A, free[4][0].weights[name].lora_B
        pa, pb = proj[4][0].weights[name].lora_A, proj[4][0].weights[name].lora_B
        torch.testing.assert_close(pa, a @ P[name][0])
        torch.testing.assert_close(pb, (b.T @ P[name][1]).T)
        torch.testing.assert_close(pa @ P[name][0], pa, atol=1e-5, rtol=1e-4)  # a projector: idempotent
        torch.testing.assert_close(pb.T @ P[name][1], pb.T, atol=1e-5, rtol=1e-4)
        assert (pa - a).norm() > 1e-4  # the head's A rows span less than the whole input space here
    w = hyper.hypernetwork.head.weight[0, 0, :, :d_in]  # a row the head can write stays put
    torch.testing.assert_close(w @ P[paths[0]][0], w, atol=1e-5, rtol=1e-4)



def test_warm_is_the_engines_refine_internalizer(setup) -> None:  # noqa: ANN001
    """The probe's ``warm`` (measured in sessions 10-11) and the product's ``method="refine"`` train one function:
    with the same trainable factors, the same loss and the same gradients. (Whole runs are not compared: on this
    tiny model the KL is ~5e-5, and Adam turns rounding-level gradient differences into different steps.)"""
    base, hyper, distill, data = setup
    paths = distill._module_paths(base)
    probe, probe_trainer = _composed(setup, train_latents=False, free=True)
    engine_trainer = _GroupTrainer(base, distill.config, data, paths, hyper.internalize_chunks(base, DOCS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in paths:
            b = torch.randn(engine_trainer.lora.lora_B[name].shape, generator=g)
            engine_trainer.lora.lora_B[name].copy_(b)
            probe.free_B[name].copy_(b)
            probe.free_A[name].copy_(engine_trainer.lora.lora_A[name])
    batch = [(c, ex) for c in range(2) for ex in data[c].train]
    losses = []
    for trainer, lora in ((probe_trainer, probe), (engine_trainer, engine_trainer.lora)):
        with lora.attached(base.model):
            loss = trainer._loss(batch)
        loss.sum().backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-7, rtol=1e-4)
    assert (losses[1] > 1e-3).all()  # the random factors move the model: the comparison is not of zeros
    for name in paths:
        torch.testing.assert_close(probe.free_B[name].grad, engine_trainer.lora.lora_B[name].grad, atol=1e-7, rtol=1e-3)
        torch.testing.assert_close(probe.free_A[name].grad, engine_trainer.lora.lora_A[name].grad, atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("variant", ["free_b", "rand_b"])
def test_b_only_variants_keep_a_at_its_init_and_lower_the_loss(setup, variant) -> None:  # noqa: ANN001
    from benchmarks.latent_refine import RandomHeadLoRA, RandomHeadTrainer

    base, hyper, distill, data = setup
    paths = distill._module_paths(base)
    cfg = distill.config
    seeds = [cfg.seed + i for i in range(2)]
    width = 4 if variant == "rand_b" else None
    lora = RandomHeadLoRA(base, paths, cfg, seeds, width=width)
    a_before = {n: a.detach().clone() for n, a in lora.lora_A.items()}
    trainer = RandomHeadTrainer(base, cfg, data, paths, lora, lr=LR_B)
    assert all(torch.count_nonzero(trainer._factors_now(c)[n][1]) == 0 for c in range(2) for n in paths)  # starts at the base
    _assert_training_lowers_the_loss(base, lora, trainer, data)
    for n in paths:
        assert torch.equal(lora.lora_A[n], a_before[n])  # A is frozen
        b = trainer._factors_now(0)[n][1]  # (d_out, r)
        assert torch.count_nonzero(b) > 0
        if width:  # every column lies in its own width-dimensional random subspace
            for j in range(cfg.rank):
                basis = lora.maps[n][j].T  # (d_out, width)
                coef = torch.linalg.lstsq(basis, b[:, j:j + 1]).solution
                torch.testing.assert_close(basis @ coef, b[:, j:j + 1], atol=1e-5, rtol=1e-4)
    snaps, kl = refine(base, cfg, data, paths, variant, internalizer=None, texts=DOCS, latent_lr=LR_B, snapshot_steps=[4], rand_width=4)
    assert len(snaps[4]) == 2 and len(kl) == 2  # runs without a hypernetwork
    assert all(torch.count_nonzero(a.weights[paths[0]].lora_B) > 0 for a in snaps[4])


@pytest.fixture(scope="module")
def setup_b(setup):  # noqa: ANN001, ANN201
    """``setup`` with a "b" head (non-zero maps, so the document path is open)."""
    from d2l_integrations.engine.hypernetwork import replace_head

    base, hyper, distill, data = setup
    torch.manual_seed(1)
    net = replace_head(hyper.hypernetwork, "b")
    with torch.no_grad():
        net.head.weight.normal_(0, 0.3)
        net.slot_head.normal_(0, 0.3)
    return base, HypernetworkInternalizer(net.eval(), checkpoint_id="tiny-b"), distill, data


@pytest.mark.parametrize("variant", ["head", "head_gain"])
def test_a_b_head_starts_at_its_own_adapter_and_its_latents_train(setup_b, variant) -> None:  # noqa: ANN001
    """The probe decodes through ``Hypernetwork.decode``: for a "b" head, z without normalisation."""
    base, hyper, distill, data = setup_b
    lora, trainer = _composed(setup_b, train_latents=True, free=False, gain=variant == "head_gain")
    composed = [composed_adapter(base, data[c], trainer.final_factors(c), variant) for c in range(2)]
    own = hyper.internalize_chunks(base, DOCS)
    torch.testing.assert_close(_logits(base, composed), _logits(base, own), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(base, own), _logits(base, [None, None]))
    _assert_training_lowers_the_loss(base, lora, trainer, data)
