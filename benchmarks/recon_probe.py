"""Can the reconstruction loss steer a trained hypernetwork? A probe of its gradient and of a few recon-only steps.

Runs S8r/S8r3 (session 7) moved the cosine between the generated document delta and its ``distill`` target only from
0.001 to 0.003-0.005 in 1,700 steps. This probe asks why, on any device, for one checkpoint and a folder of targets
(``benchmarks/distill_targets.py``):

1. **Gradient shares** on one batch of target rows: the norm of the hypernetwork gradient of the distillation loss
   (KL + key CE, as in training) and of ``1 - cos`` alone, and the cosine between the two gradients.
2. **Steps**: ``--steps`` Adam steps (the trainer's lr and grad clip) on ``1 - cos`` alone, or with ``--weight W`` on the
   training loss ``distill + W * (1 - cos)``, then the cosine and the distillation loss again. If the cosine does not
   rise on recon alone, the loss (not its weight) is the problem; with ``--weight``, the smallest W whose cosine rises
   without the distillation loss rising is the one to train with.

    python -m benchmarks.recon_probe --init d2l_integrations/checkpoints/smollm2-135m-instruct \\
        --targets /tmp/targets --rows 4 --steps 30 [--weight 1000]

Prints one JSON line per measurement. Nothing is written to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from d2l_integrations.engine.checkpoint import load_checkpoint
from d2l_integrations.engine.training import DistillationTrainer, TrainingConfig, add_base_model_arguments, delta_cosine


def _grad_vector(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def probe(base: object, hyper: torch.nn.Module, targets_dir: str, *, rows: int = 4, steps: int = 30, lr: float = 3e-4,
          weight: float | None = None, on_line: Callable[[dict], None] = lambda d: None) -> list[dict]:
    """The two measurements of the module docstring; returns (and hands ``on_line``) one dict per measurement.
    ``weight=None``: the steps optimise ``1 - cos`` alone; else ``distill + weight * (1 - cos)``."""
    out: list[dict] = []

    def emit(d: dict) -> None:
        out.append(d)
        on_line(d)

    params = [prm.requires_grad_(True) for prm in hyper.parameters()]
    cfg = TrainingConfig(tasks=(("targets", 1.0),), batch_size=rows, lr=lr, warmup_steps=0, max_steps=max(1, steps),
                         task_kwargs={"targets": {"targets_dir": str(targets_dir)}}, eval_every=0, save_every=0, log_every=0,
                         recon_weight=1.0)
    trainer = DistillationTrainer(base, hyper, cfg)
    examples = trainer.fill_teacher_responses(trainer.train_data.batch(0, rows))
    examples = [e for e in examples if e.target and not e.chunks and e.response.strip()]
    if len(examples) < 2:
        msg = f"Fewer than 2 usable target rows in {targets_dir}: make more with benchmarks/distill_targets.py."
        raise ValueError(msg)
    batch = trainer.tokens.batch(examples, trainer.device)
    targets = [trainer.target(e.target) for e in examples]
    idx = list(range(len(examples)))

    def factors_now() -> tuple[dict, torch.Tensor]:
        t_logits, feats, mask = trainer.teacher(batch)
        return trainer.document_factors(batch, feats, mask), t_logits

    factors, t_logits = factors_now()
    parts = trainer.losses(t_logits, trainer.student(batch, factors), batch)
    distill_loss = trainer.distill_loss(parts)
    cos = delta_cosine(factors, idx, targets)
    hyper.zero_grad(set_to_none=True)
    distill_loss.backward(retain_graph=True)
    g_distill = _grad_vector(params).clone()
    hyper.zero_grad(set_to_none=True)
    (1 - cos).mean().backward()
    g_recon = _grad_vector(params).clone()
    delta_norm = {m: round(float(torch.linalg.matrix_norm(b[0].detach().float().transpose(1, 2) @ a[0].detach().float()).mean()), 3)
                  for m, (a, b) in factors.items()}
    target_norm = {m: round(float(torch.linalg.matrix_norm(tb.float().transpose(1, 2) @ ta.float()).mean()), 3)
                   for m, (ta, tb) in targets[0].items()}
    emit({"rows": len(idx), "distill_loss": round(distill_loss.item(), 4), "cos": [round(x, 5) for x in cos.tolist()],
          "grad_norm_distill": float(g_distill.norm()), "grad_norm_recon": float(g_recon.norm()),
          "recon_over_distill": float(g_recon.norm() / g_distill.norm().clamp_min(1e-12)),
          "grad_cosine": float(torch.nn.functional.cosine_similarity(g_distill, g_recon, dim=0)),
          "layer_delta_norm_row0": delta_norm, "layer_target_norm_row0": target_norm})

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    mode = "recon_only" if weight is None else f"distill+{weight:g}*recon"
    t0 = time.time()
    for step in range(1, steps + 1):
        factors, t_logits = factors_now()
        recon = (1 - delta_cosine(factors, idx, targets)).mean()
        loss, line = recon, {}
        if weight is not None:
            parts = trainer.losses(t_logits, trainer.student(batch, factors), batch)
            distill_loss = trainer.distill_loss(parts)
            loss = distill_loss + weight * recon
            line = {"distill_loss_before_step": round(distill_loss.item(), 4)}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step == 1 or step % 10 == 0 or step == steps:
            emit({"mode": mode, "step": step, "mean_cos_before_step": round(1 - recon.item(), 5), **line,
                  "s": round(time.time() - t0, 1)})
    if steps:
        factors, t_logits = factors_now()
        with torch.no_grad():
            parts = trainer.losses(t_logits, trainer.student(batch, factors), batch)
            cos = delta_cosine(factors, idx, targets)
        emit({"mode": mode, "after_steps": steps, "cos": [round(x, 5) for x in cos.tolist()],
              "distill_loss": round(trainer.distill_loss(parts).item(), 4)})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model_arguments(p)
    p.add_argument("--init", required=True, help="hypernetwork checkpoint folder")
    p.add_argument("--targets", required=True, help="folder with index.jsonl and <target>.safetensors")
    p.add_argument("--rows", type=int, default=4, help="target rows in the probe batch")
    p.add_argument("--steps", type=int, default=30, help="Adam steps after the gradient measurement")
    p.add_argument("--weight", type=float, default=None, help="step on distill + WEIGHT * (1 - cos) instead of 1 - cos alone")
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args(argv)
    if args.rows < 2 or args.steps < 0 or (args.weight is not None and args.weight < 0):
        p.error("--rows must be >= 2, --steps >= 0 and --weight >= 0")
    from d2l_integrations.engine.base_model import load_base_model

    base = load_base_model(args.base, device=args.device, gguf_file=args.gguf)
    hyper = load_checkpoint(args.init, base, allow_other_base=True).float().to(base.device).train()
    probe(base, hyper, args.targets, rows=args.rows, steps=args.steps, lr=args.lr, weight=args.weight, on_line=lambda d: print(json.dumps(d), flush=True))


if __name__ == "__main__":
    main()
