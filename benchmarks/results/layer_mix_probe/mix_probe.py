"""Throwaway probe: on s22qn + a zero layer mix, the gradient of the training loss w.r.t. the mix, per group and batch:
is its direction consistent across batches (then training moves it), and which entries (reader layer, source layer)?"""
import json, sys, tempfile, time
import torch
from d2l_integrations.engine.base_model import load_base_model
from d2l_integrations.engine.checkpoint import load_checkpoint
from d2l_integrations.engine.hypernetwork import add_layer_mix
from d2l_integrations.engine.training import _parse_tasks
from benchmarks.task_conflict import _trainer, group_gradients, _cos

MIX = sys.argv[1]; BATCHES = int(sys.argv[2]); BS = int(sys.argv[3]); OUT = sys.argv[4]
base = load_base_model("default", device="cpu")
hyper = add_layer_mix(load_checkpoint("/work/main/.stage/ckpt_s22qn", base, allow_other_base=True).float()).train()
for p in hyper.parameters():
    p.requires_grad_(True)
params = [p for p in hyper.parameters() if p.requires_grad]
off = 0
for p in params:
    if p is hyper.layer_mix_delta:
        break
    off += p.numel()
L = hyper.config.num_layers
groups = {"squad": "squad", "wiki": "natural", "wiki_swap": "natural", "text_swap": "natural", "squad_swap": "natural",
          "facts_varied": "made_up", "facts": "made_up", "needle_para": "made_up", "needle": "made_up"}
kw = {"min_tokens": 128, "max_tokens": 512, "max_paragraphs": 3}
tasks = _parse_tasks(MIX)
per = []
with tempfile.TemporaryDirectory() as work:
    tr = _trainer(base, hyper, tasks, work, batches=BATCHES, batch_size=BS, data_seed=1000, ce_weight=0.3,
                  teacher_answers="/work/main/.stage/ta/teacher_answers.json.gz", task_kwargs={t: dict(kw) for t, _ in tasks},
                  config_kw={"bias_dropout": 0.0})
    for step in range(BATCHES):
        t0 = time.time()
        grads, counts = group_gradients(tr, step, groups)
        g = {k: v[off:off + L * L].view(L, L).clone() for k, v in grads.items()}
        full = {k: float(v.norm()) for k, v in grads.items()}
        per.append({k: v.tolist() for k, v in g.items()})
        print(json.dumps({"batch": step, "rows": counts, "mix_grad_norm": {k: round(float(v.norm()), 5) for k, v in g.items()},
                          "net_grad_norm": {k: round(x, 4) for k, x in full.items()}, "s": round(time.time() - t0, 1)}), flush=True)
    tr.close()
json.dump(per, open(OUT, "w"))
names = sorted({k for b in per for k in b})
for a in names:
    vs = [torch.tensor(b[a]).flatten() for b in per if a in b]
    cos = [_cos(vs[i], vs[j]) for i in range(len(vs)) for j in range(i + 1, len(vs))]
    m = torch.stack(vs).mean(0).view(L, L); se = torch.stack(vs).std(0).view(L, L) / len(vs) ** 0.5
    snr = (m.abs() / se.clamp_min(1e-12))
    top = torch.topk((-m).flatten(), 8)  # descent direction: -grad; largest increases
    print(json.dumps({"group": a, "batches": len(vs), "within_cos_mean": round(sum(cos) / max(1, len(cos)), 4),
                      "entries_snr_gt2": int((snr > 2).sum()), "of": L * L,
                      "diag_mean_grad": round(float(m.diag().mean()), 6), "offdiag_abs_mean": round(float((m - torch.diag(m.diag())).abs().mean()), 6),
                      "top_increase (reader, source, -grad, snr)": [(int(i) // L, int(i) % L, round(float(v), 6), round(float(snr.flatten()[i]), 1)) for v, i in zip(top.values, top.indices)]}), flush=True)
