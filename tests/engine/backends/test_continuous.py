"""Continuous batching: every job decodes as it would alone, whatever runs beside it.

Each test runs against every decoder: the growing left-padded cache
(``ContinuousDecoder``) and the fixed-shape slot cache (``SlotDecoder``),
with and without lookahead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from evoxtral_stream.engine.backends.base import BackendError, Done, Job, SteppingBackend
from evoxtral_stream.engine.backends.voxtral.backend import NO_ADAPTER, VoxtralBackend
from evoxtral_stream.engine.backends.voxtral.continuous import ContinuousDecoder, RowDecoder
from evoxtral_stream.engine.backends.voxtral.encoder import eager_encoder, encoder_parts
from evoxtral_stream.engine.backends.voxtral.prefill import PrefillGraphs
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

SR = 16_000
SECONDS = [0.7, 3.0, 12.0, 35.0, 5.0]  # 35 s: two encoder windows


def _audio(seconds: float, seed: int) -> npt.NDArray[np.float32]:
    """Seeded noise on 16-bit PCM values."""
    rng = np.random.default_rng(seed)
    pcm = rng.integers(-12000, 12000, round(seconds * SR), dtype=np.int16)
    return (pcm.astype(np.float32) / 32768).astype(np.float32)


def _jobs(adapter: str | None = None, seed: int = 0) -> list[Job]:
    return [Job(i, _audio(s, seed + i), adapter) for i, s in enumerate(SECONDS)]


def _alone(backend: VoxtralBackend, jobs: Sequence[Job]) -> dict[Job, Done]:
    return {job: backend.transcribe_jobs([job])[0] for job in jobs}


def _drain(dec: RowDecoder, out: dict[Job, Done], steps: int | None = None) -> None:
    """Step ``steps`` times (None: until nothing runs), collecting results."""
    n = 0
    while dec.active and (steps is None or n < steps):
        for d in dec.step():
            assert d.job not in out
            out[d.job] = d
        n += 1


@contextlib.contextmanager
def _forced(backend: VoxtralBackend) -> Iterator[None]:
    """EOS held back: every row runs to its budget (random weights never stop)."""
    backend.force_tokens = True
    try:
        yield
    finally:
        backend.force_tokens = False


def _admit(dec: RowDecoder, jobs: Sequence[Job], out: dict[Job, Done]) -> None:
    for d in dec.admit(jobs):
        out[d.job] = d


# "embedded": the dynamic decoder whose prefill embeds the prompts itself
# (model.voxtral.encoder_graphs; on a GPU its encoder is replayed as CUDA graphs);
# "fixed": that, with the prompt prefill at fixed shapes too
# (model.voxtral.prefill_graphs; CUDA graphs on a GPU), into the slot cache.
KINDS = ["dynamic", "slots", "lookahead", "embedded", "fixed"]


def make_decoder(backend: VoxtralBackend, kind: str) -> RowDecoder:
    if kind in ("dynamic", "embedded"):
        return ContinuousDecoder(backend)
    if kind == "fixed":
        return SlotDecoder(backend)
    return SlotDecoder(backend, lookahead=kind == "lookahead")


@pytest.fixture(params=KINDS)
def dec(merged: VoxtralBackend, request: pytest.FixtureRequest) -> Iterator[RowDecoder]:
    """A fresh decoder of each kind, installed as the merged backend's own for
    the test (so the backend's delegating methods reach it)."""
    saved = merged._decoder, merged._encoder, merged._prefill_graphs
    merged._decoder = make_decoder(merged, request.param)
    if request.param in ("embedded", "fixed"):
        merged._encoder = eager_encoder(encoder_parts(merged.model)[0])
    if request.param == "fixed":
        merged._prefill_graphs = _fixed_prefill(merged)
    yield merged._decoder
    merged._decoder.abort()
    merged._decoder, merged._encoder, merged._prefill_graphs = saved


def _fixed_prefill(backend: VoxtralBackend) -> PrefillGraphs:
    """What model.voxtral.prefill_graphs gives ``backend``."""
    # (merge_lora only to pass the config's checks: the route follows whatever
    # adapter the model runs, eagerly.)
    cfg = dataclasses.replace(backend._cfg, encoder_graphs=True, prefill_graphs=True,
                              merge_lora=True, adapters={})
    graphs = VoxtralBackend(backend.loaded, cfg).prefill_graphs
    assert graphs is not None
    return graphs


@pytest.fixture(scope="module")
def jobs() -> list[Job]:
    return _jobs()


@pytest.fixture(scope="module")
def plain(merged: VoxtralBackend, jobs: list[Job]) -> dict[Job, Done]:
    """What ``transcribe_jobs`` gives each job alone."""
    ref = _alone(merged, jobs)
    assert len({d.text for d in ref.values()}) == len(jobs), "the model must tell inputs apart"
    assert all(d.tokens for d in ref.values())
    return ref


def test_backend_is_stepping_and_delegates(merged: VoxtralBackend) -> None:
    assert isinstance(merged, SteppingBackend)
    assert isinstance(merged.decoder, ContinuousDecoder)
    assert merged.decoder is merged.decoder
    assert merged.active == 0
    assert merged.step() == []


def test_admitted_together_equals_alone(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    before = merged.tokens_generated
    out: dict[Job, Done] = {}
    _admit(dec, jobs, out)
    assert dec.active + len(out) == len(jobs)
    _drain(dec, out)
    assert out == plain
    assert merged.tokens_generated - before == sum(d.tokens for d in plain.values())
    assert dec.active == 0
    assert not isinstance(dec, ContinuousDecoder) or dec.width == 0
    assert dec.step() == []


@pytest.mark.parametrize(
    "schedule",
    [
        [([0, 1, 2], 3), ([3, 4], None)],
        [([3], 10), ([0], 2), ([1, 2, 4], None)],
        [([2], 1), ([4], 1), ([0], 1), ([1], 1), ([3], None)],
    ],
    ids=["short-first", "long-first", "one-by-one"],
)
def test_staggered_equals_alone(
    dec: RowDecoder,
    jobs: list[Job],
    plain: dict[Job, Done],
    schedule: list[tuple[list[int], int | None]],
) -> None:
    out: dict[Job, Done] = {}
    for idx, steps in schedule:
        _admit(dec, [jobs[i] for i in idx], out)
        _drain(dec, out, steps)
    assert out == plain


def test_rows_in_other_languages_decode_as_alone(merged: VoxtralBackend, dec: RowDecoder) -> None:
    codes = ["fr", None, "de", "auto", "en"]
    jobs = [Job(i, _audio(s, 40 + i), language=c)
            for i, (s, c) in enumerate(zip(SECONDS, codes, strict=True))]
    alone = _alone(merged, jobs)
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:2], out)
    _drain(dec, out, 2)
    _admit(dec, jobs[2:], out)
    _drain(dec, out)
    assert out == alone


