"""Checks on the repository itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_two_tracked_paths_differ_only_in_case():
    """A clone on macOS or Windows (case-insensitive file systems) would silently keep one of the two."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    paths = {"/".join(f.split("/")[: i + 1]) for f in files if f for i in range(f.count("/") + 1)}
    seen: dict[str, list[str]] = {}
    for p in sorted(paths):
        seen.setdefault(p.lower(), []).append(p)
    clashes = [v for v in seen.values() if len(v) > 1]
    assert not clashes, f"rename one of each: {clashes}"
