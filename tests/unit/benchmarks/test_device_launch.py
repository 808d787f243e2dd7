"""benchmarks/device/launch.sh: where each run of a plan goes, on fake GPU machines (fake ``nvidia-smi`` / ``torchrun``).

A wrong placement costs device minutes that cannot be had back (session 19's first launch died before training), so
the job layout of the data-parallel plans is checked here, where it is free: which runs start, on which GPUs, with how
many ranks, and with what share of GPU memory each process may cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LAUNCH = ROOT / "benchmarks" / "device" / "launch.sh"

FAKES = {
    "nvidia-smi": """#!/usr/bin/env bash
if [ "$1" = -L ]; then for i in $(seq 0 $((FAKE_N - 1))); do echo "GPU $i: fake"; done; else echo "$FAKE_MEM"; fi
""",
    "torchrun": """#!/usr/bin/env bash
echo "GPUS=$CUDA_VISIBLE_DEVICES SHARE=${D2L_CUDA_MEMORY_FRACTION:-none} torchrun $*"
""",
    # the GGUF conversion before the runs is a silent no-op here, as it is on a machine that converted it already
    # (session 21: grep then found no line and stopped the launch); `python3 -c` arithmetic runs for real
    "python3": f"""#!/usr/bin/env bash
if [[ "$*" == *load_base_model* ]]; then :; elif [ "$1" = -c ]; then exec {sys.executable} "$@"; else echo "GPUS=$CUDA_VISIBLE_DEVICES python3 $*"; fi
""",
}


def launch(tmp_path: Path, plan: str, gpus: int, mem_mib: int, **env: str) -> dict[str, str]:
    """Run launch.sh for ``plan`` on a fake machine; returns each started run's command line (its stdout.txt)."""
    if shutil.which("setsid") is None:
        pytest.skip("launch.sh needs setsid (util-linux)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    runs = tmp_path / "runs"
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_N": str(gpus), "FAKE_MEM": str(mem_mib),
                "PLAN": plan, "MIN": "1", "FIRST_WAIT": "0", "RUNS_ROOT": str(runs), **env}
    subprocess.run(["bash", str(LAUNCH)], cwd=ROOT, env=full_env, check=True, capture_output=True, timeout=60)
    started: dict[str, str] = {}
    deadline = time.time() + 20
    while time.time() < deadline:  # the runs are started detached (setsid nohup): wait for their output
        started = {p.parent.name: p.read_text().strip() for p in runs.glob("*/stdout.txt")}
        if started and all(started.values()):
            break
        time.sleep(0.1)
    return started


def mix(line: str) -> dict[str, float]:
    """A started run's task mix, task -> weight (the last --tasks wins, as in train_d2l's argparse)."""
    tasks = line.split("--tasks ")[-1].split()[0]
    return {t.rsplit(":", 1)[0]: float(t.rsplit(":", 1)[1]) for t in tasks.split(",")}


