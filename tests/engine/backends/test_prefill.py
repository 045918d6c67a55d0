"""The prompt prefill at fixed shapes (``model.voxtral.prefill_graphs``): the
same first tokens and cache as the plain prefill, for whatever fits a bucket.
(On the CPU the route runs eagerly; the GPU test captures it.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend
from evoxtral_stream.engine.backends.voxtral.continuous import ContinuousDecoder, RowDecoder
from evoxtral_stream.engine.backends.voxtral.prefill import COLUMN_STEP, PrefillGraphs
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

from .test_continuous import _admit, _alone, _audio, _drain


@pytest.fixture
def fixed(merged: VoxtralBackend, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[VoxtralBackend, list[int]]:
    """A backend on the merged model with the fixed-shape prefill; the list
    gets the rows of every prefill that took it."""
    assert merged.prefill_graphs is None  # off by default
    cfg = dataclasses.replace(merged._cfg, encoder_graphs=True, prefill_graphs=True)
    backend = VoxtralBackend(merged.loaded, cfg)
    assert backend.prefill_graphs is not None and backend.encoder is not None
    taken: list[int] = []
    real = PrefillGraphs.__call__

    def spy(self: PrefillGraphs, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        got = real(self, embeds, mask, pos)
        if got is not None:
            taken.append(int(embeds.shape[0]))
        return got

    monkeypatch.setattr(PrefillGraphs, "__call__", spy)
    return backend, taken


def _short_jobs(seed: int) -> list[Job]:
    """Jobs that fit the buckets: one window, a few with prefixes."""
    spec = [(0.7, ""), (3.0, "so I was"), (5.0, ""), (2.0, "[nervous] well then, maybe we")]
    return [Job(i, _audio(s, seed + i), None, prefix) for i, (s, prefix) in enumerate(spec)]


@pytest.mark.parametrize("decoder", [ContinuousDecoder, SlotDecoder])
def test_fixed_shape_prefill_decodes_as_alone(
    merged: VoxtralBackend, fixed: tuple[VoxtralBackend, list[int]],
    decoder: type[RowDecoder],
) -> None:
    backend, taken = fixed
    jobs = _short_jobs(seed=60)
    want = _alone(merged, jobs)
    dec = decoder(backend)
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:1], out)  # a bucket of 1 row
    _drain(dec, out, 2)
    _admit(dec, jobs[1:], out)  # 3 rows: a bucket of 4, one spare
    _drain(dec, out)
    assert out == want
    assert taken == [1, 3]


def test_what_fits_no_bucket_takes_the_plain_prefill(
    merged: VoxtralBackend, fixed: tuple[VoxtralBackend, list[int]],
) -> None:
    backend, taken = fixed
    graphs = backend.prefill_graphs
    assert graphs is not None
    assert graphs.columns[0] % COLUMN_STEP == 0 and len(graphs.columns) >= 2
    assert graphs.bucket(3, graphs.columns[0] - 1) == (4, graphs.columns[0])
    assert graphs.bucket(5, 1) is None
    assert graphs.bucket(1, graphs.columns[-1] + 1) is None
    jobs = [Job(0, _audio(35.0, 61), None),  # two windows: too long
            *(Job(i, _audio(1.0, 61 + i), None) for i in range(1, 6))]  # 5 rows at once
    want = _alone(merged, jobs)
    dec = ContinuousDecoder(backend)
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:1], out)
    _admit(dec, jobs[1:], out)
    _drain(dec, out)
    assert out == want
    assert taken == []


def test_drafts_take_the_plain_prefill(
    merged: VoxtralBackend, fixed: tuple[VoxtralBackend, list[int]],
) -> None:
    backend, taken = fixed
    job = Job(0, _audio(3.0, 62), None)
    want = _alone(merged, [job])[job]
    drafted = dataclasses.replace(job, draft=want.token_ids[:3])
    dec = ContinuousDecoder(backend)
    out: dict[Job, Done] = {}
    _admit(dec, [drafted], out)
    _drain(dec, out)
    assert (out[drafted].text, out[drafted].tokens) == (want.text, want.tokens)
    assert taken == []


def test_a_capture_that_fails_leaves_the_plain_prefill(
    merged: VoxtralBackend, fixed: tuple[VoxtralBackend, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, taken = fixed
    graphs = backend.prefill_graphs
    assert graphs is not None
    assert graphs.capture(4) == []  # nothing to capture on the CPU
    # As if on a GPU: here allocating the first bucket's inputs fails.
    graphs._device = torch.device("cuda")
    assert graphs.capture(4) == []
    assert not graphs.enabled
    assert "prefill graphs disabled, the prompt prefill runs eagerly" in caplog.text
    jobs = _short_jobs(seed=63)
    want = _alone(merged, jobs)
    dec = SlotDecoder(backend)
    out: dict[Job, Done] = {}
    _admit(dec, jobs, out)
    _drain(dec, out)
    assert out == want
    assert taken == []


def test_the_bucket_prefill_traces_as_one_graph(merged: VoxtralBackend) -> None:
    """What a CUDA graph captures must not sync with the host (``.item()``,
    a data-dependent shape, a branch on a tensor): dynamo traces all of it
    as one graph, a CPU check that a transformers upgrade added none."""
    cfg = dataclasses.replace(merged._cfg, encoder_graphs=True, prefill_graphs=True)
    graphs = VoxtralBackend(merged.loaded, cfg).prefill_graphs
    assert graphs is not None
    bucket = graphs._graph(2, graphs.columns[0])
    bucket.real.fill_(True)
    bucket.pos.copy_(torch.arange(bucket.columns))
    torch._dynamo.reset()
    try:
        traced = torch.compile(lambda: graphs._forward(bucket), backend="eager", fullgraph=True)
        got = traced()
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, graphs._forward(bucket))
