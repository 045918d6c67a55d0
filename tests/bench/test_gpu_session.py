"""bench/gpu_session.sh `all`: the one device call of a GPU session, run on
the CPU with the tiny checkpoint so that its plumbing is right before a
lent GPU's minutes are spent on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


def _all(out: Path, *load_args: str) -> subprocess.CompletedProcess[str]:
    """`gpu_session.sh all` on the CPU: the tiny checkpoint, no wheels."""
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "NO_WHEELS": "1",
        "HF_HUB_OFFLINE": "1",
        "ALL_DEADLINE_S": "300",
        "KERNELS_ARGS": "--tiny --batches 1 --new-tokens 2 --audio-s 1 --profile-batches 1",
    }
    return subprocess.run(["bash", "bench/gpu_session.sh", "all", "abc1234", *load_args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_all_runs_load_then_kernels_into_out(tmp_path: Path) -> None:
    proc = _all(tmp_path, "--tiny", "--seconds", "3", "--streams", "1",
                "--reference-streams", "1", "--drain-s", "20")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "s for the load levels" in proc.stdout
    assert "s for the kernel rows" in proc.stdout

    kernels = json.loads((tmp_path / "voxtral_kernels.json").read_text())
    assert [r["mode"] for r in kernels["rows"]] == ["merged"]
    assert kernels["meta"]["argv"][-1] == "1"  # KERNELS_ARGS came last: --audio-s 1
    load = json.loads((tmp_path / "gpu_load.json").read_text())
    assert load["meta"]["commit"] == "abc1234"
    assert load["meta"]["slot_compile_s"] >= 0
    rows = {(r["mode"], r["streams"]): r for r in load["rows"]}
    # The extra args came last: --streams 1 replaced 1,100,150.
    assert set(rows) == {("reference", 1), ("slots", 1), ("lookahead", 1)}
    for r in rows.values():
        assert r["status"] not in ("skipped",) and not r["status"].startswith("error"), r
        assert r["finals_lost"] == 0
    assert "| 1 | 1 | whole prefill |" in (tmp_path / "prefill_profile.md").read_text()
    assert "torch.profiler: lookahead, 1 streams" in (tmp_path / "gpu_load_profile.txt").read_text()
    # What comes back from the device: at most 8 files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "voxtral_kernels.json", "voxtral_kernels.log", "prefill_profile.md", "gpu_load.json",
        "gpu_load.md", "gpu_load.png", "gpu_load.log", "gpu_load_profile.txt"])
    for p in tmp_path.iterdir():
        assert p.stat().st_size > 0, p.name


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_a_load_that_fails_still_leaves_the_kernel_rows_their_time(tmp_path: Path) -> None:
    # The second H200 run: the load's guard fired and, with `set -e`, ended
    # the call before the kernel rows.
    proc = _all(tmp_path, "--tiny", "--modes", "nosuch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_session: the load levels ended with status 1" in proc.stdout
    assert "s for the kernel rows" in proc.stdout
    kernels = json.loads((tmp_path / "voxtral_kernels.json").read_text())
    assert [r["mode"] for r in kernels["rows"]] == ["merged"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_levers_runs_the_load_with_the_prefill_levers_on(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "NO_WHEELS": "1",
           "HF_HUB_OFFLINE": "1", "ALL_DEADLINE_S": "300",
           # Compiling on the CPU needs minutes of the CI's two cores.
           "LEVERS": "encoder_graphs prefill_graphs"}
    # --profile-s 1: the profiled level runs 6 s instead of 10 (what it
    # profiled is not checked here; `all`'s test checks the profile).
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh", "levers", "abc1234", "--tiny", "--seconds", "3",
         "--streams", "1", "--reference-streams", "1", "--drain-s", "20", "--profile-s", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    load = json.loads((tmp_path / "gpu_load_levers.json").read_text())
    assert load["meta"]["commit"] == "abc1234"
    assert load["meta"]["overrides"] == ["model.voxtral.encoder_graphs=true",
                                         "model.voxtral.prefill_graphs=true"]
    rows = {(r["mode"], r["streams"]): r for r in load["rows"]}
    assert set(rows) == {("reference", 1), ("lookahead", 1)}
    for r in rows.values():
        assert not r["status"].startswith(("skipped", "error")), r
        assert r["finals_lost"] == 0
    assert "prefill graphs" not in proc.stdout  # nothing is captured on the CPU


def test_an_unknown_step_prints_the_usage() -> None:
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "nosuch"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bench/gpu_session.sh levers COMMIT" in proc.stdout
    assert proc.stdout.startswith("# The GPU benchmark session")
    assert "set -euo" not in proc.stdout


def test_tests_runs_the_gpu_tests_into_out(tmp_path: Path) -> None:
    """`gpu_session.sh tests` on the CPU: every GPU test is collected and
    skips cleanly; the log and the JUnit file come back in $OUT."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "NO_WHEELS": "1"}
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "tests"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_tests.log", "gpu_tests.xml"]
    log = (tmp_path / "gpu_tests.log").read_text()
    assert "test_gpu.py::test_cuda_defaults_to_bfloat16 SKIPPED" in log
    assert " skipped" in log and "error" not in log.lower()
    assert 'skipped="' in (tmp_path / "gpu_tests.xml").read_text()
