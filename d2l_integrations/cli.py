"""The ``d2l`` command line.

    d2l demo                       # ingest the shipped sample documents, ask through d2l / rag / auto
    d2l ingest notes.md report.pdf --store ./kb
    d2l ask "Who founded Zorblax?" --store ./kb --route auto
    d2l export zorblax --store ./kb --out ./zorblax-peft
    d2l bench --suite quick        # from a source checkout
    d2l train --help

Errors print one line (no traceback) and exit with code 2 for bad input, 1 otherwise; pass
``--debug`` for the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from d2l_integrations.errors import D2LError

app = typer.Typer(
    name="d2l",
    help="Doc-to-LoRA parametric document memory: internalize documents into LoRA adapters, answer with or without RAG.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, also when piped to a log
SAMPLES = Path(__file__).resolve().parent / "samples"
ROUTES = ("d2l", "rag", "hybrid", "full_context", "auto")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _State:
    debug: bool = False
    device: str | None = None


STATE = _State()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda when available).")] = None,
) -> None:
    STATE.debug, STATE.device = debug, device
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover - transformers is a hard dependency
            pass


def _handle_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/yellow] Work finished so far is kept.")
            raise typer.Exit(130) from None
        except D2LError as exc:
            if STATE.debug:
                raise
            err_console.print(f"[bold red]Error ({type(exc).__name__}):[/bold red] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if STATE.debug:
                raise
            err_console.print(f"[bold red]Unexpected error ({type(exc).__name__}):[/bold red] {escape(str(exc))}\nRerun with --debug for the traceback.")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _fail(message: str) -> typer.Exit:
    """Print a one-line bad-input error (``message`` is plain text, not rich markup); return Exit(2) to raise."""
    err_console.print(f"[bold red]Error:[/bold red] {escape(message)}")
    return typer.Exit(2)


def _require_store(store: Path) -> None:
    if not store.exists():
        raise _fail(f"no knowledge base at {store}. Create one with `d2l ingest FILES --store {store}`.")


def _engine(base_model: str, checkpoint: Path | None) -> Any:
    from d2l_integrations.engine.engine import D2LEngine

    with console.status(f"Loading base model {base_model!r} (first use of the default converts its GGUF, ~20 s)..."):
        if base_model == "default" and checkpoint is None:
            return D2LEngine.default(device=STATE.device)
        return D2LEngine.from_pretrained(base_model, checkpoint, device=STATE.device)


def _describe_internalizer(engine: Any, method: str) -> str:
    internalizer = engine.internalizer(method)
    if internalizer.name == "hypernetwork":
        return f"hypernetwork (checkpoint {internalizer.checkpoint_id})"
    if internalizer.name == "refine":
        return f"refine (hypernetwork {internalizer.hypernetwork.checkpoint_id}, then distillation on top of its adapter)"
    if getattr(engine, "hypernetwork", None) is None:
        return "distill (per-chunk context distillation; no trained hypernetwork checkpoint is loaded for this base model)"
    return "distill (per-chunk context distillation; the loaded hypernetwork is not preferred for this device)"


def _contains(text: str, answers: Sequence[str]) -> bool:
    low = text.lower()
    return any(a.lower() in low for a in answers)


# ---------------------------------------------------------------------------------------- demo
@app.command()
@_handle_errors
def demo(
    store: Annotated[Path | None, typer.Option(help="Knowledge-base folder (default: a cache folder reused across runs).")] = None,
    fresh: Annotated[bool, typer.Option(help="Rebuild the demo store from scratch.")] = False,
    method: Annotated[str, typer.Option(help="Internalizer: auto, hypernetwork, distill or refine (hypernetwork + distillation on top).")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit.")] = 40,
    routes: Annotated[str, typer.Option(help="Comma-separated routes to compare.")] = "d2l,rag,auto",
) -> None:
    """Ingest the shipped sample documents, internalize them, and compare answers through d2l, rag and auto."""
    import shutil

    from d2l_integrations.engine.base_model import cache_dir
    from d2l_integrations.knowledge import KnowledgeBase
    from d2l_integrations.routing import Router

    chosen = [r.strip() for r in routes.split(",") if r.strip()]
    bad = [r for r in chosen if r not in ROUTES]
    if bad:
        raise _fail(f"unknown route(s) {bad}. Choose from {list(ROUTES)}.")
    store = store or cache_dir() / "demo-kb"
    if fresh and store.exists():
        shutil.rmtree(store)
    t_start = time.perf_counter()
    engine = _engine("default", None)
    console.print(f"[bold]Base model:[/bold] {engine.base.name} ({engine.base.dtype}, {engine.base.device})")
    console.print(f"[bold]Internalizer:[/bold] {_describe_internalizer(engine, method)}")
    questions = json.loads((SAMPLES / "questions.json").read_text())
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".md", ".txt", ".html") and p.name != "README.md")
    console.print(f"[bold]Documents:[/bold] {', '.join(p.name for p in paths)} -> store {store}")
    # the demo's own store: adapters made by an older checkpoint (a package upgrade) are rebuilt, not refused
    kb = KnowledgeBase(store, engine, method=method, reinternalize=True)
    # samples are keyed by file name, not by their path inside this install, so the cache-folder store holds them
    # once whichever checkout or virtual environment runs the demo; copies that older versions keyed by path go
    ids = [f"sample:{p.name}" for p in paths]
    for info in kb.list():
        if info.doc_id not in ids and Path(info.source).parent.name == SAMPLES.name and Path(info.source).name in {p.name for p in paths}:
            kb.delete(info.doc_id)
    t0 = time.perf_counter()
    kb.add(paths, doc_id=ids, progress=True)
    internalize_s = time.perf_counter() - t0
    stats = kb.last_add_stats
    console.print(f"Ingested {len(kb)} documents in {internalize_s:.1f} s ({stats})")
    router = Router(engine, kb)

    table = Table(title="Answers (✓ = the expected answer appears)", show_lines=True)
    table.add_column("question", max_width=34)
    table.add_column("expected", max_width=14)
    for route in chosen:
        table.add_column(route, max_width=40)
    totals: dict[str, dict[str, float]] = {r: {"correct": 0, "latency": 0.0, "prompt": 0, "saved": 0} for r in chosen}
    for q in questions:
        cells = []
        for route in chosen:
            answer = router.answer([{"role": "user", "content": q["question"]}], route=route, max_new_tokens=max_new_tokens)
            ok = _contains(answer.text, q["answers"])
            t = totals[route]
            t["correct"] += ok
            t["latency"] += answer.timings.get("total_s", 0.0)
            t["prompt"] += answer.usage.prompt_tokens
            t["saved"] += answer.usage.prompt_tokens_saved
            route_note = f" [dim]({answer.decision.route})[/dim]" if route == "auto" else ""
            latency = answer.timings.get("total_s", 0.0)
            cells.append(
                f"{'[green]✓[/green]' if ok else '[red]✗[/red]'} {answer.text.strip()[:160]}{route_note}\n"
                f"[dim]{latency:.1f} s, {answer.usage.prompt_tokens} prompt tok[/dim]"
            )
        table.add_row(q["question"], " / ".join(q["answers"][:1]), *cells)
    console.print(table)

    summary = Table(title="Summary")
    for col in ("route", "correct", "mean latency", "mean prompt tokens", "prompt tokens saved vs full context"):
        summary.add_column(col)
    n = len(questions)
    for route in chosen:
        t = totals[route]
        summary.add_row(route, f"{int(t['correct'])}/{n}", f"{t['latency'] / n:.2f} s", f"{t['prompt'] / n:.0f}", f"{t['saved'] / n:.0f}")
    console.print(summary)
    console.print(
        f"One-off internalization: {internalize_s:.1f} s for {len(kb)} documents (reused on the next run). "
        f"Total demo time {time.perf_counter() - t_start:.1f} s."
    )


# ---------------------------------------------------------------------------------------- ingest / ask
@app.command()
@_handle_errors
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files to add (.txt .md .html .pdf .docx).")],
    store: Annotated[Path, typer.Option(help="Knowledge-base folder.")],
    method: Annotated[str, typer.Option(help="Internalizer: auto, hypernetwork, distill or refine (hypernetwork + distillation on top).")] = "auto",
    lazy: Annotated[bool, typer.Option(help="Internalize chunks on first use instead of now.")] = False,
    chroma_url: Annotated[str | None, typer.Option(help="http://host:port of a Chroma server (default: embedded).")] = None,
    base_model: Annotated[str, typer.Option(help="'default', a Hugging Face id, a folder or a .gguf.")] = "default",
    checkpoint: Annotated[Path | None, typer.Option(help="Hypernetwork checkpoint folder or SakanaAI pytorch_model.bin.")] = None,
) -> None:
    """Parse, chunk, embed and internalize files into a knowledge base."""
    from d2l_integrations.knowledge import KnowledgeBase

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _fail(f"no such file(s): {missing}. Nothing was added.")
    engine = _engine(base_model, checkpoint)
    kb = KnowledgeBase(store, engine, method=method, lazy=lazy, chroma_url=chroma_url)
    ids = kb.add(paths)
    console.print(f"Added {len(ids)} document(s); the store holds {len(kb)}. {kb.last_add_stats}")


@app.command()
@_handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    store: Annotated[Path, typer.Option(help="Knowledge-base folder.")],
    route: Annotated[str, typer.Option(help="auto, d2l, rag, hybrid or full_context.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer, route and costs as JSON.")] = False,
    chroma_url: Annotated[str | None, typer.Option(help="http://host:port of a Chroma server.")] = None,
    base_model: Annotated[str, typer.Option()] = "default",
    checkpoint: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Answer a question from a knowledge base, on the route the router picks (or the one you force)."""
    from d2l_integrations.knowledge import KnowledgeBase
    from d2l_integrations.routing import Router
    from d2l_integrations.routing.decision import parse_route

    parse_route(route)  # a bad --route fails here, before the model loads
    _require_store(store)
    engine = _engine(base_model, checkpoint)
    kb = KnowledgeBase(store, engine, chroma_url=chroma_url)
    answer = Router(engine, kb).answer([{"role": "user", "content": question}], route=route, max_new_tokens=max_new_tokens)
    if as_json:
        print(json.dumps({"answer": answer.text, "decision": answer.decision.to_dict(), "usage": vars(answer.usage) if hasattr(answer.usage, "__dict__") else str(answer.usage), "timings": dict(answer.timings)}, indent=2, default=str))  # noqa: T201
        return
    console.print(answer.text.strip())
    console.print(f"[dim]route={answer.decision.route} ({answer.decision.reason}); prompt tokens {answer.usage.prompt_tokens}, "
                  f"saved {answer.usage.prompt_tokens_saved}; {answer.timings.get('total_s', 0.0):.2f} s[/dim]")


