"""bench/gpu_load.py end to end on the tiny checkpoint (CPU), and its pieces."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.helpers.bench import load_bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")

MODES = ("continuous", "slots", "lookahead", "batch", "reference")


def _load() -> ModuleType:
    return load_bench("gpu_load")


@pytest.mark.slow
def test_tiny_run_measures_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    bench = _load()
    out, md, png = tmp_path / "load.json", tmp_path / "load.md", tmp_path / "load.png"
    argv = ["--tiny", "--streams", "2", "--seconds", "8", "--modes", ",".join(MODES),
            "--json", str(out), "--markdown", str(md), "--plot", str(png)]
    assert bench.main(argv) == 0

    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["mode"], r["streams"]) for r in rows] == [(m, 2) for m in MODES]
    for r in rows:
        assert not r["status"].startswith(("error", "skipped")), r["status"]
        assert r["finals_expected"] > 0
        assert r["finals_received"] == r["finals_expected"]
        assert r["finals_lost"] == 0
        assert r["finals_failed"] == 0
        assert r["tokens_per_s"] > 0
        assert 0 < r["partials"] <= r["partials_requested"]
        for key in ("final_p50", "final_p95", "partial_age_p50", "partial_age_p95"):
            assert isinstance(r[key], float), (key, r[key])
            assert math.isfinite(r[key]), (key, r[key])
            assert 0 < r[key] < 30, (key, r[key])
        assert r["final_p50"] <= r["final_p95"]
        assert 0 < r["gpu_busy_pct"] <= 100
        assert 0.3 < r["speech_fraction"] < 0.7
    by_mode = {r["mode"]: r for r in rows}
    # Every mode sees the same audio at one stream count.
    assert len({r["finals_expected"] for r in rows}) == 1
    assert len({r["finals_at_close"] for r in rows}) == 1
    assert rows[0]["finals_at_close"] <= 2  # one open segment per stream at most
    # The reference really is one request per generate.
    assert by_mode["reference"]["backend_calls"]["transcribe"] >= by_mode["reference"][
        "finals_expected"]
    assert by_mode["batch"]["backend_calls"].get("step", 0) == 0
    for mode in ("continuous", "slots", "lookahead"):
        if by_mode[mode]["backend_calls"].get("step", 0) == 0:
            pytest.fail(f"{mode}: worker.batching = continuous never stepped the backend")
    for mode in ("continuous", "slots", "lookahead", "batch"):
        assert math.isfinite(by_mode[mode]["final_p95_vs_ref"])
        assert by_mode[mode]["tokens_per_s_vs_ref"] > 0

    meta = data["meta"]
    assert meta["tiny"] is True
    for key in ("device", "torch", "transformers", "commit", "date", "command"):
        assert meta[key], key
    assert meta["command"].startswith("python bench/gpu_load.py --tiny")

    text = md.read_text()
    assert "| mode | streams |" in text
    assert "**Command:**" in text
    assert "not performance claims" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| continuous | 2 |" in printed
    assert "| reference | 2 |" in printed


def test_sample_cut_into_sentences_and_half_speech() -> None:
    bench = _load()
    from evoxtral_stream.audio.sources import read_audio_file
    from evoxtral_stream.data import sample_path

    parts = bench.sentences(read_audio_file(sample_path()))
    assert len(parts) == 5  # the bundled sample's five sentences
    assert all(2.5 < len(p) / 16000 < 5.0 for p in parts)
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(20):
        audio, share = bench.stream_audio(parts, 30.0, rng)
        assert len(audio) == 30 * 16000
        assert audio.dtype == np.int16
        shares.append(share)
    assert 0.4 < float(np.mean(shares)) < 0.6


def test_levels_ratios_and_percentiles() -> None:
    bench = _load()
    assert bench.plan(["continuous", "reference"], [5, 1], [1]) == [
        ("continuous", 1), ("reference", 1), ("continuous", 5)]
    assert bench._pct([], 95) != bench._pct([], 95)  # NaN
    assert bench._pct([1.0] * 19 + [math.inf], 50) == 1.0
    assert math.isinf(bench._pct([1.0] * 10 + [math.inf] * 10, 95))
    Row = bench.Row
    rows = [Row("reference", 1, final_p95=4.0, tokens_per_s=10.0),
            Row("continuous", 1, final_p95=0.2, tokens_per_s=10.0, finals_expected=3,
                partials=2, partial_age_p95=0.5),
            Row("continuous", 5, final_p95=0.3, tokens_per_s=50.0)]
    bench.add_ratios(rows)
    assert rows[1].final_p95_vs_ref == pytest.approx(0.05)
    assert rows[1].tokens_per_s_vs_ref == pytest.approx(1.0)
    assert math.isnan(rows[2].final_p95_vs_ref)  # no reference at 5 streams
    failed_ref = [Row("reference", 5, final_p95=math.inf, tokens_per_s=20.0), rows[2]]
    bench.add_ratios(failed_ref)
    assert failed_ref[1].final_p95_vs_ref == 0.0
    assert "0 (ref ∞)" in bench.table(failed_ref)
    assert rows[1].meets_targets
    assert not rows[0].meets_targets
    starved = Row("batch", 9, final_p95=0.2, finals_expected=3, partials_requested=5)
    assert not starved.meets_targets  # partials asked for, none shown
    cap = bench.capacity(rows)
    assert cap["continuous"] == {"streams_within_targets": 1, "peak_tokens_per_s": 50.0}
    assert "| continuous | 1 |" in bench.table(rows)


def test_the_reference_runs_in_a_plain_engine() -> None:
    bench = _load()
    args = bench.parser().parse_args(["--tiny", "--set", "stream.pause_partial=true",
                                      "--set", "stream.draft=true"])
    ref = bench._level_config(args, "reference", 5)
    assert (ref.worker.batching, ref.worker.max_batch) == ("batch", 1)
    assert (ref.stream.prefix_reuse, ref.stream.pause_partial, ref.stream.draft) == (
        "off", False, False)
    ours = bench._level_config(args, "continuous", 5)
    assert ours.worker.batching == "continuous"
    assert ours.stream.pause_partial and ours.stream.draft


def test_the_header_says_what_our_levels_ran_with_set_overrides() -> None:
    """The header took max_batch and prefix_reuse from --max-batch /
    --prefix-reuse or the config only: with --set worker.max_batch=64 it said
    8 while the levels ran 64 (and the slot steps were warmed for 8), and it
    always said partials every 1 s."""
    bench = _load()
    args = bench.parser().parse_args([
        "--tiny", "--seconds", "8", "--max-batch", "4", "--set", "worker.max_batch=64",
        "--set", "stream.prefix_reuse=partials", "--set", "stream.partial_interval_ms=500"])
    info = bench.meta(args, [], "tiny")
    assert (info["max_batch"], info["prefix_reuse"]) == (64, "partials")
    assert bench._level_config(args, "continuous", 1).worker.max_batch == 64
    header = bench.markdown(info, [], None)
    assert "worker.max_batch 64, stream.prefix_reuse partials" in header
    assert "partials every 0.5 s" in header
    args = bench.parser().parse_args(["--tiny", "--seconds", "8",
                                      "--set", "stream.partial_interval_ms=0"])
    assert "no partials" in bench.markdown(bench.meta(args, [], "tiny"), [], None)


def test_model_overrides_reach_our_models_and_not_the_reference(tmp_path: Path) -> None:
    """The levels' engines get models built beforehand, so a `--set
    model.voxtral...` has to be applied where they are built."""
    bench = _load()
    args = bench.parser().parse_args(["--tiny", "--set", "model.voxtral.encoder_graphs=true",
                                      "--set", "stream.draft=true"])
    models = bench.build_models(args, ["continuous", "slots", "reference"], tmp_path,
                                lambda _: None)
    assert models.ours._cfg.encoder_graphs and models.ours.encoder is not None
    assert models.slots._cfg.encoder_graphs and models.slots._cfg.static_cache
    assert models.reference is not None
    plain = bench._plain(dataclasses.replace(models.ours._cfg, prefill_graphs=True,
                                             encoder_compile=True))
    assert not (plain.encoder_graphs or plain.prefill_graphs or plain.encoder_compile)


@pytest.mark.slow
def test_a_passed_drain_leaves_the_compiled_slot_steps_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first H200 run lost every final of its slots level: the harness's
    drain switch was a hook on the model, and dynamo guards on the model's
    hooks, so each level recompiled every step while being measured. Here the
    steps are compiled (dynamo without inductor, as on the CPU the slot
    decoder runs eagerly) and every level's drain passes at once."""
    import torch

    from evoxtral_stream.engine.backends.voxtral import backend as backend_mod
    from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

    prop = backend_mod.VoxtralBackend.__dict__["decoder"]
    assert isinstance(prop, property) and prop.fget is not None
    plain = prop.fget

    traces: list[int] = []

    def count(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        traces.append(1)
        time.sleep(2.0)  # compiling is slow: on the H200 the warm-up outlasted the drain
        return gm.forward

    def compiled(self: backend_mod.VoxtralBackend) -> object:
        if self._decoder is None and self._cfg.static_cache:
            self._decoder = SlotDecoder(
                self, compile={"backend": count, "fullgraph": True, "dynamic": False})
        return plain(self)

    monkeypatch.setattr(backend_mod.VoxtralBackend, "decoder", property(compiled))
    bench = _load()
    out = tmp_path / "load.json"
    torch._dynamo.reset()
    try:
        argv = ["--tiny", "--streams", "2,3", "--seconds", "4", "--modes", "slots",
                "--max-batch", "4", "--warmup-s", "2", "--drain-s", "0",
                "--json", str(out)]
        assert bench.main(argv) == 0
        # One graph for 1 row and one shared by 2 and 4 (step_graphs =
        # "shared"), compiled before the first level, and never again.
        assert len(traces) == 2
    finally:
        torch._dynamo.reset()
    data = json.loads(out.read_text())
    assert data["meta"]["slot_compile_s"] >= 0
    for r in data["rows"]:
        assert r["status"].startswith("overloaded: drain passed"), r["status"]
        assert "not engaged" not in r["status"], r["status"]
        assert r["finals_lost"] == 0
        assert r["tokens_per_s"] > 0  # the first H200 run: 0 at 100 streams


@pytest.mark.slow
def test_a_slot_compile_that_fails_leaves_the_other_modes_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

    def broken(self: SlotDecoder, rows: int) -> list[int]:
        raise RuntimeError("inductor: no kernel for this shape")

    monkeypatch.setattr(SlotDecoder, "warm_up", broken)
    out = tmp_path / "load.json"
    argv = ["--tiny", "--streams", "1", "--seconds", "3", "--modes", "lookahead,reference",
            "--warmup-s", "0", "--json", str(out)]
    assert _load().main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["slot_compile_error"] == "RuntimeError: inductor: no kernel for this shape"
    rows = {r["mode"]: r for r in data["rows"]}
    assert rows["lookahead"]["status"] == (
        "error: compile: RuntimeError: inductor: no kernel for this shape")
    assert rows["reference"]["status"] == "ok" and rows["reference"]["finals_lost"] == 0
    assert "in broken" in capsys.readouterr().out  # the traceback is in the log


def _profiled_in_a_thread(path: Path, window_s: float, *, work: bool) -> Any:
    """A _Profiler whose window opened a second ago and lasts ``window_s``
    more, ticked from a thread of its own (the model thread); returned."""
    import threading

    import torch

    profiler = _load()._Profiler(path, "lookahead, 1 streams", False)
    now = time.monotonic()
    profiler.window = (now - 1, now + window_s)

    def model_thread() -> None:
        profiler.tick()
        if work:
            x = torch.ones(32, 32)
            torch.mm(x, x)
            time.sleep(0.3)
            profiler.tick()

    thread = threading.Thread(target=model_thread, name="model-worker")
    thread.start()
    thread.join(timeout=60)
    return profiler


def test_the_profile_window_opens_and_closes_on_the_model_thread(tmp_path: Path) -> None:
    path = tmp_path / "profile.txt"
    profiler = _profiled_in_a_thread(path, 0.2, work=True)
    text = path.read_text()
    assert text.startswith("# torch.profiler: lookahead, 1 streams, ")
    assert "aten::mm" in text  # the model thread's operators
    profiler.stop()  # the level's end: nothing more to do
    assert path.read_text() == text


def test_a_window_the_model_thread_never_closed_is_not_a_profile(tmp_path: Path) -> None:
    """torch's profiler records the thread that started it, and only that
    thread can stop it (torch 2.11 raises; 2.13 gives an empty table), so a
    window with no backend call after its end says so instead."""
    path = tmp_path / "profile.txt"
    profiler = _profiled_in_a_thread(path, 600, work=False)
    profiler.stop()  # from the event loop's thread, at the level's end
    text = path.read_text()
    assert text.startswith("# torch.profiler: lookahead, 1 streams: not recorded")
    assert "no backend call on the model thread after the window" in text


def test_a_percentile_next_to_one_failure_is_infinite_not_huge() -> None:
    """One failed final among 20 (infinite latency) put p95 between the
    largest latency and the stand-in for infinity: it came out as
    50,000,000,000 s, a finite figure for the table, instead of infinite."""
    bench = _load()
    assert math.isinf(bench._pct([1.0] * 19 + [math.inf], 95))
    assert math.isinf(bench._pct([0.2] * 39 + [math.inf], 99))
    assert bench._pct([1.0] * 99 + [math.inf], 95) == 1.0
    assert bench._pct([0.1, 0.2, 0.3, 0.4], 50) == pytest.approx(0.25)
    assert math.isinf(bench._pct([math.inf, math.inf], 50))


def _one_reference_row(tmp_path: Path, seconds: int = 8) -> dict[str, Any]:
    """The JSON row of one tiny stream at the reference level."""
    out = tmp_path / "load.json"
    argv = ["--tiny", "--streams", "1", "--seconds", str(seconds), "--modes", "reference",
            "--json", str(out)]
    assert _load().main(argv) == 0
    row: dict[str, Any] = json.loads(out.read_text())["rows"][0]
    return row


@pytest.mark.slow
def test_a_final_whose_decode_failed_counts_as_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A final whose decode fails is abandoned by the merger, which then sends
    a final caption with the text the partials had shown: the harness took
    that caption for the decoded final, with a finite latency (decision ->
    error), and counted it received, not failed."""
    from evoxtral_stream.engine import worker as worker_mod
    from evoxtral_stream.events import RequestKind

    plain = worker_mod.ModelWorker._transcribe

    def failing(self: Any, batch: list[Any]) -> Any:
        if any(r.kind is RequestKind.FINAL for r in batch):
            raise RuntimeError("the final failed (test)")
        return plain(self, batch)

    monkeypatch.setattr(worker_mod.ModelWorker, "_transcribe", failing)
    row = _one_reference_row(tmp_path)
    assert row["partials"] > 0  # the merger had text to close the segments with
    assert row["finals_expected"] > 0
    assert row["finals_lost"] == 0
    assert row["finals_failed"] == row["finals_expected"]
    assert row["final_p50"] == "inf" and row["final_p95"] == "inf"
    assert "decode errors" in row["status"]


def test_no_tokens_beside_a_reference_is_not_shown_as_an_infinite_reference() -> None:
    """A level that generated nothing (tokens/s 0, as the first H200 slots
    level) beside a working reference got "0 (ref ∞)" in its tokens/s vs ref
    column: the mark of a failed reference's p95, which this one was not."""
    bench = _load()
    Row = bench.Row
    rows = [Row("reference", 1, final_p95=2.0, tokens_per_s=11.0, finals_expected=3),
            Row("slots", 1, final_p95=math.inf, tokens_per_s=0.0, finals_expected=3,
                finals_failed=3)]
    bench.add_ratios(rows)
    assert rows[1].tokens_per_s_vs_ref == 0.0
    line = bench.table(rows).splitlines()[-1]
    assert line.startswith("| slots | 1 |")
    assert "ref ∞" not in line
    cells = [c.strip() for c in line.split("|")]
    assert cells[12] == "0×"  # tokens/s vs ref


def test_a_failed_level_beside_a_working_reference_is_infinitely_worse_not_unknown() -> None:
    """Every final of a level failed (p95 infinite) beside a reference that
    measured one: "p95 final vs ref" said "–", as where no reference ran at
    that count. A reference that generated no token beside a level that did
    hid the same way in "tokens/s vs ref"."""
    bench = _load()
    Row = bench.Row
    rows = [Row("reference", 1, final_p95=2.0, tokens_per_s=0.0, finals_expected=3),
            Row("slots", 1, final_p95=math.inf, tokens_per_s=40.0, finals_expected=3,
                finals_failed=3)]
    bench.add_ratios(rows)
    assert math.isinf(rows[1].final_p95_vs_ref)
    assert math.isinf(rows[1].tokens_per_s_vs_ref)
    cells = [c.strip() for c in bench.table(rows).splitlines()[-1].split("|")]
    assert cells[11:13] == ["∞", "∞"]
    # Nothing to compare: both infinite, or neither generated a token.
    assert math.isnan(bench._ratio(math.inf, math.inf))
    assert math.isnan(bench._ratio(0.0, 0.0))
    assert bench._ratio(0.0, 11.0) == 0.0


def test_the_finals_flushed_at_the_close_are_counted_apart() -> None:
    """Every stream closes at once, and one in mid-sentence flushes it as a
    final: a burst that stays in p50 / p95, and is left out of
    ``final_p95_live``."""
    from types import SimpleNamespace

    bench = _load()
    stats = SimpleNamespace(partials_requested=0)
    sims = []
    for i, (ready, live) in enumerate((([0.0, 1.0, 10.0], 2), ([2.0, 3.0], 2),
                                       ([4.0, 10.0], 1))):
        handle = SimpleNamespace(id=f"s{i}", session=SimpleNamespace(stats=lambda: stats))
        sims.append(bench._Sim(handle, np.zeros(0, np.int16), 0.0, final_ready=ready,
                               live_finals=live))
    got = bench._Received(finals={
        ("s0", 0): (0.1, None), ("s0", 1): (1.2, None), ("s0", 2): (14.0, None),
        ("s1", 0): (2.3, None), ("s1", 1): (3.4, None),
        ("s2", 0): (4.5, None)})  # s2's flushed final is lost
    row = bench.Row("batch", 3)
    bench._score(row, sims, got, math.inf)
    assert (row.finals_expected, row.finals_lost, row.finals_at_close) == (7, 1, 2)
    assert row.final_p95_live == pytest.approx(bench._pct([0.1, 0.2, 0.3, 0.4, 0.5], 95))
    assert row.final_p95 == pytest.approx(bench._pct([0.1, 0.2, 4.0, 0.3, 0.4, 0.5], 95))


@pytest.mark.slow
def test_a_backend_call_running_at_the_end_of_the_live_phase_counts_in_busy_and_tokens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU busy took the worker's ``busy_s``, which grows only when a backend
    call ends: a call still running when the live phase ended (a long
    generate under load) was left out, here the whole of it: the worker was
    inside the backend from its first request to the end and busy said 0 %.

    tokens/s had the same fault: a generate counts its tokens when it
    returns, so the one running at the end of the live phase was left out
    (here tokens/s was 0). Its tokens now count, over a window that lasts
    until it returned."""
    bench = _load()
    plain = bench.ReferenceBackend.transcribe
    starts: list[float] = []
    first: list[int] = []

    def slow_first(self: Any, batch: list[Any]) -> Any:
        starts.append(time.monotonic())
        if len(starts) > 1:
            return plain(self, batch)
        time.sleep(10.0)  # a generate that outlasts the 8 s of audio
        before = self.tokens_generated
        out = plain(self, batch)
        first.append(self.tokens_generated - before)
        return out

    monkeypatch.setattr(bench.ReferenceBackend, "transcribe", slow_first)
    row = _one_reference_row(tmp_path)
    assert len(starts) > 1
    assert row["finals_lost"] == 0
    assert row["gpu_busy_pct"] >= 20, row["gpu_busy_pct"]
    assert row["gpu_busy_pct"] <= 100
    # The worker is serial: only the first call started in the live phase.
    assert row["tokens"] == first[0] > 0
    assert row["tokens_window_s"] > row["live_s"]
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["tokens_window_s"])


def test_the_tokens_window_ends_with_the_call_running_at_its_end() -> None:
    """The window of tokens/s, call by call: it ends with the call running
    at the mark (a call made inside another is part of it), or at that
    call's start when it raised."""
    import contextlib
    import threading

    bench = _load()
    started, go = threading.Event(), threading.Event()

    class Backend:
        name = "fake"
        tokens_generated = 0

        def transcribe(self, audio: list[Any]) -> list[str]:
            self.tokens_generated += 5
            return [""] * len(audio)

        def transcribe_jobs(self, jobs: list[Any]) -> list[Any]:
            started.set()
            assert go.wait(10)
            self.transcribe(jobs)  # nested: part of this call
            if jobs == ["fail"]:
                raise RuntimeError("test")
            return []

    def model_thread(jobs: list[Any]) -> None:
        with contextlib.suppress(RuntimeError):
            backend.transcribe_jobs(jobs)

    backend = Backend()
    log = bench._CallLog(backend)
    with bench._count_calls(backend, log=log) as calls:
        for jobs in (["a"], ["fail"]):
            started.clear()
            go.clear()
            idle = log.mark()
            assert idle.running is None
            assert log.window_end(idle) == (idle.t, idle.tokens)
            thread = threading.Thread(target=model_thread, args=(jobs,))
            thread.start()
            assert started.wait(10)
            mark = log.mark()
            assert mark.running is not None
            before = backend.tokens_generated
            go.set()
            thread.join(10)
            end, tokens = log.window_end(mark)
            if jobs == ["fail"]:
                assert (end, tokens) == (mark.running[1], before)
            else:
                assert end > mark.t
                assert tokens == before + 5 == backend.tokens_generated
    assert calls == {"transcribe": 2, "transcribe_jobs": 2}


@pytest.mark.slow
def test_a_subscriber_that_died_is_named_in_the_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The measuring subscriber failing (a bad message, its connection
    dropped) left the level's finals counted as lost with status "ok": read
    as an engine that loses finals, not a harness that stopped listening."""
    bench = _load()
    plain = bench._subscribe

    async def dies(port: int, n_streams: int, got: Any, ready: Any) -> None:
        real_set = ready.set

        def set_then_fail() -> None:
            real_set()
            raise RuntimeError("the subscriber broke (test)")

        ready.set = set_then_fail
        await plain(port, n_streams, got, ready)

    monkeypatch.setattr(bench, "_subscribe", dies)
    row = _one_reference_row(tmp_path, seconds=4)
    assert row["finals_lost"] == row["finals_expected"] > 0
    assert "subscriber failed: RuntimeError: the subscriber broke (test)" in row["status"]