def test_prefix_is_continued(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    prefixed: list[Job] = []
    exact: list[tuple[Job, Job]] = []  # prefixes that tokenize back to the plain tokens
    for job in jobs:
        tokens = merged.generate_tokens([job.audio])[0]
        k = min(3, len(tokens) - 1)
        pj = Job(job.key, job.audio, prefix=merged.decode(tokens[:k]))
        assert pj.prefix.strip()
        prefixed.append(pj)
        if merged.encode_prefix(pj.prefix) == tokens[:k]:
            exact.append((job, pj))
    assert exact, "no prefix round-trips through the tokenizer"
    want = _alone(merged, prefixed)
    out: dict[Job, Done] = {}
    # Prefixed rows beside plain ones, admitted at different times.
    _admit(dec, [prefixed[3], jobs[0]], out)
    _drain(dec, out, 2)
    _admit(dec, [*prefixed[:3], prefixed[4], jobs[2]], out)
    _drain(dec, out)
    assert {j: out[j] for j in prefixed} == want
    assert out[jobs[0]] == plain[jobs[0]]
    assert out[jobs[2]] == plain[jobs[2]]
    for job, pj in exact:
        assert out[pj].text == plain[job].text
        assert out[pj].tokens == plain[job].tokens - len(merged.encode_prefix(pj.prefix))


@pytest.fixture
def eos_prone(merged: VoxtralBackend, jobs: list[Job]) -> Iterator[None]:
    """The merged model made to write EOS where the 35 s job's second token would
    win (random weights never stop by themselves); restored afterwards."""
    head = merged.model.lm_head.weight  # type: ignore[union-attr]
    assert isinstance(head, torch.Tensor)
    eos = merged.spec.eos
    token = merged.generate_tokens([jobs[3].audio])[0][1]
    saved = head[eos].clone()
    with torch.no_grad():
        head[eos] = head[token] * 1.05
    try:
        yield
    finally:
        with torch.no_grad():
            head[eos] = saved


@pytest.mark.usefixtures("eos_prone")
def test_rows_end_at_eos(merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job]) -> None:
    want = _alone(merged, jobs)
    budgets = {job: merged.row_budget(len(job.audio), 0) for job in jobs}
    assert any(0 < want[j].tokens < budgets[j] for j in jobs), "no row ends early"
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:2], out)
    _drain(dec, out, 1)
    _admit(dec, jobs[2:], out)
    _drain(dec, out)
    assert out == want


