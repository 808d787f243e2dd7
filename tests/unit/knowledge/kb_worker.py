"""A separate process that uses a knowledge base, for the multi-process tests.

    python -m tests.unit.knowledge.kb_worker add STORE FILE... [--delay S] [--batch-size N]
    python -m tests.unit.knowledge.kb_worker add-texts STORE PREFIX N [--barrier DIR --parties 2]
    python -m tests.unit.knowledge.kb_worker stream FILE [--chunks N]   # stream a big file, report peak RSS

Prints one JSON line on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path


def fact(prefix: str, i: int) -> str:
    """A text with a unique, searchable fact."""
    return (
        f"Record {prefix}-{i}. The vault keeper of sector {prefix}{i} is named Keeper{prefix.upper()}{i}. "
        f"Sector {prefix}{i} stores {i * 13} crates of {prefix} amber, counted every {i + 2} days."
    )


def _rss_kb(field: str) -> int:
    """``VmRSS``/``VmHWM`` (peak) of this process in kB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    """Make the peak (VmHWM) equal the current RSS (Linux >= 4.0), so imports do not mask later growth."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_add = sub.add_parser("add")
    p_add.add_argument("store")
    p_add.add_argument("files", nargs="+")
    p_add.add_argument("--delay", type=float, default=0.0)
    p_add.add_argument("--batch-size", type=int, default=32)
    p_texts = sub.add_parser("add-texts")
    p_texts.add_argument("store")
    p_texts.add_argument("prefix")
    p_texts.add_argument("n", type=int)
    p_texts.add_argument("--barrier", default=None, help="folder: wait until --parties workers are ready")
    p_texts.add_argument("--parties", type=int, default=2)
    p_stream = sub.add_parser("stream")
    p_stream.add_argument("file")
    p_stream.add_argument("--chunks", type=int, default=300)
    args = parser.parse_args(argv)

    if args.cmd == "stream":
        from transformers import AutoTokenizer

        from d2l_integrations.knowledge.embeddings import default_model_path
        from d2l_integrations.knowledge.ingestion import Chunker, load_source

        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        chunker = Chunker(tokenizer, chunk_tokens=384, overlap_tokens=32)
        chunker.count_tokens("warm up")
        _reset_peak_rss()
        before = _rss_kb("VmRSS")
        elements = sum(1 for _ in load_source(Path(args.file)).elements)  # the whole file, streamed
        chunks = 0
        for _ in chunker.chunk(load_source(Path(args.file))):  # lazy: stop early
            chunks += 1
            if chunks == args.chunks:
                break
        after = _rss_kb("VmHWM")
        print(json.dumps({"elements": elements, "chunks": chunks, "rss_before_kb": before, "rss_after_kb": after}))
        return 0

    from d2l_integrations.knowledge import KnowledgeBase
    from tests.tiny_models import make_tiny_base, tiny_engine

    if args.cmd == "add":
        engine = tiny_engine(base=make_tiny_base(), delay_s=args.delay)
        kb = KnowledgeBase(args.store, engine, chunk_tokens=64, overlap_tokens=8, batch_size=args.batch_size)
        ids = []
        for f in args.files:
            ids += kb.add(Path(f), progress=False)
            print(json.dumps({"added": ids[-1]}), flush=True)
    else:
        engine = tiny_engine(base=make_tiny_base(), delay_s=0.05)
        kb = KnowledgeBase(args.store, engine, chunk_tokens=64, overlap_tokens=8)
        if args.barrier:  # start adding at the same moment as the other worker(s)
            barrier = Path(args.barrier)
            (barrier / f"{args.prefix}.ready").touch()
            deadline = time.monotonic() + 180
            while len(list(barrier.glob("*.ready"))) < args.parties:
                if time.monotonic() > deadline:
                    raise TimeoutError("the other worker never got ready")
                time.sleep(0.01)
        ids, times = [], []
        for i in range(args.n):
            ids += kb.add(fact(args.prefix, i), doc_id=f"{args.prefix}-{i}", progress=False)
            times.append(time.time())
        kb.close()
        print(json.dumps({"ids": ids, "times": times}), flush=True)
        return 0
    kb.close()
    print(json.dumps({"ids": ids}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
