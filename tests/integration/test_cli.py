"""The ``d2l`` command line end to end on the real default model (SmolLM2-135M + the shipped hypernetwork), CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/test_cli.py -q    # ~5 min on 2 busy cores

The commands run in-process through typer's ``CliRunner``. The base model loads once for the module:
the first ``_engine`` call goes through the real loader, later calls reuse its engine.
"""

from __future__ import annotations

import gc
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from d2l_integrations import cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

WIDE = {"COLUMNS": "400"}  # rich wraps at 80 columns when stdout is not a terminal; keep doc ids on one line
FACT = (
    "# The Quillon Observatory\n\n"
    "The Quillon Observatory stands on Mount Ferrow. It was founded in 1931 by the astronomer Tavi Ormsby.\n"
    "Its largest telescope is called the Bright Lantern.\n"
)


@pytest.fixture(scope="module", autouse=True)
def shared_engine() -> Iterator[None]:
    """Load the default engine once (through the CLI's own loader) and hand it to every later command."""
    real = cli._engine
    cache: dict[tuple[str, Path | None], Any] = {}

    def _engine(base_model: str, checkpoint: Path | None) -> Any:
        if (base_model, checkpoint) not in cache:
            cache[(base_model, checkpoint)] = real(base_model, checkpoint)
        return cache[(base_model, checkpoint)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_engine", _engine)
        yield


def _d2l(*args: str) -> Any:
    gc.collect()  # let the previous command's KnowledgeBase go before the next one opens the store
    result = CliRunner().invoke(cli.app, ["--device", "cpu", *args], env=WIDE)
    assert "Traceback" not in result.output, result.output
    return result


def _ok(*args: str) -> Any:
    result = _d2l(*args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


def test_ingest_list_ask_export_delete(tmp_path: Path) -> None:
    from peft import PeftConfig

    doc = tmp_path / "quillon.md"
    doc.write_text(FACT)
    doc_id = str(doc.resolve())
    store = str(tmp_path / "kb")

    added = _ok("ingest", str(doc), "--store", store)
    assert "Added 1 document(s); the store holds 1." in added.stdout

    listed = _ok("list", "--store", store)
    assert doc_id in listed.stdout

    # 64 tokens: in bf16 the model first restates where the observatory stands, and 32 tokens cut the name in half
    asked = _ok("ask", "Who founded the Quillon Observatory?", "--store", store, "--route", "rag", "--json",
                "--max-new-tokens", "64")
    payload = json.loads(asked.stdout)  # nothing but the JSON on stdout
    assert payload["decision"]["route"] == "rag"
    assert "Ormsby" in payload["answer"], payload["answer"]
    assert payload["usage"]["prompt_tokens"] > 0

    out = tmp_path / "quillon-peft"
    exported = _ok("export", doc_id, "--store", store, "--out", str(out))
    assert "Wrote a PEFT LoRA folder" in exported.stdout
    config = PeftConfig.from_pretrained(str(out))
    assert config.peft_type == "LORA"
    assert (out / "adapter_model.safetensors").is_file()

    again = _d2l("export", doc_id, "--store", store, "--out", str(out))  # the folder is not empty now
    assert again.exit_code == 2, again.output
    assert len(again.stderr.strip().splitlines()) == 1 and "not empty" in again.stderr

    deleted = _ok("delete", doc_id, "--store", store)
    assert f"Deleted {doc_id}." in deleted.stdout
    assert doc_id not in _ok("list", "--store", store).stdout


class _FirstQuestionOnly:
    """Stands in for ``cli.json``: the demo reads only its first question (json.loads of questions.json)."""

    dumps = staticmethod(json.dumps)

    @staticmethod
    def loads(text: str) -> Any:
        return json.loads(text)[:1]


def test_demo_builds_then_reuses_then_rebuilds_an_outdated_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from d2l_integrations.knowledge.adapter_store import internalizer_key

    store = tmp_path / "demo-kb"
    # the samples as an older version stored them: keyed by their path in another install
    other_install = tmp_path / "other-install" / "samples"
    other_install.mkdir(parents=True)
    for sample in sorted(p for p in cli.SAMPLES.iterdir() if p.suffix in (".md", ".txt", ".html") and p.name != "README.md"):
        (other_install / sample.name).write_bytes(sample.read_bytes())
    _ok("ingest", *map(str, sorted(other_install.iterdir())), "--store", str(store))

    first = _ok("demo", "--store", str(store), "--routes", "d2l,rag")  # the README's main job, in full
    assert "Summary" in first.stdout and "mean latency" in first.stdout
    assert "Ingested 3 documents" in first.stdout and "skipped=0" in first.stdout  # the samples once, not twice
    assert "sample:vellamy_bakery.html" in _ok("list", "--store", str(store)).stdout
    assert "/6" in first.stdout  # "<correct>/6" per route

    # A second run reuses the store: nothing is parsed or internalized again (one question, rag, to keep it short).
    monkeypatch.setattr(cli, "json", _FirstQuestionOnly)
    second = _ok("demo", "--store", str(store), "--routes", "rag", "--max-new-tokens", "16")
    assert "skipped=3" in second.stdout and "internalized=0" in second.stdout, second.stdout
    assert "Summary" in second.stdout and "/1" in second.stdout

    # Make it a store of an older checkpoint (a package upgrade): manifest identity and adapter folder renamed.
    gc.collect()
    catalog = store / "catalog.sqlite"
    with sqlite3.connect(catalog) as db:
        current = db.execute("SELECT value FROM manifest WHERE key = 'internalizer'").fetchone()[0]
        db.execute("UPDATE manifest SET value = 'hypernetwork-older-checkpoint' WHERE key = 'internalizer'")
    db.close()
    adapters = store / "adapters"
    old_folder = adapters / internalizer_key("hypernetwork-older-checkpoint")
    (adapters / internalizer_key(current)).rename(old_folder)
    num_adapters = len(list(old_folder.iterdir()))
    assert num_adapters >= 3

    # The demo rebuilds its adapters with the current checkpoint instead of refusing the store.
    third = _ok("demo", "--store", str(store), "--routes", "rag", "--max-new-tokens", "16")
    assert "Summary" in third.stdout and "skipped=3" in third.stdout
    assert "Re-internalizing" in caplog.text
    with sqlite3.connect(catalog) as db:
        assert db.execute("SELECT value FROM manifest WHERE key = 'internalizer'").fetchone()[0] == current
    db.close()
    assert not old_folder.exists()
    assert len(list((adapters / internalizer_key(current)).iterdir())) == num_adapters
