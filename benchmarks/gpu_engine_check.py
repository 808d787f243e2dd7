"""The product path on a GPU: ``D2LEngine`` on CUDA, ``method="auto"`` against ``"hypernetwork"``.

With the shipped checkpoint (``prefer_over_distill: {"cpu": true, "cuda": false}``) ``auto`` takes
``distill`` with ``DistillConfig.gpu()`` on CUDA. This internalizes 4 made-up-fact documents one at a
time (a lone chunk per call, as ``chat.internalize(text)`` does), answers their 5 questions each with
the document's adapter, and prints seconds per document and answers containing the gold fact.
Seed 555 is neither distill_curve's dev (1000) nor eval (0) seed.

Run on the device (GGUF staged at /root/stage/smol.gguf):
    PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 python3 -u -m benchmarks.gpu_engine_check
"""

import json
import time

import torch

from benchmarks.run import build_engine
from d2l_integrations.engine.synthetic import make_fact_documents


def main() -> None:
    eng = build_engine("/root/stage", "smol.gguf", device="cuda")
    auto = eng.internalizer("auto")
    print(json.dumps({"device": str(eng.base.device), "gpu": torch.cuda.get_device_name(0), "auto": auto.name,
                      "auto_config": auto.config.to_dict() if hasattr(auto, "config") else None}), flush=True)
    docs = make_fact_documents(4, seed=555)
    for method in ("auto", "hypernetwork"):
        t0 = time.time()
        adapters = [eng.internalize(d.text, method=method, activate=False) for d in docs]
        t_int = time.time() - t0
        hits, n = 0, 0
        for d, a in zip(docs, adapters, strict=True):
            for q in d.questions:
                g = eng.generate([{"role": "user", "content": q.question}], adapters=a, max_new_tokens=24)
                hits += q.answer.lower() in g.text.lower()
                n += 1
        print(json.dumps({"method": method, "internalize_s_per_doc": round(t_int / len(docs), 2), "contains": f"{hits}/{n}",
                          "ranks": sorted({a.rank for a in adapters}) if hasattr(adapters[0], "rank") else None}), flush=True)


if __name__ == "__main__":
    main()
