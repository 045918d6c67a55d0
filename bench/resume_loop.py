"""What a resume from the journal costs the other clients: the event loop held.

    python bench/resume_loop.py [--streams 300] [--finals 1000] [--ref SRC_DIR]

Writes a journal of ``--streams`` ended streams of ``--finals`` finals each,
starts a real engine and server on it (a model that says nothing: no
decoding), and has one subscriber resume every stream from seq 0
(``?since=s0000:0,...``, up to ``server.history`` finals each) while a task
on the server's loop wakes every 5 ms and records how late it woke, and a
second client connects 50 ms after the first and times its ``hello``.
Prints the resume's time, the loop's worst and p99 lateness and the second
client's wait. ``--ref`` runs the same measurement, in the same run,
against another checkout's ``src`` (the reference), each in a subprocess of
its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_MEASURE = r"""
import asyncio, json, sys, time
from pathlib import Path
from websockets.asyncio.client import connect
from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.engine.journal import Journal
from evoxtral_stream.events import CaptionEvent, StreamEnded
from evoxtral_stream.server.app import CaptionServer

tmp, n_streams, n_finals = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(env={}, overrides={
    "journal.enabled": True, "journal.dir": str(tmp), "journal.fsync": "never",
    "server.port": 0, "server.history": n_finals, "server.subscriber_queue": 1_000_000})
w = Journal(cfg.journal)
w.restore()
text = "[nervous] So... I was thinking maybe we could talk about the budget"
ids = [f"s{i:04d}" for i in range(n_streams)]
for s in ids:
    for seq in range(1, n_finals + 1):
        w.append(CaptionEvent(s, seq, seq, True, text, text, text, "", (), 0.0, 1.0, 0.1))
    w.end(StreamEnded(s, 1.0, n_finals, n_finals))
w.close()


class Silent:
    name = "silent"

    def transcribe(self, batch):
        return ["" for _ in batch]


async def main():
    async with Engine(cfg, Silent()) as engine, CaptionServer(engine, cfg.server) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/captions"
        lags = []
        done = asyncio.Event()

        async def tick():
            while not done.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - t - 0.005)

        async def other():
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            async with connect(url, open_timeout=120) as ws:
                await ws.recv()
                return time.perf_counter() - t

        ticker = asyncio.ensure_future(tick())
        waited = asyncio.ensure_future(other())
        t0 = time.perf_counter()
        finals = ended = 0
        async with connect(url + "?since=" + ",".join(f"{s}:0" for s in ids),
                           max_size=None, max_queue=None, open_timeout=120) as ws:
            await ws.recv()  # hello
            while ended < n_streams:
                msg = json.loads(await ws.recv())
                finals += msg["type"] == "caption"
                ended += msg["type"] == "stream.ended"
        resume_s = time.perf_counter() - t0
        other_s = await waited
        done.set()
        await ticker
    lags.sort()
    print(json.dumps({"finals": finals, "resume_s": resume_s, "other_hello_s": other_s,
                      "lag_max_s": lags[-1], "lag_p99_s": lags[int(0.99 * (len(lags) - 1))]}))


asyncio.run(main())
"""


def measure(src: Path, streams: int, finals: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run([sys.executable, "-c", _MEASURE, tmp, str(streams), str(finals)],
                             env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=300)
    p.add_argument("--finals", type=int, default=1000)
    p.add_argument("--ref", type=Path, help="another checkout's src folder (the reference)")
    args = p.parse_args()
    runs = [("this tree", Path(__file__).resolve().parent.parent / "src")]
    if args.ref:
        runs.append(("reference", args.ref))
    print("| tree | finals replayed | resume s | loop held, worst ms | loop late, p99 ms "
          "| other client's hello ms |\n|---|---|---|---|---|---|")
    for name, src in runs:
        r = measure(src, args.streams, args.finals)
        print(f"| {name} | {r['finals']:.0f} | {r['resume_s']:.2f} | {1000 * r['lag_max_s']:.0f} "
              f"| {1000 * r['lag_p99_s']:.0f} | {1000 * r['other_hello_s']:.0f} |")


if __name__ == "__main__":
    main()
