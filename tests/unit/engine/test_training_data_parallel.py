"""Data-parallel training (``torchrun``): two real gloo processes on CPU with the tiny random llama.

The processes meet through a ``FileStore`` in ``tmp_path``; gloo then talks over loopback between
the two local processes (nothing leaves the machine). Each test waits at most ``TIMEOUT_S`` for
them, so a collective that one rank skips fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2l_integrations.engine.training import DistillationTrainer
from tests.tiny_models import make_tiny_base
from tests.unit.engine.test_training import config, tiny_hypernet

TIMEOUT_S = 180


def _spawn(fn, world: int, *args) -> None:  # noqa: ANN001
    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    t_end = time.time() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.time() > t_end:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"data-parallel workers did not finish in {TIMEOUT_S} s (a rank missed a collective?)")


def _join(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)


def _train_worker(rank: int, world: int, store: str, run: str, results: str) -> None:
    _join(rank, world, store)
    try:
        base = make_tiny_base()  # the frozen base is the same on every rank, as when each loads one checkpoint
        torch.manual_seed(100 + rank)  # ... but the hypernetworks start apart: the trainer must align them
        net = tiny_hypernet(base)
        own_init = {k: v.clone() for k, v in net.state_dict().items()}
        trainer = DistillationTrainer(base, net, config(max_steps=50, save_every=2), out_dir=run, data_parallel=True)
        start = {k: v.clone() for k, v in net.state_dict().items()}
        first_docs = [e.doc for e in trainer.train_data.batch(0, 4)]

        # the reduction itself: gradients are means over the ranks that had rows, counters are totals
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.full_like(p, float(rank + 1))
        rec, tokens, any_rows = trainer._all_reduce({"loss": rank + 1.0, "kl": 0.0, "key_ce": 0.0, "key_acc": 0.0},
                                                    tokens=10 * (rank + 1), skipped=rank, wrong=1)
        both = {"grad": sorted({float(p.grad.unique().item()) for p in params}), "loss": rec["loss"], "tokens": tokens,
                "any_rows": any_rows, "skipped": trainer.skipped_rows, "wrong": trainer.wrong_teacher_rows}
        for p in params:
            p.grad = torch.full_like(p, 3.0) if rank == 0 else None  # rank 1 had no rows this step
        rec, tokens, _ = trainer._all_reduce({"loss": 3.0, "kl": 0.0, "key_ce": 0.0, "key_acc": 0.0} if rank == 0 else {},
                                             tokens=7 if rank == 0 else 0, skipped=0, wrong=0)
        one = {"grad": sorted({float(p.grad.unique().item()) for p in params}), "loss": rec["loss"], "tokens": tokens}
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.skipped_rows = trainer.wrong_teacher_rows = 0

        trainer.train(max_steps=3)
        after_3 = trainer.step
        # rank 1's deadline has passed, rank 0 has none: both must stop after the same step
        trainer.train(deadline=time.time() - 1 if rank == 1 else None, max_steps=50)
        torch.save({"own_init": own_init, "start": start, "end": net.state_dict(), "first_docs": first_docs, "both": both,
                    "one": one, "after_3": after_3, "step": trainer.step, "tokens_seen": trainer.tokens_seen},
                   os.path.join(results, f"rank{rank}.pt"))
        dist.barrier()  # tear down together: a rank that leaves while the other still talks can abort it
    finally:
        dist.destroy_process_group()


def test_two_ranks_draw_different_batches_and_keep_equal_weights(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _spawn(_train_worker, 2, str(tmp_path / "store"), str(tmp_path / "run"), str(results))
    r0, r1 = (torch.load(results / f"rank{i}.pt", weights_only=False) for i in (0, 1))

    assert any(not torch.equal(r0["own_init"][k], r1["own_init"][k]) for k in r0["own_init"])
    for k in r0["start"]:  # rank 1 starts from rank 0's weights ...
        assert torch.equal(r0["start"][k], r0["own_init"][k]) and torch.equal(r1["start"][k], r0["own_init"][k]), k
    assert r0["first_docs"] != r1["first_docs"]  # ... draws its own batches ...
    for k in r0["end"]:  # ... and every step keeps the two equal
        assert torch.equal(r0["end"][k], r1["end"][k]), k
    assert any(not torch.equal(r0["end"][k], r0["start"][k]) for k in r0["end"])

    for r in (r0, r1):
        assert r["both"] == {"grad": [1.5], "loss": 1.5, "tokens": 30, "any_rows": True, "skipped": 1, "wrong": 2}
        assert r["one"] == {"grad": [3.0], "loss": 3.0, "tokens": 7}  # the rank without rows does not dilute the mean
        assert r["after_3"] == 3
    assert r0["step"] == r1["step"] and 3 < r0["step"] < 50
    assert r0["tokens_seen"] == r1["tokens_seen"] > 0

    # rank 0 alone wrote the log (one line per step) and the state, which resumes in a single process
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "stopped" not in x]
    assert steps == list(range(1, r0["step"] + 1))
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    assert state["step"] == r0["step"] and state["world_size"] == 2
    base = make_tiny_base()
    again = DistillationTrainer(base, tiny_hypernet(base), config(max_steps=50), out_dir=tmp_path / "run")
    assert again.maybe_resume() and again.step == r0["step"]
    for k, v in again.hypernet.state_dict().items():
        assert torch.equal(v, r0["end"][k]), k


def _anneal_worker(rank: int, world: int, store: str, results: str) -> None:
    _join(rank, world, store)
    try:
        base = make_tiny_base()
        trainer = DistillationTrainer(base, tiny_hypernet(base), config(max_steps=10_000, anneal_to_deadline=True), data_parallel=True)
        lrs: list[float] = []
        trainer.train(deadline=time.time() + 8 + 3 * rank, on_log=lambda d: lrs.append(d.get("lr", 0.0)))  # paces differ by rank
        torch.save({"horizon": trainer.horizon, "step": trainer.step, "lr": trainer.lr_at(trainer.step - 1),
                    "end": trainer.hypernet.state_dict()}, os.path.join(results, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_deadline_annealed_horizon(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _spawn(_anneal_worker, 2, str(tmp_path / "store"), str(results))
    r0, r1 = (torch.load(results / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["step"] == r1["step"] and r0["horizon"] == r1["horizon"] < 10_000  # one horizon, so one lr ...
    for k in r0["end"]:  # ... and the weights stay equal
        assert torch.equal(r0["end"][k], r1["end"][k]), k
    assert r0["lr"] < 0.5 * config().lr  # stopped by the first deadline (rank 0's), well down the cosine


def test_data_parallel_without_a_process_group_says_to_use_torchrun(tiny_base):
    with pytest.raises(RuntimeError, match="torchrun"):
        DistillationTrainer(tiny_base, tiny_hypernet(tiny_base), config(), data_parallel=True)


def _eval_worker(rank: int, world: int, store: str, argv: list[str]) -> None:
    _join(rank, world, store)
    try:
        from benchmarks.train_d2l import main

        main(argv)  # ends with a barrier under data parallel
    finally:
        dist.destroy_process_group()


def test_train_d2l_shares_the_evaluation_out_and_writes_the_single_process_table(tmp_path):
    from d2l_integrations.engine.training_data import data_dir

    if not (data_dir() / "squad" / "squad_v1.1_dev_open.jsonl").is_file():
        pytest.skip("SQuAD data not available (set D2L_DATA_DIR or put ../shared/data beside the checkout)")
    from d2l_integrations.engine.base_model import load_base_model
    from d2l_integrations.engine.checkpoint import save_checkpoint

    folder = tmp_path / "tiny"
    base = make_tiny_base()
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    save_checkpoint(tiny_hypernet(load_base_model(str(folder), device="cpu")), tmp_path / "ckpt")

    def argv(name: str) -> list[str]:
        return ["--base", str(folder), "--device", "cpu", "--init", str(tmp_path / "ckpt"), "--work", str(tmp_path / name / "work"),
                "--out", str(tmp_path / name), "--minutes", "0", "--eval", "facts,needle_alone,facts_bio", "--eval-n", "4", "--eval-kl", "4"]

    _spawn(_eval_worker, 2, str(tmp_path / "store"), argv("ddp"))
    from benchmarks.train_d2l import main

    main(argv("single"))

    def table(name: str) -> dict:
        raw = json.loads((tmp_path / name / "eval.json").read_text())
        return {t: {k: v for k, v in r.items() if k != "seconds"} for t, r in raw.items()}

    ddp, single = table("ddp"), table("single")
    assert list(ddp) == ["facts", "needle_alone", "facts_bio"]
    assert ddp == single
    kl_ddp, kl_single = (json.loads((tmp_path / name / "eval_kl.json").read_text()) for name in ("ddp", "single"))
    assert list(kl_ddp) == ["facts", "needle_alone", "facts_bio"]
    assert kl_ddp == kl_single



def test_ranks_share_gpus_round_robin_over_gloo() -> None:
    from d2l_integrations.engine.training import process_group_backend, rank_gpu

    assert [rank_gpu(r, 2) for r in range(4)] == [0, 1, 0, 1]  # torchrun --nproc-per-node 4 on 2 GPUs: two per GPU
    assert [rank_gpu(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert process_group_backend(True, 4, 4) == "nccl"
    assert process_group_backend(True, 2, 4) == "nccl"
    assert process_group_backend(True, 4, 2) == "gloo"  # NCCL refuses two ranks on one GPU
    assert process_group_backend(False, 2, 0) == "gloo"
    with pytest.raises(ValueError, match="--device cpu"):
        rank_gpu(0, 0)


def _compiled_worker(rank: int, world: int, store: str, results: str) -> None:
    _join(rank, world, store)
    try:
        base = make_tiny_base()
        torch.manual_seed(7 + rank)
        trainer = DistillationTrainer(base, tiny_hypernet(base), config(max_steps=3, prefetch=False), data_parallel=True,
                                      compile="aot_eager")
        trainer.train(max_steps=3)
        torch.save({"step": trainer.step, "end": trainer.hypernet.state_dict()}, os.path.join(results, f"rank{rank}.pt"))
        trainer.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_compiled_passes_train_data_parallel_with_equal_weights(tmp_path):
    """The fast GPU setting (session 22: ``--compile --batch-size 64``, 100.6k tok/s a process on an H200) under
    ``torchrun``: the ranks compile on their own and still step together."""
    results = tmp_path / "results"
    results.mkdir()
    _spawn(_compiled_worker, 2, str(tmp_path / "store"), str(results))
    r0, r1 = (torch.load(results / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["step"] == r1["step"] == 3
    for k in r0["end"]:
        assert torch.equal(r0["end"][k], r1["end"][k]), k


def _convert_worker(rank: int, world: int, store: str, cache: str, results: str) -> None:
    _join(rank, world, store)
    try:
        from d2l_integrations.engine.base_model import default_gguf_path, load_base_model

        os.environ["D2L_CACHE_DIR"] = cache
        gguf = default_gguf_path()
        if rank == 0:  # rank 1 converts first (the order that failed), then rank 0 reads its folder
            dist.barrier()
        base = load_base_model(str(gguf.parent), device="cpu", gguf_file=gguf.name)
        with open(os.path.join(results, f"rank{rank}.txt"), "w") as fh:
            fh.write(str(base.num_layers))
        if rank == 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_every_rank_of_a_process_group_can_convert_the_gguf_into_a_fresh_cache(tmp_path):
    """transformers saves a model only on rank 0 of a process group: rank 1's conversion once renamed a folder with
    only the tokenizer over the cache, and both ranks failed to load it (``torchrun``, session 26)."""
    cache, results = tmp_path / "cache", tmp_path / "results"
    results.mkdir()
    _spawn(_convert_worker, 2, str(tmp_path / "store"), str(cache), str(results))
    assert [(results / f"rank{r}.txt").read_text() for r in range(2)] == ["30", "30"]
    (folder,) = (cache / "models").iterdir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
