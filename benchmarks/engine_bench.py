"""Engine cost benchmark on the embedded default model (issue 2 targets).

Run (CPU, offline):

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.engine_bench --out benchmarks/results/engine_cpu.md
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.engine_bench --dtype float32 --out benchmarks/results/engine_cpu_float32.md

(``--dtype float32`` is what a CPU without native bf16 runs.)

Prints and writes a markdown table:
- internalize time per 512-token chunk (hypernetwork forward incl. the encoder pass) vs one plain
  prefill of the same tokens            (target: <= 1.5x), and how it splits between the base model's pass and the
  hypernetwork
- query latency with an adapter applied (per-row hooks, and merged) vs without  (target: <= 1.15x)
- adapter bytes vs the KV-cache bytes of the chunk                               (target: <= 0.1x)

Timing does not depend on whether the hypernetwork is trained; when no checkpoint ships for the
default model, a randomly initialised hypernetwork of the shipped size is timed and the table says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- settings
CHUNK_TOKENS = 512
NEW_TOKENS = 32
REPEATS = 5
THREADS = 2
# -----------------------------------------------------------------------------


def median_time(fn, repeats: int | None = None) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats or REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto",
                        help='the base model\'s dtype: "auto" (bf16 where the CPU has it natively), "float32" (a laptop without it), "bfloat16"')
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    from d2l_integrations.engine.apply import merged_adapter
    from d2l_integrations.engine.config import HypernetworkConfig
    from d2l_integrations.engine.engine import D2LEngine
    from d2l_integrations.engine.hypernetwork import Hypernetwork, HypernetworkInternalizer, encode_context

    engine = D2LEngine.default(device=args.device, dtype=args.dtype)
    base = engine.base
    trained = engine.hypernetwork is not None
    if trained:
        internalizer = engine.hypernetwork
    else:
        config = HypernetworkConfig(
            num_layers=base.num_layers,
            hidden_size=base.hidden_size,
            module_dims=base.module_dims(["down_proj"]),
            latent_size=256,
            num_blocks=3,
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
            base_model=base.name,
        )
        internalizer = HypernetworkInternalizer(Hypernetwork(config).to(base.dtype), checkpoint_id="untrained-timing-only")
    n_params = sum(p.numel() for p in internalizer.hypernetwork.parameters())

    text = (Path(__file__).resolve().parents[1] / "d2l_integrations" / "samples" / "zorblax_institute.md").read_text()
    ids = base.tokenizer(text * 20, add_special_tokens=False)["input_ids"][:CHUNK_TOKENS]
    chunk = base.tokenizer.decode(ids)
    input_ids = torch.tensor([ids], device=base.device)

    with torch.inference_mode():
        prefill_s = median_time(lambda: base.model(input_ids=input_ids))
    internalize_s = median_time(lambda: internalizer.internalize_chunks(base, [chunk]))
    adapter = internalizer.internalize_chunks(base, [chunk])[0]
    # where that time goes: the base model's pass over the chunk (features) vs the hypernetwork on them
    enc_ids = torch.tensor([internalizer.tokenize_chunk(base, chunk)])
    enc_mask = torch.ones_like(enc_ids)
    encoded = {}
    with torch.inference_mode():
        encoder_s = median_time(lambda: encoded.update(features=encode_context(base, enc_ids, enc_mask)))
        features = encoded["features"]
        hypernetwork_s = median_time(lambda: internalizer.hypernetwork(features, enc_mask.to(features.device)))

    question = [{"role": "user", "content": "Who founded the Zorblax Institute, and when?"}]
    kw = dict(max_new_tokens=NEW_TOKENS, stop=())

    def plain() -> None:
        g = engine.generate(question, adapters=None, **kw)
        assert g.completion_tokens > 0

    def hooked() -> None:
        engine.generate(question, adapters=adapter, **kw)

    def merged() -> None:
        with merged_adapter(base.model, adapter):
            engine.generate(question, adapters=None, **kw)

    # Greedy decoding stops at EOS at different lengths with and without an adapter, so the fair
    # comparison is a fixed number of KV-cached decode steps (same tokens, same lengths).
    from transformers import DynamicCache

    from d2l_integrations.engine.apply import use_adapters

    prompt_ids = torch.tensor([base.chat_ids(question)], device=base.device)

    @torch.inference_mode()
    def fixed_decode(adapter_arg) -> None:  # noqa: ANN001
        cache = DynamicCache(config=base.model.config)
        with use_adapters(base.model, adapter_arg):
            logits = base.model(input_ids=prompt_ids, cache=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            for _ in range(NEW_TOKENS):
                token = base.model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    fixed_plain_s = median_time(lambda: fixed_decode(None))
    fixed_hooked_s = median_time(lambda: fixed_decode(adapter))

    def fixed_merged() -> None:
        with merged_adapter(base.model, adapter):
            fixed_decode(None)

    fixed_merged_s = median_time(fixed_merged)
    plain_g = engine.generate(question, adapters=None, **kw)
    hooked_g = engine.generate(question, adapters=adapter, **kw)
    plain_s, hooked_s, merged_s = median_time(plain), median_time(hooked), median_time(merged)
    plain_tok = plain_s / max(1, plain_g.completion_tokens)
    hooked_tok = hooked_s / max(1, hooked_g.completion_tokens)
    merged_tok = merged_s / max(1, hooked_g.completion_tokens)

    cfg = base.model.config
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * CHUNK_TOKENS * torch.finfo(base.dtype).bits // 8
    adapter_doc = adapter.without_bias()
    adapter_bytes_fp32 = adapter_doc.to(dtype=torch.float32).nbytes
    adapter_bytes_bf16 = adapter_doc.to(dtype=torch.bfloat16).nbytes

    results = {
        "prefill_512_s": prefill_s,
        "internalize_512_s": internalize_s,
        "internalize_over_prefill": internalize_s / prefill_s,
        "internalize_encoder_pass_s": encoder_s,
        "internalize_hypernetwork_s": hypernetwork_s,
        "query_plain_s": plain_s,
        "query_hooked_s": hooked_s,
        "query_merged_s": merged_s,
        "per_token_plain_s": plain_tok,
        "per_token_hooked_s": hooked_tok,
        "per_token_merged_s": merged_tok,
        "hooked_over_plain_per_token": hooked_tok / plain_tok,
        "merged_over_plain_per_token": merged_tok / plain_tok,
        "fixed_decode_plain_s": fixed_plain_s,
        "fixed_decode_hooked_s": fixed_hooked_s,
        "fixed_decode_merged_s": fixed_merged_s,
        "fixed_hooked_over_plain": fixed_hooked_s / fixed_plain_s,
        "kv_bytes_512": kv_bytes,
        "adapter_bytes_fp32": adapter_bytes_fp32,
        "adapter_bytes_bf16": adapter_bytes_bf16,
        "adapter_over_kv_bf16": adapter_bytes_bf16 / kv_bytes,
    }
    rows = [
        ("hypernetwork", f"{'trained checkpoint' if trained else 'UNTRAINED, random init (timing only)'}, {n_params / 1e6:.1f} M params"),
        ("device / dtype / threads", f"{base.device} / {base.dtype} / {torch.get_num_threads()}"),
        ("plain prefill, 512 tokens", f"{prefill_s * 1e3:.0f} ms"),
        ("internalize one 512-token chunk (encoder + hypernetwork)", f"{internalize_s * 1e3:.0f} ms = {internalize_s / prefill_s:.2f}x prefill (target <= 1.5x)"),
        ("of which: the base model's pass over the chunk / the hypernetwork", f"{encoder_s * 1e3:.0f} ms / {hypernetwork_s * 1e3:.0f} ms"),
        (f"query, {NEW_TOKENS} new tokens max, no adapter", f"{plain_s * 1e3:.0f} ms ({plain_g.completion_tokens} tokens, {plain_tok * 1e3:.1f} ms/token)"),
        ("query with adapter (per-row hooks)", f"{hooked_s * 1e3:.0f} ms ({hooked_g.completion_tokens} tokens, {hooked_tok * 1e3:.1f} ms/token; lengths differ, see the fixed-step rows)"),
        (f"fixed {NEW_TOKENS} decode steps (prompt + {NEW_TOKENS} KV-cached steps), no adapter", f"{fixed_plain_s * 1e3:.0f} ms"),
        ("same, adapter via per-row hooks", f"{fixed_hooked_s * 1e3:.0f} ms = {fixed_hooked_s / fixed_plain_s:.2f}x (target <= 1.15x)"),
        ("same, adapter merged into weights (incl. merge + restore)", f"{fixed_merged_s * 1e3:.0f} ms = {fixed_merged_s / fixed_plain_s:.2f}x"),
        ("query with adapter merged into weights", f"{merged_s * 1e3:.0f} ms ({merged_tok * 1e3:.1f} ms/token = {merged_tok / plain_tok:.2f}x)"),
        ("KV cache of the 512-token chunk", f"{kv_bytes / 1e6:.2f} MB ({base.dtype})"),
        ("adapter (rank 8, bias LoRA excluded)", f"{adapter_bytes_bf16 / 1e6:.2f} MB bf16 = {adapter_bytes_bf16 / kv_bytes:.3f}x KV (target <= 0.1x); {adapter_bytes_fp32 / 1e6:.2f} MB fp32"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        dtype = "" if args.dtype == "auto" else f" --dtype {args.dtype}"
        cmd = f"HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.engine_bench{dtype} --out {args.out}"
        args.out.write_text(f"# Engine cost on {base.name}\n\nCommand: `{cmd}`\n\n{table}\n\n```json\n{json.dumps(results, indent=2)}\n```\n")
    return results


if __name__ == "__main__":
    main()
