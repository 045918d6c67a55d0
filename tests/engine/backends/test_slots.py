"""The slot cache: a ring of columns that wraps, grows and compiles, and still
gives every job what it gets alone. (The shared contract runs in
test_continuous.py against both decoders.)"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.backends.base import BackendError, Done, Job
from evoxtral_stream.engine.backends.voxtral.attention import GROUPED_SDPA, grouped_sdpa, register
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend
from evoxtral_stream.engine.backends.voxtral.continuous import ContinuousDecoder
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder, bucket

from .test_continuous import _admit, _alone, _audio, _drain, _jobs

SR = 16_000


@pytest.fixture(scope="module")
def jobs() -> list[Job]:
    return _jobs(seed=40)


@pytest.fixture(scope="module")
def plain(merged: VoxtralBackend, jobs: list[Job]) -> dict[Job, Done]:
    return _alone(merged, jobs)


def _same_audio(job: Job, key: object) -> Job:
    return Job(key, job.audio, job.adapter, job.prefix)


def test_buckets_are_powers_of_two_up_to_the_slots() -> None:
    assert [bucket(n, 8) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 8]
    assert bucket(9, 16) == 16
    assert bucket(64, 64) == 64


def test_static_cache_config_picks_the_slot_decoder(merged: VoxtralBackend) -> None:
    assert isinstance(merged.decoder, ContinuousDecoder)
    slots = VoxtralBackend(merged.loaded, dataclasses.replace(merged._cfg, static_cache=True))
    assert isinstance(slots.decoder, SlotDecoder)
    # On the CPU the step is not compiled.
    assert slots.decoder._step == slots.decoder._forward


def test_the_ring_wraps_twice(merged: VoxtralBackend) -> None:
    """Jobs keep joining a batch that never empties, for two laps of the ring."""
    # One window each, so the ring keeps its first size (512 columns; a 35 s
    # row would grow it to 896, and two laps take a step per column), with
    # budgets of 24 to 56 tokens: each admission (features, encoder and a
    # prompt prefill) costs as much as about 15 steps, and short rows would
    # make most of the laps admissions. Growing: the test after this one.
    jobs = [Job(i, _audio(s, 40 + i)) for i, s in enumerate((12.0, 20.0, 28.0))]
    dec = SlotDecoder(merged)
    out: dict[Job, Done] = {}
    want: dict[Job, Done] = {}
    steps = 0
    serial = itertools.count()
    merged.force_tokens = True  # fixed lengths: rows run to their budgets
    try:
        forced = _alone(merged, jobs)
        while steps < 2 * max(dec.columns, 1) or dec.active:
            if steps < 2 * max(dec.columns, 1) and dec.active < 4:
                src = jobs[next(serial) % len(jobs)]
                job = _same_audio(src, ("lap", steps))
                want[job] = Done(job, forced[src].text, forced[src].tokens,
                                 forced[src].token_ids)
                _admit(dec, [job], out)
            _drain(dec, out, 1)
            steps += 1
    finally:
        merged.force_tokens = False
    assert dec.columns > 0
    assert steps > 2 * dec.columns
    assert len({len(j.audio) for j in out}) == len(jobs)  # rows of every length joined
    assert out == want


def test_more_slots_and_longer_rows_grow_the_cache(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dec = SlotDecoder(merged)
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:3], out)
    first = (dec.slots, dec.columns)
    assert first[0] == 8
    _drain(dec, out, 2)
    # Ten more rows than slots, and a 70 s row (three windows) longer than the ring.
    more = [_same_audio(jobs[i % 5], ("more", i)) for i in range(10)]
    long = Job("long", _audio(70.0, 99))
    want_long = _alone(merged, [long])[long]
    with caplog.at_level(logging.INFO):
        _admit(dec, [*more, long], out)
    assert dec.slots == 16
    assert dec.columns > first[1]
    assert dec.columns >= dec.span(long)
    assert "slot cache grows" in caplog.text
    _drain(dec, out)
    assert out.pop(long) == want_long
    assert out == {**{j: plain[j] for j in jobs[:3]},
                   **{j: Done(j, plain[jobs[i % 5]].text, plain[jobs[i % 5]].tokens,
                              plain[jobs[i % 5]].token_ids)
                      for i, j in enumerate(more)}}


@pytest.mark.slow
def test_after_warm_up_the_longest_segments_grow_nothing_and_compile_nothing(
    merged: VoxtralBackend, caplog: pytest.LogCaptureFixture,
) -> None:
    """A growth costs a new compiled graph (static shapes, and a cache made
    in inference mode guards differently from warm-up's), mid-stream on a
    GPU. With the shipped token rate, segments of up to vad.max_segment_s
    (at most 29 s, plus pre-roll) with a prefix as long as their budget fit
    what warm_up(max_batch) allocates, on the engine's model thread too."""
    from torch._dynamo.utils import counters

    shipped = load_config().model.voxtral
    cfg = dataclasses.replace(merged._cfg, tokens_per_second=shipped.tokens_per_second,
                              min_new_tokens=shipped.min_new_tokens)
    backend = VoxtralBackend(merged.loaded, cfg)
    longest = round(29.3 * SR)
    budget = backend.max_new_tokens(longest)
    torch._dynamo.reset()
    counters.clear()
    try:
        dec = SlotDecoder(backend, compile={"backend": "aot_eager", "fullgraph": True,
                                            "dynamic": False})
        dec.warm_up(8)
        allocated, graphs = (dec.slots, dec.columns), counters["stats"]["unique_graphs"]
        word = "yes "
        prefix = (word * budget).strip()
        assert len(backend.encode_prefix(prefix)) >= budget - 1
        jobs = [Job(i, _audio(longest / SR, 70 + i), None, prefix if i % 2 else "",
                    language=None if i % 3 else "fr") for i in range(8)]
        out: dict[Job, Done] = {}
        errors: list[BaseException] = []

        def model_thread() -> None:
            try:
                with caplog.at_level(logging.INFO):
                    _admit(dec, jobs[:5], out)
                    _drain(dec, out, 3)
                    _admit(dec, jobs[5:], out)
                    _drain(dec, out)
            except BaseException as e:  # re-raised in the test's thread
                errors.append(e)

        thread = threading.Thread(target=model_thread)
        thread.start()
        thread.join(timeout=600)
        assert not errors, errors
        assert len(out) == len(jobs)
        assert (dec.slots, dec.columns) == allocated
        assert "slot cache grows" not in caplog.text
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_leaving_rows_are_replaced_by_the_last(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    dec = SlotDecoder(merged)
    out: dict[Job, Done] = {}
    _admit(dec, jobs, out)
    running = [r.job for r in dec.rows]
    assert dec.cancel(running[1])
    # The last row moved into the hole; the others kept their slots.
    assert [r.job for r in dec.rows] == [running[0], running[-1], *running[2:-1]]
    _drain(dec, out)
    assert out == {j: plain[j] for j in jobs if j is not running[1]}


@pytest.fixture
def compiled(merged: VoxtralBackend) -> Iterator[SlotDecoder]:
    torch._dynamo.reset()
    # aot_eager: dynamo tracing and functionalisation of the in-place cache
    # writes, without a C compiler; fullgraph: no graph breaks allowed.
    yield SlotDecoder(merged, compile={"backend": "aot_eager", "fullgraph": True,
                                       "dynamic": False})
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_steps_equal_alone(
    compiled: SlotDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    assert compiled._step != compiled._forward
    out: dict[Job, Done] = {}
    _admit(compiled, jobs[:2], out)
    _drain(compiled, out, 3)
    _admit(compiled, jobs[2:], out)
    _drain(compiled, out)
    assert out == plain


@pytest.mark.slow
@pytest.mark.parametrize(("shared", "graphs"), [(True, 2), (False, 4)])
def test_shared_steps_compile_once_for_every_bucket_past_one(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done], shared: bool, graphs: int
) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # Room for the 35 s job from the start, as the engine's warm-up makes for
    # its longest segment: a ring grown mid-decode would trace every bucket's
    # step again (static shapes), twice the tracing this test is about.
    columns = max(SlotDecoder(merged).span(j) for j in jobs)
    try:
        dec = SlotDecoder(merged, compile={"backend": "aot_eager", "fullgraph": True,
                                           "dynamic": False}, columns=columns, shared=shared)
        calls: list[int] = []
        step = dec._step

        def counted(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            calls.append(len(ids))
            return step(ids, lengths)

        dec._step = counted
        assert dec.warm_up(8) == [1, 2, 4, 8]
        # Twice each: CUDA-graph trees warm a step up eagerly, then record it.
        assert calls == [1, 1, 2, 2, 4, 4, 8, 8]
        # Buckets 2, 4 and 8 share one graph; 1 has its own.
        assert counters["stats"]["unique_graphs"] == graphs
        out: dict[Job, Done] = {}
        _admit(dec, jobs, out)
        _drain(dec, out)
        assert out == plain
        assert counters["stats"]["unique_graphs"] == graphs  # the decode compiled nothing
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_steps_set_up_cuda_graph_state_in_their_own_thread(
    compiled: SlotDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    # pytorch/pytorch#123177: before torch 2.13 a CUDA-graph step called from
    # a thread without inductor's per-thread state fails an empty assert, and
    # the engine's model thread is never the one that imported torch.
    seen: dict[str, Any] = {}

    def model_thread() -> None:
        seen["before"] = torch._C._is_key_in_tls("tree_manager_containers")
        out: dict[Job, Done] = {}
        _admit(compiled, jobs[:2], out)
        _drain(compiled, out)
        seen["after"] = torch._C._is_key_in_tls("tree_manager_containers")
        seen["out"] = out

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join(timeout=600)
    assert (seen["before"], seen["after"]) == (False, True)
    assert seen["out"] == {j: plain[j] for j in jobs[:2]}


def _get_obj_of_torch_2_11(local: Any, attr_name: str) -> Any:
    """torch 2.11's cudagraph_trees.get_obj, which every CUDA-graph step calls:
    it asserts where torch 2.13 sets the state up."""
    if hasattr(local, attr_name):
        return getattr(local, attr_name)
    assert torch._C._is_key_in_tls(attr_name)
    return torch._C._get_obj_in_tls(attr_name)


@pytest.mark.parametrize("has_initialize_tls", [True, False], ids=["torch-2.13", "torch-2.11"])
def test_a_fresh_thread_gets_what_torch_2_11_asserts_on(
    monkeypatch: pytest.MonkeyPatch, has_initialize_tls: bool
) -> None:
    from torch._inductor import cudagraph_trees

    from evoxtral_stream.engine.backends.voxtral.slots import graphs_in_this_thread

    if not has_initialize_tls:  # torch 2.11 has no _initialize_tls
        monkeypatch.delattr(cudagraph_trees, "_initialize_tls", raising=False)
    seen: dict[str, Any] = {}

    def fresh() -> None:
        try:
            _get_obj_of_torch_2_11(cudagraph_trees.local, "tree_manager_containers")
        except AssertionError:
            seen["before"] = "assert"
        graphs_in_this_thread()
        graphs_in_this_thread()  # a second call changes nothing
        seen["containers"] = _get_obj_of_torch_2_11(cudagraph_trees.local,
                                                    "tree_manager_containers")
        seen["locks"] = _get_obj_of_torch_2_11(cudagraph_trees.local, "tree_manager_locks")

    thread = threading.Thread(target=fresh)
    thread.start()
    thread.join(timeout=60)
    assert seen["before"] == "assert"
    assert seen["containers"] == {}
    assert seen["locks"][0] is seen["locks"][0]  # a lock per device, made on demand
    # The test's own thread keeps its own state.
    assert seen["containers"] is not cudagraph_trees.get_obj(cudagraph_trees.local,
                                                             "tree_manager_containers")


_STEALING_STASH = """
import ctypes, sys, threading
import torch
from torch._inductor import cudagraph_trees

real = torch._C._stash_obj_in_tls

def stealing(key, obj):  # torch 2.11's binding keeps a reference it never took
    before = sys.getrefcount(obj)
    real(key, obj)
    if sys.getrefcount(obj) > before:  # a torch that takes its reference
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(obj))

torch._C._stash_obj_in_tls = stealing
if hasattr(cudagraph_trees, "_initialize_tls"):
    del cudagraph_trees._initialize_tls
from evoxtral_stream.engine.backends.voxtral.slots import graphs_in_this_thread
from evoxtral_stream.engine.worker import _native_end

kept = []

def model_thread():
    graphs_in_this_thread()
    local = cudagraph_trees.local
    kept.append((local.tree_manager_containers, local.tree_manager_locks))

for _ in range(3):  # the model thread, then two restarted workers
    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    # As the engine's stop does: the stash goes at the native end, after the
    # join, and an exit before it aborts the process (CI, once).
    _native_end(thread, 10)
for containers, locks in kept:
    assert containers == {} and sys.getrefcount(containers) >= 2, sys.getrefcount(containers)
    locks[0]
print("ok", len(kept))
"""


def test_the_thread_state_outlives_its_thread_when_torch_steals_the_reference() -> None:
    """torch 2.11's ``_stash_obj_in_tls`` keeps a reference it never took,
    and drops it when the thread ends: the engine's model thread ending (a
    restart, the shutdown) freed its state twice and crashed the process.
    Simulated here on any torch, in a child process, so that a regression
    fails this test rather than the test run."""
    proc = subprocess.run([sys.executable, "-c", _STEALING_STASH], capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok 3"), proc.stderr[-2000:]


# --- grouped-query attention --------------------------------------------------


class _Attn(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def _qkv(b: int, q_len: int, kv: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 8, q_len, 16, generator=g)
    k = torch.randn(b, 2, kv, 16, generator=g)
    v = torch.randn(b, 2, kv, 16, generator=g)
    return q, k, v


def test_grouped_sdpa_equals_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attn()
    q, k, v = _qkv(3, 1, 40)
    mask = torch.rand(3, 1, 1, 40, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[:, :, :, -1] = True
    got, _ = grouped_sdpa(module, q, k, v, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert got.shape == (3, 1, 8, 16)
    torch.testing.assert_close(got, want)
    # Longer queries (prefill) go to sdpa itself.
    q5, k5, v5 = _qkv(2, 5, 5)
    got5, _ = grouped_sdpa(module, q5, k5, v5, None, scaling=0.25)
    want5, _ = sdpa_attention_forward(module, q5, k5, v5, None, scaling=0.25)
    torch.testing.assert_close(got5, want5)


def _largest_intermediate(fn: Any, *args: Any) -> int:
    """Elements of the largest tensor the compiled ``fn`` computes."""
    sizes: list[int] = []

    def collect(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        for node in gm.graph.nodes:
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor) and node.op in ("call_function", "call_method"):
                sizes.append(val.numel())
        return gm.forward

    torch._dynamo.reset()
    compiled: Any = torch.compile(fn, backend=collect, fullgraph=True)
    compiled(*args)
    torch._dynamo.reset()
    return max(sizes)


def test_compiled_grouped_sdpa_never_repeats_the_cache() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attn()
    q, k, v = _qkv(4, 1, 512)
    mask = torch.ones(4, 1, 1, 512, dtype=torch.bool)
    cache = k.numel()
    # transformers' sdpa repeats keys and values per query head when compiled...
    repeated = _largest_intermediate(
        lambda q, k, v, m: sdpa_attention_forward(module, q, k, v, m)[0], q, k, v, mask
    )
    assert repeated >= 4 * cache
    # ... the grouped one computes nothing as large as the cache.
    grouped = _largest_intermediate(
        lambda q, k, v, m: grouped_sdpa(module, q, k, v, m)[0], q, k, v, mask
    )
    assert grouped < cache


def test_grouped_attention_is_registered_for_static_cache(merged: VoxtralBackend) -> None:
    register()
    register()  # idempotent
    model: Any = merged.model
    model.set_attn_implementation({"text_config": "sdpa"})
    audio = [np.asarray(_audio(3.0, 7)), np.asarray(_audio(31.0, 8))]
    want = merged.generate_tokens(audio)
    backend = VoxtralBackend(merged.loaded, dataclasses.replace(merged._cfg, static_cache=True))
    assert backend.loaded is merged.loaded  # the same model
    assert model.config.get_text_config()._attn_implementation == GROUPED_SDPA
    assert model.config.audio_config._attn_implementation == "sdpa"
    # Eagerly it is sdpa: batch decoding gives what it gave before.
    assert backend.generate_tokens(audio) == want


def test_warm_up_prepares_every_bucket_and_changes_no_result(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    slots = VoxtralBackend(merged.loaded, dataclasses.replace(merged._cfg, static_cache=True))
    assert "batches 1, 2, 4, 8, 16" in slots.warm_up(10)
    dec = slots.decoder
    assert isinstance(dec, SlotDecoder)
    assert (dec.slots, dec.active) == (16, 0)
    out: dict[Job, Done] = {}
    _admit(dec, jobs, out)
    assert slots.warm_up(4) == "nothing to warm up"  # rows are running
    with pytest.raises(BackendError, match="idle"):
        dec.warm_up(4)
    _drain(dec, out)
    assert out == plain
    # The dynamic decoder has nothing to prepare.
    assert merged.warm_up(8) == "nothing to warm up"


def test_lookahead_launches_the_next_step_and_an_admission_settles_it(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    dec = SlotDecoder(merged, lookahead=True)
    launched = 0
    step = dec._step

    def counting(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        nonlocal launched
        launched += 1
        return step(ids, lengths)

    dec._step = counting
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:2], out)
    assert launched == 0  # the prefill is not a step
    _drain(dec, out, 1)
    assert (launched, dec._flight is not None) == (2, True)  # this step and the next
    _drain(dec, out, 1)
    assert launched == 3  # the next was launched already: one more
    tokens = {r.job: len(r.tokens) for r in dec.rows}
    _admit(dec, jobs[2:], out)
    # The step in flight was finished (one token more each), launching nothing.
    assert dec._flight is None
    assert launched == 3
    assert all(len(r.tokens) == tokens[r.job] + 1 for r in dec.rows if r.job in tokens)
    _drain(dec, out)
    assert out == plain


def test_lookahead_needs_the_static_cache(merged: VoxtralBackend) -> None:
    from evoxtral_stream.config import ConfigError

    with pytest.raises(ConfigError, match=r"lookahead needs model\.voxtral\.static_cache"):
        dataclasses.replace(merged._cfg, lookahead=True)
    cfg = dataclasses.replace(merged._cfg, static_cache=True, lookahead=True)
    dec = VoxtralBackend(merged.loaded, cfg).decoder
    assert isinstance(dec, SlotDecoder)
    assert dec.lookahead
    assert not dec._pinned  # the CPU has no pinned memory to use