def test_four_h200s_run_all_four_jobs_two_ranks_on_each_gpu_pair(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s21", gpus=4, mem_mib=143_771)
    assert sorted(runs) == ["s21c", "s21f", "s21fq", "s21q"]
    pairs = {name: line.split()[0] for name, line in runs.items()}
    assert pairs == {"s21c": "GPUS=0,1", "s21f": "GPUS=2,3", "s21q": "GPUS=0,1", "s21fq": "GPUS=2,3"}
    for name, line in runs.items():
        assert "SHARE=0.49" in line and "--nproc-per-node 2" in line  # two processes a GPU, each within half of it
        assert f"--work {tmp_path / 'runs' / name / 'work'}" in line and "--anneal-to-deadline" in line


def test_h100s_hold_one_process_a_gpu_so_fewer_jobs_start(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s21", gpus=4, mem_mib=81_559)
    assert sorted(runs) == ["s21c", "s21f"]  # the first two of the plan, one job a GPU pair
    assert all("SHARE=none" in line for line in runs.values())


def test_two_gpus_share_one_pair_and_jobs_caps_the_runs(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s21", gpus=2, mem_mib=143_771)
    assert sorted(runs) == ["s21c", "s21f"] and all(line.startswith("GPUS=0,1 ") for line in runs.values())
    assert sorted(launch(tmp_path / "one", "s21", gpus=4, mem_mib=143_771, JOBS="1")) == ["s21c"]


def test_an_unknown_plan_is_refused(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        launch(tmp_path, "no-such-plan", gpus=1, mem_mib=81_559)
    assert b"unknown PLAN" in err.value.stderr


def test_plan_s22_continues_s21fq_and_keeps_s21fqs_recipe_in_its_control(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s22", gpus=4, mem_mib=143_771)
    assert sorted(runs) == ["s22c", "s22n", "s22q", "s22qn"]
    assert all("--init /root/ckpt/s21fq " in line and "--anneal-to-deadline" in line for line in runs.values())

    s21fq = mix(launch(tmp_path / "s21", "s21", gpus=4, mem_mib=143_771)["s21fq"])
    assert mix(runs["s22c"]) == s21fq
    assert mix(runs["s22q"]) == {**s21fq, "squad/1-2+d1*5": 4.8}
    assert mix(runs["s22n"]) == {**s21fq, "needle_para/1-4+d1": 1.4}
    assert mix(runs["s22qn"]) == {**s21fq, "squad/1-2+d1*5": 4.8, "needle_para/1-4+d1": 1.4}
    # a 4 x H100 machine runs the first two: the control and the dose
    assert sorted(launch(tmp_path / "h100", "s22", gpus=4, mem_mib=81_559)) == ["s22c", "s22q"]


def test_extra_arguments_reach_every_run_of_the_plan(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s22", gpus=4, mem_mib=143_771, EXTRA="--compile")
    assert len(runs) == 4 and all(line.split(" --work ")[0].endswith(" --compile") for line in runs.values())
    assert not any("--compile" in line for line in launch(tmp_path / "plain", "s22", gpus=4, mem_mib=143_771).values())


def test_plan_s23_continues_s22qn_with_its_mix_as_the_control_and_adds_wiki_qa(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s23", gpus=4, mem_mib=143_771)
    assert sorted(runs) == ["s23a", "s23b", "s23c", "s23e"]
    assert all("--init /root/ckpt/s22qn " in line and "--anneal-to-deadline" in line for line in runs.values())

    s22qn = mix(launch(tmp_path / "s22", "s22", gpus=4, mem_mib=143_771)["s22qn"])
    wq = "wiki_qa/1-2+d1*3"
    assert mix(runs["s23c"]) == s22qn
    assert mix(runs["s23a"]) == {**s22qn, wq: 2.4}
    assert mix(runs["s23b"]) == {**s22qn, "wiki/1-2+d1*8": 1.8, wq: 4.8}
    assert mix(runs["s23e"]) == {**s22qn, "squad/1-2+d1*5": 2.4, wq: 4.8}
    seeds = [line.split("--data-seed ")[1].split()[0] for line in runs.values()]
    assert len(set(seeds)) == 4 and not set(seeds) & {"49", "50", "51", "52"}  # no batch of s22 repeated


def test_plan_s24_is_one_compiled_batch_64_job_over_every_gpu_with_s23cs_start_and_mix(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s24", gpus=4, mem_mib=143_771)
    assert list(runs) == ["s24L"]
    line = runs["s24L"]
    assert line.startswith("GPUS=0,1,2,3 SHARE=none ") and "--nproc-per-node 4" in line  # one process a GPU, all of its memory
    assert "--compile" in line and "--batch-size 64" in line and "--eval-n-for squad=768" in line

    s23c = launch(tmp_path / "s23", "s23", gpus=4, mem_mib=143_771)["s23c"]
    assert mix(line) == mix(s23c) and "--init /root/ckpt/s22qn " in line
    assert launch(tmp_path / "h100", "s24", gpus=4, mem_mib=81_559)["s24L"].startswith("GPUS=0,1,2,3 SHARE=none ")


def test_plan_s25_keeps_the_wrong_teacher_rows_beside_s24ls_mix_and_the_specialist_comes_third(tmp_path: Path) -> None:
    runs = launch(tmp_path, "s25", gpus=2, mem_mib=81_559)
    assert sorted(runs) == ["s25c", "s25w"]
    assert runs["s25w"].startswith("GPUS=0 python3 ") and runs["s25c"].startswith("GPUS=1 python3 ")  # one process a GPU
    for line in runs.values():
        assert "--init /root/ckpt/s22qn " in line and "--compile" in line and "--batch-size 64" in line
        assert "--eval-n-for squad=768" in line and "--anneal-to-deadline" in line
    # the common --skip-wrong-teacher comes first; s25w's --no-skip-wrong-teacher after it wins (argparse: the last)
    w = runs["s25w"]
    assert w.index("--skip-wrong-teacher") < w.index("--no-skip-wrong-teacher")
    assert "--no-skip-wrong-teacher" not in runs["s25c"]

    s24l = mix(launch(tmp_path / "s24", "s24", gpus=2, mem_mib=81_559)["s24L"])
    assert mix(runs["s25c"]) == mix(runs["s25w"]) == s24l
    assert list(launch(tmp_path / "one", "s25", gpus=1, mem_mib=81_559)) == ["s25w"]  # one GPU: s25w alone

    three = launch(tmp_path / "three", "s25", gpus=3, mem_mib=81_559)
    natural = {t: w for t, w in s24l.items() if not t.startswith(("facts", "needle"))}
    assert sorted(three) == ["s25c", "s25s", "s25w"] and mix(three["s25s"]) == natural and len(natural) == 5
    four = launch(tmp_path / "four", "s25", gpus=4, mem_mib=81_559)
    assert sorted(four) == ["s25c", "s25s", "s25w", "s25ws"] and mix(four["s25ws"]) == natural
    assert four["s25ws"].index("--skip-wrong-teacher") < four["s25ws"].index("--no-skip-wrong-teacher")
    assert "--no-skip-wrong-teacher" not in four["s25s"]
    seeds = [line.split("--data-seed ")[1].split()[0] for line in four.values()]
    assert len(set(seeds)) == 4 and "57" not in seeds  # not s24L's batches


def test_plan_s26_adds_the_layer_mix_to_s25cs_batches_and_the_control_reruns_them(tmp_path: Path) -> None:
    one = launch(tmp_path / "one", "s26", gpus=1, mem_mib=81_559)
    assert list(one) == ["s26m"] and one["s26m"].startswith("GPUS=0 python3 ")  # an H100 alone: the mix, one process
    runs = launch(tmp_path, "s26", gpus=4, mem_mib=81_559)
    assert sorted(runs) == ["s26c", "s26m", "s26m2"]
    s25c = launch(tmp_path / "s25", "s25", gpus=2, mem_mib=81_559)["s25c"]
    seed = lambda line: line.split("--data-seed ")[1].split()[0]  # noqa: E731
    for name, line in runs.items():
        assert mix(line) == mix(s25c) and "--init /root/ckpt/s22qn " in line and "--compile" in line
        assert ("--layer-mix" in line) == name.startswith("s26m") and "--no-skip-wrong-teacher" not in line
    assert seed(runs["s26m"]) == seed(runs["s26c"]) == seed(s25c) == "58"  # the same batches as s25c
    assert seed(runs["s26m2"]) not in {"57", "58", "59", "60", "61"}  # not a batch of s24L or s25
