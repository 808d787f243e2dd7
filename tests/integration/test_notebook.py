"""Execute the notebooks so they never rot (real default model, CPU, offline).

notebooks/rag_vs_d2l.ipynb runs on the tiny suite; notebooks/agent_memory.ipynb runs as committed
(about a minute on 2 CPU cores) and checks its own results with asserts (e.g. a forgotten fact is
no longer answered).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"


def execute_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``notebooks/<name>`` top to bottom in a fresh kernel; return the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # IPC (unix sockets) instead of TCP: the test suite runs with --disable-socket --allow-unix-socket
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    client = nbclient.NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    return nb


def outputs_text(nb: Any) -> str:
    return "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )


@pytest.mark.slow
def test_rag_vs_d2l_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from d2l_integrations.engine.training_data import data_dir

    if not (data_dir() / "magic_number_niah").is_dir():
        pytest.skip("the notebook's benchmark data is not available (set D2L_DATA_DIR or put ../shared/data beside the checkout)")
    monkeypatch.setenv("D2L_NOTEBOOK_SUITE", "tiny")
    monkeypatch.setenv("D2L_NOTEBOOK_OUT", str(tmp_path / "run"))
    nb = execute_notebook("rag_vs_d2l.ipynb", tmp_path, monkeypatch)
    assert "internalizer" in outputs_text(nb)
    for name in ("rows.jsonl", "summary.json", "results.md"):
        assert (tmp_path / "run" / name).exists()
    assert sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png"))


@pytest.mark.slow
def test_agent_memory_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's knowledge base goes to a temp folder
    nb = execute_notebook("agent_memory.ipynb", tmp_path, monkeypatch)
    text = outputs_text(nb)
    for tool in ("remember(", "recall(", "forget("):
        assert tool in text
    assert "after forget:" in text and "'route': 'base'" in text
    assert not list(tmp_path.glob("agent_memory_*"))  # the notebook removed its store
