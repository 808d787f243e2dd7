"""There (no staging needed): data parallelism with more ranks than GPUs, on the tiny random llama.

    torchrun --nproc-per-node 2 -m benchmarks.device.shared_gpu_smoke    # on one GPU: two ranks share it over gloo

Each rank joins through ``init_data_parallel`` (round-robin GPUs, gloo when ranks share one), trains 20 steps and
checks that every rank ends with the same weights; rank 0 then times the per-step all-reduce at the shipped network's
size (11.7 M float32 gradients) on this backend.
"""

from __future__ import annotations

import json
import tempfile
import time

import torch
import torch.distributed as dist

from d2l_integrations.engine.training import DistillationTrainer, init_data_parallel
from tests.tiny_models import make_tiny_base
from tests.unit.engine.test_training import config, tiny_hypernet


def main() -> None:
    data_parallel, device = init_data_parallel(None)
    if not data_parallel:
        raise SystemExit("Start this under torchrun with two or more ranks: torchrun --nproc-per-node 2 -m benchmarks.device.shared_gpu_smoke")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = make_tiny_base()
    base.model.to(device or "cpu")
    torch.manual_seed(100 + rank)
    net = tiny_hypernet(base).to(base.device)
    with tempfile.TemporaryDirectory() as run:
        trainer = DistillationTrainer(base, net, config(max_steps=20), out_dir=run if rank == 0 else None, data_parallel=data_parallel)
        trainer.train()
    flat = torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    grads = torch.randn(11_700_000, device=base.device)
    for _ in range(3):  # warm-up
        dist.all_reduce(grads)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(grads)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1000
    print(json.dumps({"rank": rank, "world": world, "device": str(base.device), "backend": dist.get_backend(), "step": trainer.step,
                      "weights_equal_on_all_ranks": same, "all_reduce_11.7M_fp32_ms": round(ms, 1)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
