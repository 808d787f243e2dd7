"""benchmarks/device/split_ckpt.sh + stage.sh: a checkpoint staged in two halves comes back byte for byte.

Since session 20 a whole checkpoint plus the tracked tree passes the 64 MiB a device call may carry, so a checkpoint to
continue from travels in two calls. A half lost or mangled on the way must stop the staging, not start a run from a
broken file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SPLIT = ROOT / "benchmarks" / "device" / "split_ckpt.sh"
STAGE = ROOT / "benchmarks" / "device" / "stage.sh"


def make_halves(tmp_path: Path, size: int = 100_001) -> tuple[Path, bytes]:
    """A fake checkpoint under ``tmp_path/.stage/ckpt_x``, split; returns the work folder and the weights' bytes."""
    for tool in ("split", "sha256sum"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (coreutils)")
    ckpt = tmp_path / ".stage" / "ckpt_x"
    ckpt.mkdir(parents=True)
    weights = os.urandom(size)
    (ckpt / "hypernetwork.safetensors").write_bytes(weights)
    (ckpt / "config.json").write_text('{"format": "fake"}')
    subprocess.run(["bash", str(SPLIT), str(ckpt)], check=True, capture_output=True)
    return tmp_path, weights


def stage(work: Path, part: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CKPT_ROOT": str(work / "ckpt")}
    return subprocess.run(["bash", str(STAGE), part], cwd=work, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("order", [("ckpt_x.0", "ckpt_x.1"), ("ckpt_x.1", "ckpt_x.0")])
def test_halves_in_either_order_rebuild_the_checkpoint(tmp_path: Path, order: tuple[str, str]) -> None:
    work, weights = make_halves(tmp_path)
    assert (work / ".stage" / "ckpt_x.0" / "hypernetwork.safetensors.part00").stat().st_size < len(weights)
    first = stage(work, order[0])
    assert first.returncode == 0, first.stderr
    assert not (work / "ckpt" / "x" / "hypernetwork.safetensors").exists()  # one half is not a checkpoint
    second = stage(work, order[1])
    assert second.returncode == 0, second.stderr
    out = work / "ckpt" / "x"
    assert (out / "hypernetwork.safetensors").read_bytes() == weights
    assert (out / "config.json").read_text() == '{"format": "fake"}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "hypernetwork.safetensors"]


def test_a_mangled_half_fails_the_staging(tmp_path: Path) -> None:
    work, _ = make_halves(tmp_path)
    half = work / ".stage" / "ckpt_x.1" / "hypernetwork.safetensors.part01"
    data = bytearray(half.read_bytes())
    data[10] ^= 0xFF
    half.write_bytes(bytes(data))
    assert stage(work, "ckpt_x.0").returncode == 0
    result = stage(work, "ckpt_x.1")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_split_refuses_a_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "ckpt_y").mkdir()
    result = subprocess.run(["bash", str(SPLIT), str(tmp_path / "ckpt_y")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "no config.json + hypernetwork.safetensors" in result.stderr
