"""The context-distillation trainer on a tiny random llama: losses, gradients, resume, eval, data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d2l_integrations.engine.config import HypernetworkConfig
from d2l_integrations.engine.hypernetwork import Hypernetwork
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig, greedy_eval, lora_forward
from d2l_integrations.engine.training_data import Example, FactsTask, NeedleTask, TaskMix


def tiny_hypernet(base, **kw) -> Hypernetwork:
    shape = dict(rank=2, latent_size=16, num_latents=4, num_blocks=1, num_heads=2, num_kv_heads=1, head_dim=8,
                 projection_factor=1, mlp_factor=1, resmlp_factor=1, context_format="chat_prefix")
    cfg = HypernetworkConfig(num_layers=base.num_layers, hidden_size=base.hidden_size, module_dims=base.module_dims(["down_proj"]),
                             base_model=base.name, **{**shape, **kw})
    net = Hypernetwork(cfg)
    for p in net.scaler_B.values():  # open the document path so gradients reach every part
        p.data.fill_(1.0)
    return net


def config(**kw) -> TrainingConfig:
    base_kw = dict(tasks=(("needle_alone", 1.0), ("facts", 1.0)), batch_size=4, lr=1e-3, warmup_steps=2, max_steps=50,
                   log_every=1, eval_every=0, save_every=2, eval_size=4, max_doc_tokens=48)
    base_kw.update(kw)
    return TrainingConfig(**base_kw)


def test_lora_forward_matches_merged_weights(tiny_base):
    model = tiny_base.model
    L = tiny_base.num_layers
    _, d_in, d_out = tiny_base.module_dims(["down_proj"])[0]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, L, 3, d_in, generator=g)
    B = torch.randn(2, L, 3, d_out, generator=g) * 0.1
    paths = {("down_proj", layer): tiny_base.module_path(layer, "down_proj") for layer in range(L)}
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad(), lora_forward(model, paths, {"down_proj": (A, B)}, 2.0):
        got = model(ids).logits
        base_out = None
    for row in range(2):
        originals = {}
        with torch.no_grad():
            for layer in range(L):
                w = model.get_submodule(paths[("down_proj", layer)]).weight
                originals[layer] = w.clone()
                w += 2.0 * B[row, layer].T @ A[row, layer]
            want = model(ids[row:row + 1]).logits
            for layer in range(L):
                model.get_submodule(paths[("down_proj", layer)]).weight.copy_(originals[layer])
        assert torch.allclose(got[row:row + 1], want, atol=1e-4)
    with torch.no_grad():
        base_out = model(ids).logits
    assert not torch.allclose(base_out, got)  # hooks are gone after the context


def test_train_steps_reduce_loss_and_reach_every_parameter(tiny_base, tmp_path):
    torch.manual_seed(0)
    net = tiny_hypernet(tiny_base)
    trainer = DistillationTrainer(tiny_base, net, config(), out_dir=tmp_path)
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and rec["kl"] >= 0
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    assert all(p.grad is None for p in tiny_base.model.parameters())  # base stays frozen
    first = rec["loss"]
    for _ in range(15):
        rec = trainer.train_step()
    # the same batch again: the loss on step 0's data went down
    trainer.step = 0
    with torch.no_grad():
        batch = trainer.tokens.batch(trainer.train_data.batch(0, 4), trainer.device)
        t_logits, feats, mask = trainer.teacher(batch)
        parts = trainer.losses(t_logits, trainer.student(batch, trainer.generate_factors(feats, mask)), batch)
    assert parts["kl"].mean().item() + parts["key_ce"].mean().item() < first


def test_resume_restores_weights_optimizer_and_step(tiny_base, tmp_path):
    torch.manual_seed(0)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), out_dir=tmp_path)
    trainer.train(max_steps=4)
    assert (tmp_path / "state.pt").is_file()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1] == {**lines[-1], "step": 4, "stopped": "steps"}
    assert any("tok_per_s" in x for x in lines)
    saved = {k: v.clone() for k, v in trainer.hypernet.state_dict().items()}
    again = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), out_dir=tmp_path)
    assert again.maybe_resume() and again.step == 4
    for k, v in again.hypernet.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # continuing gives the same step-4 batch a fresh run would see (data position = step)
    assert [e.doc for e in again.train_data.batch(4, 4)] == [e.doc for e in trainer.train_data.batch(4, 4)]


def test_resume_with_another_config_fails_clearly(tiny_base, tmp_path):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), out_dir=tmp_path)
    trainer.train(max_steps=2)
    other = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base, rank=3), config(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="another base model or hypernetwork config"):
        other.maybe_resume()


def test_deadline_stops_training(tiny_base, tmp_path):
    import time

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(max_steps=10_000), out_dir=tmp_path)
    t0 = time.time()
    res = trainer.train(deadline=t0 + 3)
    assert time.time() - t0 < 10 and 0 < res["step"] < 10_000


def test_top_k_kl_and_eval_table(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(top_k=8))
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"])
    ev = trainer.eval_teacher_forced(batch_size=4)
    assert set(ev) == {"needle_alone", "facts"}
    assert {"matched_kl", "mismatched_kl", "bias_only_kl", "none_kl", "matched_key_ce"} <= set(ev["facts"])
    table = greedy_eval(trainer, trainer.eval_sets["facts"], batch_size=4, max_new_tokens=3)
    assert set(table["accuracy"]) >= {"no_context", "full_context", "d2l", "mismatched", "bias_only", "mismatched_leak"}


def test_key_tokens_and_response_alignment(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    ex = Example("The special magic number is 4729.", "What is it?", "The special magic number is 4729.", "4729", ("4729",), "needle")
    b = trainer.tokens.batch([ex], trainer.device)
    tok = tiny_base.tokenizer
    key_ids = b.resp_ids[0][b.key_mask[0]].tolist()
    assert tok.decode(key_ids).strip() == "4729"
    # teacher and student positions predict the same response tokens
    r = int(b.resp_mask[0].sum())
    assert b.teacher_ids[0, b.teacher_resp[0, :r] + 1].tolist() == b.resp_ids[0, :r].tolist()
    assert b.student_ids[0, b.student_resp[0, :r] + 1].tolist() == b.resp_ids[0, :r].tolist()
    # the document prefix is the teacher prompt through the document
    assert "4729" in tok.decode(b.teacher_ids[0, : int(b.doc_len[0])].tolist())


def test_data_is_deterministic_and_splits_are_disjoint():
    mix = TaskMix([(FactsTask(), 1.0)], seed=3)
    assert [e.doc for e in mix.batch(5, 3)] == [e.doc for e in mix.batch(5, 3)]
    assert [e.doc for e in mix.batch(5, 3)] != [e.doc for e in mix.batch(6, 3)]
    rng = np.random.default_rng(0)
    ex = NeedleTask(filler="line", min_tokens=64, max_tokens=128).sample(rng)
    assert ex.response in ex.doc and ex.key in ex.response and len(ex.key) == 4
    try:
        train = NeedleTask(split="train", filler="essay")
        held = NeedleTask(split="eval", filler="essay")
    except FileNotFoundError:
        pytest.skip("essay data not available")
    assert not {tuple(e) for e in train._essays} & {tuple(e) for e in held._essays}


def test_published_init_has_no_document_path_and_open_document_path_fixes_it(tiny_base):
    from d2l_integrations.engine.training import open_document_path

    net = tiny_hypernet(tiny_base)
    for p in net.scaler_B.values():
        p.data.zero_()  # the published init
    feats = torch.randn(2, tiny_base.num_layers, 5, tiny_base.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.bool)
    _, B = net(feats, mask)["down_proj"]
    assert torch.count_nonzero(B) == 0  # generated B is exactly zero: no document-dependent delta
    open_document_path(net)
    _, B = net(feats, mask)["down_proj"]
    assert not torch.allclose(B[0], B[1])  # two documents, two adapters


def test_cli_trains_and_resumes(tiny_base, tmp_path):
    from d2l_integrations.engine.training import main

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    shape = json.dumps(dict(rank=2, latent_size=16, num_latents=4, num_blocks=1, num_heads=2, num_kv_heads=1, head_dim=8,
                            projection_factor=1, mlp_factor=1, resmlp_factor=1))
    args = ["--base", str(folder), "--device", "cpu", "--out", str(tmp_path / "run"), "--tasks", "needle_alone",
            "--batch-size", "2", "--hypernet-config", shape]
    main([*args, "--steps", "2"])
    main([*args, "--steps", "3"])  # resumes at step 2
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and max(steps) == 3


def test_empty_rows_are_skipped_and_counted(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    good = trainer.train_data.batch(0, 3)
    bad = Example("", "What?", "x", "", (), "facts")

    class Mix:
        def batch(self, step, size):
            return [*good, bad]

    trainer.train_data = Mix()
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and trainer.skipped_rows == 1
