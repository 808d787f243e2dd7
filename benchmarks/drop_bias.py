"""Write a copy of a hypernetwork checkpoint without its document-independent bias LoRA.

Session 16: a run trained with ``--bias-dropout 0.5`` (half its steps without the bias) made a document's adapter that
carries the document on its own (teacher-forced ``doc_only`` KL at or below ``matched``), while the bias still costs
real-word answers. The copy has ``use_bias_lora = False``, so every evaluation condition (``d2l``, ``mismatched``,
``bias_only`` = no adapter) and the product (``D2LEngine``) use the document's adapter alone, and the mismatched
control stays a true control of that adapter.

    python -m benchmarks.drop_bias SRC DST
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from safetensors.torch import load_file

from d2l_integrations.engine.checkpoint import WEIGHTS_NAME, read_checkpoint_config, save_checkpoint
from d2l_integrations.engine.hypernetwork import Hypernetwork

BIAS_PREFIXES = ("bias_A.", "bias_B.")


def drop_bias(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Save ``src``'s hypernetwork without the bias LoRA into ``dst``; returns ``dst``."""
    config, metadata = read_checkpoint_config(src)
    if not config.use_bias_lora:
        msg = f"Checkpoint {str(src)!r} has no bias LoRA to drop; use it as it is."
        raise ValueError(msg)
    state = {k: v for k, v in load_file(str(Path(src) / WEIGHTS_NAME)).items() if not k.startswith(BIAS_PREFIXES)}
    dtype = next(iter(state.values())).dtype  # shipped checkpoints are bf16: keep the copy's size
    hypernetwork = Hypernetwork(dataclasses.replace(config, use_bias_lora=False)).to(dtype)
    hypernetwork.load_state_dict(state, strict=True)
    summary = dict(metadata.get("data_summary") or {})
    summary["derived"] = {"from": metadata.get("checkpoint_id"), "change": "bias LoRA removed (benchmarks/drop_bias.py)"}
    return save_checkpoint(hypernetwork, dst, data_summary=summary, source=metadata.get("source"), overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint folder (config.json + hypernetwork.safetensors)")
    parser.add_argument("dst", help="new folder for the copy without the bias LoRA")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = parser.parse_args(argv)
    out = drop_bias(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {out} ({read_checkpoint_config(out)[1]['checkpoint_id']})")


if __name__ == "__main__":
    main()