@pytest.mark.usefixtures("eos_prone")
def test_force_tokens_fills_every_budget(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job]
) -> None:
    with _forced(merged):
        want = _alone(merged, jobs)
        out: dict[Job, Done] = {}
        _admit(dec, jobs[:2], out)
        _drain(dec, out, 1)
        _admit(dec, jobs[2:], out)
        _drain(dec, out)
    assert out == want
    for job in jobs:
        assert out[job].tokens == merged.row_budget(len(job.audio), 0)


def test_long_rows_leaving_trim_the_cache(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job]
) -> None:
    if not isinstance(dec, ContinuousDecoder):
        pytest.skip("the left-padded cache only")
    long, short = jobs[3], jobs[2]  # 35 s (two windows, 70 tokens), 12 s (24 tokens)
    long_prompt = len(merged.spec.ids(len(long.audio)))
    short_prompt = len(merged.spec.ids(len(short.audio)))
    assert long_prompt > short_prompt + 300
    merged.force_tokens = True  # fixed lengths: every row runs to its budget
    try:
        out: dict[Job, Done] = {}
        _admit(dec, [long], out)
        _drain(dec, out, 60)
        assert dec.width == long_prompt + 60
        _admit(dec, [short], out)
        assert dec.width == long_prompt + 60  # the short row is left-padded
        _drain(dec, out, 9)  # the long row's 70th token
        assert list(out) == [long]
        assert dec.active == 1
        # The short row needs its prompt and the 9 tokens fed since.
        assert dec.width == short_prompt + 9
        assert dec._batch is not None
        assert dec._batch.cache.get_seq_length() == dec.width
        _drain(dec, out)
    finally:
        merged.force_tokens = False
    assert [d.tokens for d in out.values()] == [70, 24]


