"""Journal resume cost: one 16 MB journal file, resumes near its end and from 0.

    python bench/journal_resume.py [--ref SRC_DIR]

Writes a journal of one stream until its file holds about 15.5 MB of finals
(the default journal.max_bytes is 16 MiB), then times ``Journal.replay`` for
a resume of the last few finals and from seq 0 (limit 100, as
``server.history`` bounds it). ``--ref`` runs the same measurement, in the
same run, against another checkout's ``src`` (the reference), each in a
subprocess of its own, and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MEASURE = """
import json, sys, tempfile, time
from pathlib import Path
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.journal import Journal
from evoxtral_stream.events import CaptionEvent
tmp = Path(sys.argv[1])
cfg = load_config(env={}, overrides={"journal.enabled": True, "journal.dir": str(tmp),
                                     "journal.fsync": "never"}).journal
w = Journal(cfg); w.restore()
text = "[nervous] So... I was thinking maybe we could talk about the budget " * 2
seq = 0
while True:
    seq += 1
    w.append(CaptionEvent("s", seq, seq, True, text, text, text, "", (), 0.0, 1.0, 0.1))
    if seq % 1000 == 0 and sum(p.stat().st_size for p in tmp.iterdir()) > 15_500_000:
        break
w.close()
j = Journal(cfg); j.restore()
rows = []
for since in (seq - 3, seq - 100, 0):
    t = time.perf_counter()
    for _ in range(5):
        r = j.replay("s", since, limit=100)
    rows.append([since, len(r.records), (time.perf_counter() - t) / 5 * 1000])
print(json.dumps({"bytes": sum(p.stat().st_size for p in tmp.iterdir()), "finals": seq,
                  "rows": rows}))
"""


def measure(src: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", _MEASURE, tmp], env=env, check=True,
                             capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", type=Path, help="another checkout's src folder (the reference)")
    args = p.parse_args()
    runs = [("this tree", Path(__file__).resolve().parent.parent / "src")]
    if args.ref:
        runs.append(("reference", args.ref))
    for name, src in runs:
        t0 = time.monotonic()
        r = measure(src)
        print(f"{name} ({src}): {r['bytes']} bytes, {r['finals']} finals "
              f"({time.monotonic() - t0:.0f} s)")
        print("| since | finals replayed | ms per resume |\n|---|---|---|")
        for since, n, ms in r["rows"]:  # type: ignore[attr-defined]
            print(f"| {since} | {n} | {ms:.1f} |")


if __name__ == "__main__":
    main()