@app.command(name="list")
@_handle_errors
def list_documents(store: Annotated[Path, typer.Option(help="Knowledge-base folder.")]) -> None:
    """List the documents of a knowledge base."""
    from d2l_integrations.knowledge import KnowledgeBase

    _require_store(store)
    kb = KnowledgeBase(store, None)
    table = Table()
    for col in ("doc_id", "chunks", "source"):
        table.add_column(col)
    for info in kb.list():
        table.add_row(str(info.doc_id), str(getattr(info, "num_chunks", "")), str(getattr(info, "source", "")))
    console.print(table)


@app.command()
@_handle_errors
def delete(doc_id: Annotated[str, typer.Argument()], store: Annotated[Path, typer.Option()]) -> None:
    """Delete a document: its text, embeddings and adapters together."""
    from d2l_integrations.knowledge import KnowledgeBase

    _require_store(store)
    KnowledgeBase(store, None).delete(doc_id)
    console.print(f"Deleted {doc_id}.")


# ---------------------------------------------------------------------------------------- export
@app.command()
@_handle_errors
def export(
    doc_id: Annotated[str | None, typer.Argument(help="Document id in --store (see `d2l list`).")] = None,
    out: Annotated[Path, typer.Option(help="Target folder (must be new or empty).")] = Path("d2l-adapter"),
    store: Annotated[Path | None, typer.Option(help="Knowledge-base folder.")] = None,
    text_file: Annotated[Path | None, typer.Option("--text", help="Internalize this text file instead of a stored document.")] = None,
    method: Annotated[str, typer.Option()] = "auto",
    base_model: Annotated[str, typer.Option()] = "default",
    checkpoint: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Write a document's adapter as a standard PEFT LoRA folder (loads with peft.PeftModel.from_pretrained)."""
    if (doc_id is None) == (text_file is None):
        raise _fail("give either a DOC_ID with --store, or --text FILE.")
    if text_file is not None and not text_file.is_file():
        raise _fail(f"no such file: {text_file}.")
    if doc_id is not None:
        if store is None:
            raise _fail("--store is required with a DOC_ID.")
        _require_store(store)
    engine = _engine(base_model, checkpoint)
    if text_file is not None:
        adapter = engine.internalize(text_file.read_text(), method=method, activate=False)
    else:
        from d2l_integrations.knowledge import KnowledgeBase

        kb = KnowledgeBase(store, engine)
        adapter = kb.adapters_for(kb.chunks(doc_id))
    adapter.to_peft(out, base_model_name_or_path=engine.base.name)
    console.print(f"Wrote a PEFT LoRA folder to {out} (rank {adapter.rank}, {adapter.nbytes / 1e6:.1f} MB).")


# ---------------------------------------------------------------------------------------- bench / train
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
@_handle_errors
def bench(ctx: typer.Context) -> None:
    """Run the side-by-side benchmark (arguments go to `python -m benchmarks.run`; needs a source checkout)."""
    try:
        from benchmarks import run as bench_run  # its parser answers `d2l bench --help`
    except ImportError:
        err_console.print("[bold red]Error:[/bold red] `d2l bench` runs from a source checkout of d2l_integrations "
                          "(the benchmarks/ folder is not installed). cd into the checkout and retry.")
        raise typer.Exit(2) from None
    raise typer.Exit(bench_run.main(list(ctx.args)) or 0)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
@_handle_errors
def train(ctx: typer.Context) -> None:
    """Train a hypernetwork for a base model (arguments go to the trainer; `d2l train --help` lists them)."""
    from d2l_integrations.engine import training

    raise typer.Exit(training.main(list(ctx.args)) or 0)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