def test_cancel_leaves_the_others_unchanged(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    out: dict[Job, Done] = {}
    _admit(dec, jobs, out)
    _drain(dec, out, 2)
    assert dec.cancel(jobs[3])
    assert not dec.cancel(jobs[3])
    assert not dec.cancel(Job("stranger", jobs[0].audio))
    if isinstance(dec, ContinuousDecoder):
        # Without the two-window row the cache shrinks to the longest 30 s prompt.
        assert dec.width <= len(merged.spec.ids(SR)) + 2
    assert merged.cancel(jobs[2])  # the backend delegates
    _drain(dec, out)
    assert out == {j: plain[j] for j in jobs if j not in (jobs[2], jobs[3])}
    assert not dec.cancel(jobs[0])


def test_abort_returns_the_running_jobs_and_leaves_it_reusable(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    out: dict[Job, Done] = {}
    _admit(dec, jobs[1:4], out)
    _drain(dec, out, 2)
    assert not out
    assert merged.abort() == jobs[1:4]
    assert dec.active == 0
    assert not isinstance(dec, ContinuousDecoder) or dec.width == 0
    assert dec.step() == []
    assert dec.abort() == []
    _admit(dec, jobs, out)
    _drain(dec, out)
    assert out == plain


def test_empty_audio_is_done_at_once(
    dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    empty = Job("empty", np.zeros(0, np.float32))
    assert dec.admit([empty]) == [Done(empty, "", 0)]
    assert dec.active == 0
    done = dec.admit([jobs[1], empty])
    assert done == [Done(empty, "", 0)]
    assert dec.active == 1
    out: dict[Job, Done] = {}
    _drain(dec, out)
    assert out == {jobs[1]: plain[jobs[1]]}


def test_refusals_change_nothing(dec: RowDecoder, jobs: list[Job]) -> None:
    _admit(dec, jobs[:2], {})
    with pytest.raises(BackendError, match="mono"):
        dec.admit([Job("stereo", np.zeros((100, 2), np.float32))])
    with pytest.raises(BackendError, match="twice"):
        dec.admit([jobs[0]])
    again = Job("again", jobs[2].audio)
    with pytest.raises(BackendError, match="twice"):
        dec.admit([again, again])
    with pytest.raises(BackendError, match="unknown adapter"):
        dec.can_admit(Job("rl", jobs[2].audio, "rl"))  # merged: one adapter only
    with pytest.raises(BackendError, match="unknown adapter"):
        dec.admit([Job("rl", jobs[2].audio, "rl")])
    assert dec.active == 2
    assert dec.can_admit(Job("default", jobs[2].audio, "default"))


@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_adapters_run_one_at_a_time(unmerged: VoxtralBackend, kind: str) -> None:
    dec = make_decoder(unmerged, kind)
    rl, none, default = _jobs("rl", seed=10), _jobs(NO_ADAPTER, seed=10), _jobs(seed=10)
    want = _alone(unmerged, [*rl, *none, *default])
    # The same audio through three adapters gives three transcripts.
    assert len({want[r].text for r in (rl[1], none[1], default[1])}) == 3
    out: dict[Job, Done] = {}
    if kind in ("embedded", "fixed"):  # the eager routes follow the adapter in use
        unmerged._encoder = eager_encoder(encoder_parts(unmerged.model)[0])
    if kind == "fixed":
        unmerged._prefill_graphs = _fixed_prefill(unmerged)
    try:
        _admit(dec, rl[:3], out)
        assert not dec.can_admit(none[0])
        assert not dec.can_admit(default[0])
        assert dec.can_admit(rl[3])
        with pytest.raises(BackendError, match="adapter"):
            dec.admit([none[0]])
        with pytest.raises(BackendError, match="adapter"):
            dec.admit([rl[3], none[0]])
        _drain(dec, out, 2)
        _admit(dec, rl[3:], out)
        _drain(dec, out)
        assert dec.can_admit(none[0])
        with pytest.raises(BackendError, match="adapter"):
            dec.admit([none[0], default[0]])  # one adapter per batch
        _admit(dec, none[:2], out)
        _drain(dec, out, 1)
        _admit(dec, none[2:], out)
        _drain(dec, out)
        # None and "default" name the same adapter.
        named = Job("named", default[1].audio, "default")
        _admit(dec, [default[0], named], out)
        assert dec.can_admit(default[2])
        _admit(dec, default[2:], out)
        _drain(dec, out)
    finally:
        dec.abort()
        unmerged._encoder, unmerged._prefill_graphs = None, None
    assert out.pop(named) == Done(named, want[default[1]].text, want[default[1]].tokens,
                                  want[default[1]].token_ids)
    assert out == {j: want[j] for j in want if j is not default[1]}


def test_out_of_memory_is_a_one_line_backend_error(
    merged: VoxtralBackend,
    dec: RowDecoder,
    jobs: list[Job],
    plain: dict[Job, Done],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore")

    out: dict[Job, Done] = {}
    _admit(dec, jobs[:2], out)
    with monkeypatch.context() as m:
        m.setattr(merged.model, "forward", oom)
        with pytest.raises(BackendError, match=r"^out of GPU memory decoding 2 requests") as e:
            dec.step()
        assert "\n" not in str(e.value)
        with pytest.raises(BackendError, match=r"^out of GPU memory admitting 1 requests") as e:
            dec.admit([jobs[2]])
        assert "(12.0 s longest) beside 2;" in str(e.value)
    # The failed forwards changed nothing: the running rows go on as before.
    assert dec.active == 2
    _drain(dec, out)
    assert out == {j: plain[j] for j in jobs[:2]}
    _admit(dec, jobs[2:4], out)
    with monkeypatch.context() as m:
        m.setattr(merged.model, "forward", oom)
        with pytest.raises(BackendError, match="out of GPU memory"):
            dec.step()
    assert dec.abort() == jobs[2:4]
    again: dict[Job, Done] = {}
    _admit(dec, jobs, again)
    _drain(dec, again)
    assert again == plain


def _drafted(merged: VoxtralBackend, jobs: Sequence[Job]) -> tuple[list[Job], dict[Job, int]]:
    """Each job with a draft: its own greedy tokens whole (jobs 0 and 3), cut
    short (job 1), wrong from the fourth on (job 2), or unrelated (job 4);
    and how many draft tokens a decoder keeps for it."""
    drafted: list[Job] = []
    keeps: dict[Job, int] = {}
    for i, job in enumerate(jobs):
        tokens = merged.generate_tokens([job.audio])[0]
        assert len(tokens) > 4
        if i == 1:
            draft = tokens[:2]
        elif i == 2:
            draft = [*tokens[:3], tokens[3] + 1, *tokens[4:]]
        elif i == 4:
            draft = [t + 7 for t in tokens[::-1]]
        else:
            draft = tokens
        dj = Job(job.key, job.audio, draft=tuple(draft))
        drafted.append(dj)
        budget = merged.row_budget(len(job.audio), 0)
        sent = draft[: budget - 1]
        keep = 0
        while keep < len(sent) and sent[keep] == tokens[keep]:
            keep += 1
        keeps[dj] = keep
    return drafted, keeps


def test_drafts_are_kept_as_far_as_greedy_agrees_and_change_nothing(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    drafted, keeps = _drafted(merged, jobs)
    for i in (0, 3):  # whole outputs: all kept but the last, which the prefill gives
        assert keeps[drafted[i]] == len(drafted[i].draft) - 1 >= 3
    assert (keeps[drafted[1]], keeps[drafted[2]], keeps[drafted[4]]) == (2, 3, 0)
    proposed, kept = merged.draft_tokens, merged.draft_kept
    out: dict[Job, Done] = {}
    # Drafted rows beside a plain one, admitted into a running batch.
    _admit(dec, [drafted[3], jobs[1]], out)
    _drain(dec, out, 2)
    _admit(dec, [*drafted[:3], drafted[4]], out)
    _drain(dec, out)
    for job, dj in zip(jobs, drafted, strict=True):
        assert (out[dj].text, out[dj].tokens, out[dj].token_ids) == (
            plain[job].text, plain[job].tokens, plain[job].token_ids)
    assert out[jobs[1]] == plain[jobs[1]]
    assert merged.draft_kept - kept == sum(keeps.values())
    assert merged.draft_tokens - proposed == sum(
        min(len(d.draft), merged.row_budget(len(d.audio), 0) - 1) for d in drafted)


def test_done_reports_the_token_ids_a_draft_is_made_of(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    out: dict[Job, Done] = {}
    _admit(dec, jobs[:2], out)
    _drain(dec, out)
    for job in jobs[:2]:
        assert list(out[job].token_ids) == merged.generate_tokens([job.audio])[0]
        assert merged.decode(out[job].token_ids).strip() == plain[job].text


def test_a_short_draft_then_decodes_on(merged: VoxtralBackend, dec: RowDecoder,
                                       jobs: list[Job], plain: dict[Job, Done]) -> None:
    drafted, keeps = _drafted(merged, jobs)
    out: dict[Job, Done] = {}
    _admit(dec, [drafted[1]], out)
    row = dec.rows[0]
    assert len(row.tokens) == keeps[drafted[1]] + 1  # the kept draft and the next token
    _drain(dec, out)
    assert (out[drafted[1]].text, out[drafted[1]].tokens) == (plain[jobs[1]].text,
                                                              plain[jobs[1]].tokens)


@pytest.mark.usefixtures("eos_prone")
def test_a_draft_past_the_end_of_speech_stops_at_eos(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job]
) -> None:
    want = _alone(merged, jobs)
    job = jobs[3]
    assert 0 < want[job].tokens < merged.row_budget(len(job.audio), 0)
    # A draft that goes on past where greedy writes EOS.
    with _forced(merged):
        longer = merged.generate_tokens([job.audio])[0]
    assert len(longer) > want[job].tokens
    dj = Job(job.key, job.audio, draft=tuple(longer))
    out: dict[Job, Done] = {}
    _admit(dec, [dj, jobs[0]], out)
    _drain(dec, out)
    assert (out[dj].text, out[dj].tokens) == (want[job].text, want[job].tokens)
    assert out[jobs[0]] == want[jobs[0]]


def test_forced_rows_keep_at_most_their_budget(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job]
) -> None:
    with _forced(merged):
        want = _alone(merged, jobs)
        # Each draft longer than its budget: the whole forced output twice.
        drafted = [Job(j.key, j.audio, draft=tuple(merged.generate_tokens([j.audio])[0] * 2))
                   for j in jobs]
        out: dict[Job, Done] = {}
        _admit(dec, drafted, out)
        done_at_admission = set(out)
        _drain(dec, out)
    for job, dj in zip(jobs, drafted, strict=True):
        assert (out[dj].text, out[dj].tokens) == (want[job].text, want[job].tokens)
        assert out[dj].tokens == merged.row_budget(len(job.audio), 0)
    # Every row kept its whole budget but one from the draft, and the prefill
    # gave the last token: all done at admission, no step needed.
    assert done_at_admission == set(drafted)


def test_batch_path_ignores_drafts(merged: VoxtralBackend, jobs: list[Job],
                                   plain: dict[Job, Done]) -> None:
    drafted, _ = _drafted(merged, jobs)
    done = merged.transcribe_jobs(drafted)
    for job, d in zip(jobs, done, strict=True):
        assert (d.text, d.tokens) == (plain[job].text, plain[job].tokens)


def test_encoder_graphs_on_the_cpu_take_the_embedding_route_eagerly(
    merged: VoxtralBackend, jobs: list[Job], plain: dict[Job, Done]
) -> None:
    from evoxtral_stream.engine.backends.voxtral.encoder import EncoderGraphs

    assert merged.encoder is None  # off by default: the model's own forward
    backend = VoxtralBackend(merged.loaded,
                             dataclasses.replace(merged._cfg, encoder_graphs=True))
    assert backend.encoder is not None and not isinstance(backend.encoder, EncoderGraphs)
    assert backend.warm_up(4) == "nothing to warm up"  # nothing is captured on the CPU
    out: dict[Job, Done] = {}
    _admit(backend.decoder, jobs, out)
    _drain(backend.decoder, out)
    assert out == plain


def test_a_repetition_loop_is_cut_back_by_every_decoder(
    merged: VoxtralBackend, dec: RowDecoder, jobs: list[Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy decoding loops until the budget; random weights loop in
    tokens that make no words, so the tokenizer is made to read a loop."""
    monkeypatch.setattr(merged, "decode", lambda tokens: "So" + " [laughs]" * 12 + " [lau")
    committed = Job("committed", jobs[1].audio, prefix="So [laughs] [laughs] [laughs] [laughs]")
    batch = [jobs[0], jobs[1], committed]
    want = {jobs[0]: "So [laughs] [laughs] [laughs]", jobs[1]: "So [laughs] [laughs] [laughs]",
            committed: committed.prefix}
    out: dict[Job, Done] = {}
    _admit(dec, batch, out)
    _drain(dec, out)
    assert {job: d.text for job, d in out.items()} == want
    assert {d.job: d.text for d in merged.transcribe_jobs(batch)} == want
