"""The capacity ladder of issue 7: where does the D2L hypernetwork stop internalizing?

Rungs (each a short experiment with the diagnostic table):

1. ``rung1``: a directly optimised rank-8 ``down_proj`` LoRA (alpha = 2 * 8**1.5, as D2L) makes
   the model say a given 4-digit number. Cheap; runs on CPU.
2. ``rung2``: the hypernetwork on the needle sentence alone (no haystack), several variants side
   by side for a fixed time each (``--variants``), so one device call separates learning from
   capacity:
   - ``d2l``      the published parametrisation (generated A and B, ``scaler_B`` starts at 0);
   - ``d2l_sb1``  the same with ``scaler_B`` starting at 1 (the document-dependent path is open
                  from step 0);
   - ``fixedA``   A is a learned, document-independent basis per layer; only B is generated
                  (``FixedAHypernetwork``): learning B is then a regression from the latents;
   - ``oracle``   the encoder features are replaced by clean, ordered digit embeddings: can the
                  Perceiver -> head learn *any* document-dependent LoRA?
3. ``rung3``: short haystacks (32-128 tokens), the variant that won rung 2 on validation data.
4. ``rung4``: full haystacks (128-512 tokens) and made-up facts.

Validation examples (seed + 2000) pick the winning variant; the reported table uses held-out
evaluation examples (seed + 1000, held-out essays). Results go to ``--out`` as JSON.

    python benchmarks/ladder.py rung1 --device cpu
    python benchmarks/ladder.py plan --base /root/stage --gguf smol.gguf --out $OUT --budget-s 540
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2l_integrations.engine.config import HypernetworkConfig  # noqa: E402
from d2l_integrations.engine.hypernetwork import Hypernetwork  # noqa: E402
from d2l_integrations.engine.training import (  # noqa: E402
    DistillationTrainer,
    TrainingConfig,
    add_base_model_arguments,
    greedy_eval,
    lora_forward,
)
from d2l_integrations.engine.training_data import NEEDLE_QUESTION, TaskMix, make_task  # noqa: E402

ALPHA = 2 * 8**1.5
WORK_DIR: str | None = None  # where per-run state goes (kept off $OUT: states are large)


def small_config(base, **kw) -> HypernetworkConfig:  # noqa: ANN001
    """A D2L hypernetwork sized for SmolLM2-135M (~27M parameters with generated A|B)."""
    d = dict(latent_size=256, num_latents=16, num_blocks=3, num_heads=4, num_kv_heads=4, head_dim=64,
             projection_factor=2, mlp_factor=2, resmlp_factor=2, context_format="chat_prefix")
    d.update(kw)
    return HypernetworkConfig(num_layers=base.num_layers, hidden_size=base.hidden_size, module_dims=base.module_dims(["down_proj"]),
                              base_model=base.name, base_model_revision=base.revision, **d)


class FixedAHypernetwork(nn.Module):
    """Wraps ``Hypernetwork``: A is a learned document-independent basis ``[L, r, d_in]``; B is generated.

    With A fixed, the document-dependent gradient reaches B (and through it the Perceiver) from
    step 0, and it is a plain regression from latents to B rows instead of a product of two
    random generated factors.
    """

    def __init__(self, config: HypernetworkConfig, *, scaler_b: float = 1.0) -> None:
        super().__init__()
        self.inner = Hypernetwork(config)
        self.config = config
        for p in self.inner.scaler_B.values():
            p.data.fill_(scaler_b)
        self.fixed_A = nn.ParameterDict({m: nn.Parameter(torch.randn(config.num_layers, config.rank, d_in) / math.sqrt(d_in))
                                         for m, d_in, _ in config.module_dims})

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN201
        factors = self.inner(features, attention_mask)
        return {m: (self.fixed_A[m].unsqueeze(0).expand(b.shape[0], -1, -1, -1).to(b.dtype), b) for m, (_, b) in factors.items()}

    def bias_factors(self):  # noqa: ANN201
        return self.inner.bias_factors()


def make_variant(name: str, base) -> tuple[nn.Module, object]:  # noqa: ANN001
    """(hypernetwork, features_fn or None) for a rung-2 variant name."""
    cfg = small_config(base)
    if name == "d2l":
        return Hypernetwork(cfg), None
    if name == "d2l_sb1":
        h = Hypernetwork(cfg)
        for p in h.scaler_B.values():
            p.data.fill_(1.0)
        return h, None
    if name == "d2l_sb1_small":  # fits the 24 MB shipping limit in bf16 (~11.4M parameters)
        h = Hypernetwork(small_config(base, latent_size=128, head_dim=32, resmlp_factor=1))
        for p in h.scaler_B.values():
            p.data.fill_(1.0)
        return h, None
    if name == "fixedA":
        return FixedAHypernetwork(cfg), None
    if name == "oracle":
        return FixedAHypernetwork(cfg), OracleFeatures(base)
    msg = f"Unknown variant {name!r}: d2l, d2l_sb1, fixedA, oracle."
    raise ValueError(msg)


class OracleFeatures:
    """Encoder features that are clean ordered digit codes: row t = E[digit_t] + P[t], every layer.

    Replaces the base model's hidden states; isolates "can the hypernetwork learn a
    document-dependent LoRA at all" from "can it find the digits in real features".
    """

    def __init__(self, base) -> None:  # noqa: ANN001
        g = torch.Generator().manual_seed(0)
        H = base.hidden_size
        self.num_layers = base.num_layers
        self.E = torch.randn(10, H, generator=g) * 3
        self.P = torch.randn(4, H, generator=g) * 3
        tok = base.tokenizer
        self.digit_ids = {tok.convert_tokens_to_ids(str(d)): d for d in range(10)}

    def __call__(self, hidden_states, batch):  # noqa: ANN001, ANN204
        n = batch.teacher_ids.shape[0]
        dev, dt = hidden_states[0].device, hidden_states[0].dtype
        feats = torch.zeros(n, 8, self.E.shape[1])
        for i, ex in enumerate(batch.examples):
            for t, ch in enumerate(ex.key[:4]):
                feats[i, t] = self.E[int(ch)] + self.P[t]
        feats = feats.to(dev, dt).unsqueeze(1).expand(-1, self.num_layers, -1, -1).contiguous()
        mask = torch.zeros(n, 8, dtype=torch.bool, device=dev)
        mask[:, :4] = True
        return feats, mask


# ------------------------------------------------------------------------------------ rung 1
def rung1(base, *, numbers=("4729", "1380", "8056"), steps: int = 60, lr: float = 3e-3) -> dict:  # noqa: ANN001
    """Optimise one rank-8 down_proj LoRA per number (CE on the response), then greedy-decode."""
    from d2l_integrations.engine.training import Tokenizer
    from d2l_integrations.engine.training_data import Example

    tok = Tokenizer(base.tokenizer)
    L = base.num_layers
    paths = {("down_proj", layer): base.module_path(layer, "down_proj") for layer in range(L)}
    _, d_in, d_out = base.module_dims(["down_proj"])[0]
    results = {}
    loras = {}
    for number in numbers:
        ex = Example(f"The special magic number is {number}.", NEEDLE_QUESTION, f"The special magic number is {number}.", number, (number,), "needle")
        batch = tok.batch([ex], base.device)
        torch.manual_seed(0)
        A = (torch.randn(1, L, 8, d_in) / math.sqrt(d_in)).requires_grad_()
        B = torch.zeros(1, L, 8, d_out, requires_grad=True)
        opt = torch.optim.Adam([A, B], lr=lr)
        t0 = time.time()
        solved_at = None
        for step in range(steps):
            with lora_forward(base.model, paths, {"down_proj": (A, B)}, ALPHA):
                out = base.model.model(input_ids=batch.student_ids)
                h = torch.gather(out.last_hidden_state, 1, batch.student_resp.unsqueeze(-1).expand(-1, -1, out.last_hidden_state.shape[-1]))
                logits = base.model.lm_head(h).float()
            ce = torch.nn.functional.cross_entropy(logits[0][batch.resp_mask[0]], batch.resp_ids[0][batch.resp_mask[0]])
            opt.zero_grad()
            ce.backward()
            opt.step()
            pred = logits[0].argmax(-1)[batch.key_mask[0]]
            if solved_at is None and bool((pred == batch.resp_ids[0][batch.key_mask[0]]).all()):
                solved_at = step + 1
            if solved_at is not None and step + 1 >= solved_at + 5:
                break
        loras[number] = (A.detach(), B.detach())
        results[number] = {"teacher_forced_digits_solved_at_step": solved_at, "final_ce": round(ce.item(), 4), "seconds": round(time.time() - t0, 1),
                           "A_norm": round(A.detach().norm().item(), 3), "B_norm": round(B.detach().norm().item(), 4)}
    # greedy table: own LoRA, another number's LoRA, no LoRA
    prompt = tok.student_prompt(NEEDLE_QUESTION)
    ids = torch.tensor([prompt], device=base.device)
    table = {}
    for i, number in enumerate(numbers):
        other = numbers[(i + 1) % len(numbers)]
        row = {}
        for cond, fac in (("no_lora", None), ("own_lora", loras[number]), ("other_lora", loras[other])):
            with lora_forward(base.model, paths, {"down_proj": fac} if fac else None, ALPHA):
                out = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                                          pad_token_id=tok.pad_id)
            row[cond] = base.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        table[number] = row
    return {"per_number": results, "greedy": table}


# ------------------------------------------------------------------------------- rung 2-4
def run_variant(base, variant: str, task_spec, *, seconds: float, out: Path, cfg_kw: dict, eval_n: int, val_n: int = 64,  # noqa: ANN001
                init_state: dict | None = None) -> dict:
    hyper, feats_fn = make_variant(variant, base)
    hyper = hyper.to(base.device)
    if init_state is not None:
        hyper.load_state_dict(init_state)
    tasks = tuple((t, 1.0) for t in task_spec)
    cfg = TrainingConfig(tasks=tasks, **cfg_kw)
    work = Path(WORK_DIR or out) / f"{variant}_{'-'.join(task_spec)}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    trainer = DistillationTrainer(base, hyper, cfg, out_dir=work, features_fn=feats_fn)
    n_params = sum(p.numel() for p in hyper.parameters())
    t0 = time.time()
    res = trainer.train(deadline=t0 + seconds, on_log=lambda d: print(json.dumps(d), flush=True))
    train_s = time.time() - t0
    # validation (selection) on its own seed; evaluation (reported) on the held-out eval sets
    val = {}
    for t in task_spec:
        trainer.eval_sets = {t: TaskMix([(make_task(t, split="eval", **cfg.task_kwargs.get(t, {})), 1.0)], seed=cfg.seed + 2000).fixed(val_n)}
        val[t] = trainer.eval_teacher_forced()[t]
    table = {}
    for t in task_spec:
        exs = TaskMix([(make_task(t, split="eval", **cfg.task_kwargs.get(t, {})), 1.0)], seed=cfg.seed + 1000).fixed(eval_n)
        table[t] = greedy_eval(trainer, exs, max_new_tokens=16 if t.startswith("needle") else 24)
    if (work / "log.jsonl").is_file():
        import shutil

        shutil.copy(work / "log.jsonl", out / f"log_{variant}_{'-'.join(task_spec)}.jsonl")
    return {"variant": variant, "tasks": list(task_spec), "params_M": round(n_params / 1e6, 2), "steps": trainer.step, "train_s": round(train_s, 1),
            "tok_per_s": round(trainer.tokens_seen / max(train_s, 1e-9)), "ema": res["ema"], "val": val, "eval": table,
            "state": {k: v.detach().cpu() for k, v in hyper.state_dict().items()}}


def doc_gap(r: dict, task: str) -> float:
    v = r["val"][task]
    return v["mismatched_key_ce"] - v["matched_key_ce"]


def _task_kwargs(lo: int, hi: int) -> dict:
    return {t: {"min_tokens": lo, "max_tokens": hi} for t in ("needle", "needle_line", "needle_essay")}


def _summary(r: dict) -> str:
    return json.dumps({k: r[k] for k in ("variant", "tasks", "steps", "train_s", "tok_per_s", "val")}) + "\n" + json.dumps(
        {t: r["eval"][t]["accuracy"] for t in r["eval"]})


def plan(args) -> None:  # noqa: ANN001
    """Stage A: each variant on ``--tasks`` for ``--seconds``; stage B: the best (by validation
    matched-vs-mismatched key CE gap, oracle excluded) continues on ``--then-tasks``."""
    from d2l_integrations.engine.base_model import load_base_model

    global WORK_DIR
    WORK_DIR = args.work
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_base_model(args.base, device=args.device, gguf_file=args.gguf)
    print(f"loaded base in {time.time() - t_start:.1f}s", flush=True)
    kw = dict(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, max_steps=args.max_steps, eval_every=0, save_every=0, log_every=50,
              task_kwargs=_task_kwargs(args.min_tokens, args.max_tokens))
    init = torch.load(args.init, map_location="cpu") if args.init else None
    init = init.get("state", init) if isinstance(init, dict) and "state" in init else init
    results, states = [], {}
    tasks_a = args.tasks.split(",")
    for v in args.variants.split(","):
        try:
            r = run_variant(base, v, tasks_a, seconds=args.seconds, out=out, cfg_kw=kw, eval_n=args.eval_n, val_n=args.val_n, init_state=init)
        except Exception as exc:  # one broken variant must not cost the others their device minutes
            import traceback

            traceback.print_exc()
            print(f"variant {v} failed: {exc!r}", flush=True)
            continue
        states[v] = r.pop("state")
        results.append(r)
        print(_summary(r), flush=True)
        (out / "ladder.json").write_text(json.dumps(results, indent=1))
    candidates = [r for r in results if r["variant"] != "oracle"] or results
    best = max(candidates, key=lambda r: sum(doc_gap(r, t) for t in tasks_a))
    print(f"best variant on validation: {best['variant']}", flush=True)
    final_state, final_variant = states[best["variant"]], best["variant"]
    if args.then_tasks:
        kw_b = dict(kw, task_kwargs=_task_kwargs(args.then_min, args.then_max), warmup_steps=10)
        seconds = args.then_seconds or max(30.0, args.budget_s - (time.time() - t_start) - 60)
        r = run_variant(base, final_variant, args.then_tasks.split(","), seconds=seconds, out=out, cfg_kw=kw_b, eval_n=args.eval_n,
                        val_n=args.val_n, init_state=final_state)
        final_state = r.pop("state")
        r["stage"] = "B"
        results.append(r)
        print(_summary(r), flush=True)
        (out / "ladder.json").write_text(json.dumps(results, indent=1))
    torch.save({"variant": final_variant, "state": final_state}, out / "best.pt")
    if args.state_dir:
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"variant": final_variant, "state": final_state}, Path(args.state_dir) / "best.pt")
    print(f"total {time.time() - t_start:.1f}s")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["rung1", "plan"])
    add_base_model_arguments(p)
    p.add_argument("--out", default="runs/ladder")
    p.add_argument("--variants", default="d2l,d2l_sb1,fixedA,oracle")
    p.add_argument("--tasks", default="needle_alone")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--min-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--val-n", type=int, default=64)
    p.add_argument("--init", default=None, help="state_dict to start every stage-A variant from")
    p.add_argument("--then-tasks", default="")
    p.add_argument("--then-seconds", type=float, default=0)
    p.add_argument("--then-min", type=int, default=32)
    p.add_argument("--then-max", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--state-dir", default=None)
    p.add_argument("--work", default=None, help="folder for per-run state (default: --out)")
    args = p.parse_args()
    if args.what == "rung1":
        from d2l_integrations.engine.base_model import load_base_model

        base = load_base_model(args.base, device=args.device or "cpu", gguf_file=args.gguf, dtype="float32")
        t0 = time.time()
        res = rung1(base)
        res["seconds_total"] = round(time.time() - t0, 1)
        print(json.dumps(res, indent=1))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "rung1.json").write_text(json.dumps(res, indent=1))
    else:
        plan(args)


if __name__ == "__main__":
    main()
