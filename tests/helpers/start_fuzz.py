"""A seeded fuzz of one Ctrl-C at a random moment of a short command's life.

Each seed runs ``evoxtral-stream config`` a few times, as ``python -m
evoxtral_stream`` or as the console script does (``from evoxtral_stream.cli
import main``), and sends one SIGINT at a drawn moment: half in its first
100 ms (the interpreter starting, then our modules importing), half later
(main() running, the exit). :func:`run_start_plan` returns what went wrong
against what README.md promises: status 130 and the one ``interrupted``
line, or, when the command had finished, status 0 and its whole output.
Python's own start (``site``, ``runpy``) runs before any code of ours and
is its own: a signal there may end the process as Python does, as long as
stdout is empty and no traceback passes through a file of ours. Python may
also lose it there: its handler ran inside the import system's weakref
callback, where what it raises can only be reported ("Exception ignored
in"), and the command runs to its end. That report, alone, with status 0
and the whole output, is Python's too. From the guard in cli/__init__.py
on, startup.py sends such a Ctrl-C again (tests/test_cli.py pins that
down); one lost in the millisecond or so before it, as our package and
startup.py import, reads the same and is let through too.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StartPlan", "draw_start_plan", "run_start_plan"]

_ROOT = Path(__file__).resolve().parents[2]
# The console script pip writes, less its sys.argv[0] fix.
_CONSOLE_SCRIPT = "import re, sys\nfrom evoxtral_stream.cli import main\nsys.exit(main())\n"
# A frame of ours, but the first line of cli/__init__.py: Python stops there
# as it starts reading the module (its import lock), before the guard below
# it runs (the package's other modules import inside that guard).
_OURS = re.compile(r'File "[^"]*/evoxtral_stream/(?!cli/__init__\.py", line 18, in <module>\n'
                   r'    from __future__ import annotations\n)')

# Python's whole report of a Ctrl-C it lost in its start (above).
_LOST_BY_PYTHON = re.compile(
    r"Exception ignored in: <function _get_module_lock\.<locals>\.cb at 0x[0-9a-f]+>\n"
    r"Traceback \(most recent call last\):\n"
    r'(?:  File "<frozen importlib\._bootstrap>", line \d+, in \w+\n)+'
    r"KeyboardInterrupt: \n")


@dataclass(frozen=True)
class StartPlan:
    seed: int
    module: bool                  # python -m, else the console script's way
    delays_s: tuple[float, ...]   # from the start to the SIGINT, one run each


def draw_start_plan(seed: int, runs: int = 8) -> StartPlan:
    rng = random.Random(seed)
    early = [rng.uniform(0.0, 0.1) for _ in range(runs // 2)]
    late = [rng.uniform(0.1, 1.0) for _ in range(runs - runs // 2)]
    return StartPlan(seed, rng.random() < 0.5, tuple(early + late))


def _command(plan: StartPlan) -> list[str]:
    entry = ["-m", "evoxtral_stream"] if plan.module else ["-c", _CONSOLE_SCRIPT]
    return [sys.executable, *entry, "config"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": f"{_ROOT / 'src'}{os.pathsep}{_ROOT}"}


def run_start_plan(plan: StartPlan) -> list[str]:
    """Run ``plan``; every broken promise, one string each (none: all kept)."""
    whole = subprocess.run(_command(plan), capture_output=True, text=True, env=_env(),
                           timeout=120, cwd=_ROOT)
    assert whole.returncode == 0 and whole.stdout, whole.stderr
    problems: list[str] = []
    for delay in plan.delays_s:
        proc = subprocess.Popen(_command(plan), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=_env(), cwd=_ROOT)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        rc = proc.returncode
        seen = f"SIGINT at {delay * 1000:.0f} ms: status {rc}, stderr {err[-1500:]!r}"
        if rc == 130:
            if err.splitlines() != ["evoxtral-stream: interrupted"] or out not in ("",
                                                                                  whole.stdout):
                problems.append(f"{seen}, not the one line")
        elif rc == 0:
            if (err and not _LOST_BY_PYTHON.fullmatch(err)) or out != whole.stdout:
                problems.append(f"{seen}, and stdout {len(out)} of {len(whole.stdout)} chars")
        elif out or _OURS.search(err) or "evoxtral-stream:" in err:
            # Not Python's own start: our code had run.
            problems.append(seen)
    return problems
