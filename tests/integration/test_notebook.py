"""Execute notebooks/rag_vs_d2l.ipynb on the tiny suite so it never rots (real default model, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "rag_vs_d2l.ipynb"


@pytest.mark.slow
def test_rag_vs_d2l_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("D2L_NOTEBOOK_SUITE", "tiny")
    monkeypatch.setenv("D2L_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # IPC (unix sockets) instead of TCP: the test suite runs with --disable-socket --allow-unix-socket
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    client = nbclient.NotebookClient(nb, km=km, timeout=900, resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "internalizer" in outputs
    for name in ("rows.jsonl", "summary.json", "results.md"):
        assert (tmp_path / "run" / name).exists()
    assert sorted(p.name for p in (tmp_path / "run" / "plots").glob("*.png"))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
