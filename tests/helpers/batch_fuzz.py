"""A seeded random fuzz of the Voxtral backend's batched decode paths.

Greedy decoding gives a request the same tokens alone as in any batch, with
any other requests joining and leaving at any step. :func:`draw` makes, from
a seed, a :class:`Case`: the backend's token budget (rate and minimum), an
end-of-text mode (free, EOS held back so that every row fills its budget,
or a model made to write EOS often), the slot cache's geometry (its first
slot count, how its ring's columns are rounded, where its write column
starts), a few requests (audio from one sample to two 30 s windows, many
right around the window limit, empty audio; random languages, prefixes
from one word to longer than the budget, whitespace-only ones; in some
cases adapters, on the unmerged model) and a schedule: admissions, steps,
cancels of running and of finished jobs, aborts whose jobs come back as
new requests, runs until idle, and one more admission after the last.

:func:`run` decodes each request alone (``transcribe_jobs`` of that one
job: the model's own ``generate``; and a :class:`ContinuousDecoder` with
nothing beside it, to record the logits of each token), then plays the
schedule through each decoder configuration, each job with a draft made
from its request's alone tokens (none mostly; all of them, cut short,
wrong from some token on, unrelated, longer than its budget, with an EOS
where they end), and decodes every request in one batched
``transcribe_jobs``. It returns a :class:`Report`
whose problems (empty: none) name the configuration, the job and the
request, so a failing seed can be read and rerun.

Checked, per configuration: every job neither cancelled nor aborted ends
exactly once, with the alone text, token count and token ids, and drafted
and kept as its draft and its alone tokens say; with EOS held back its
count is its budget; ``can_admit`` is True exactly when the job's adapter
may join; ``cancel`` is True exactly for a running job, and nothing comes
back for it; ``abort`` returns exactly the running jobs; at the end
nothing runs and a step does nothing. And the logits: each token of a
finished job was picked from logits within :data:`LOGITS_TOL` of the alone
ones (a fingerprint of them: their maximum, EOS's and a fixed sample of
the vocabulary). Most batching slips (a column of another row or of
padding attended to, a key dropped, a position off by one) move logits by
far more than that but change a greedy token only now and then: the tiny
model's top two logits are often a few hundredths apart.

Near-ties: the batched paths add the same numbers in other orders, so a
logit may differ from the alone one in its last bits. Where a job's tokens
part from the alone ones, the alone model is run on the tokens before the
parting; if the token the batch took scores within :data:`TIE` of the alone
argmax there, it is a tie (in :attr:`Report.ties`, not a problem) and
the job's later tokens and logits are not compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from unittest import mock

import numpy as np
import numpy.typing as npt
import torch

from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral import slots
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend
from evoxtral_stream.engine.backends.voxtral.continuous import ContinuousDecoder, RowDecoder
from evoxtral_stream.engine.backends.voxtral.prompt import LANGUAGES
from evoxtral_stream.engine.backends.voxtral.slots import SlotDecoder

__all__ = ["CONFIGS", "LOGITS_TOL", "TIE", "Case", "Config", "Report", "draw", "run"]

SR = 16_000
WINDOW = 30 * SR

Config = Literal["dynamic", "slots", "lookahead", "embedded", "fixed", "compiled"]
CONFIGS: tuple[Config, ...] = ("dynamic", "slots", "lookahead", "embedded", "fixed")
"""The decoders tests/engine/backends/test_continuous.py runs: the growing
left-padded cache; the slot cache, without and with lookahead; the prefill
embedding the prompts itself (``encoder_graphs``), and that at fixed shapes
into the slot cache (``prefill_graphs``). ``compiled`` (the slot cache's
step compiled with ``aot_eager``; its logits are not recorded, the step
being one graph) costs seconds per shape, so it has its own test.
``embedded`` and ``fixed`` need merged LoRA: cases with adapters skip them."""

LOGITS_TOL = 5e-4
"""How far a batched logit may be from the alone one. The tiny model's
float32 logits are of order 1 (up to about 8); batched, summed in other
orders, they differed from alone by at most 3e-5 over 200 seeds; the
slips the fuzz was tried on (a position, a mask or a ring column off by
one, a row's cache moved wrongly) moved them by 8e-3 or more."""

TIE = LOGITS_TOL
"""How far below the alone argmax a token the batch took may score and
still count as a near-tie (its logits are still held to LOGITS_TOL)."""

Mode = Literal["free", "forced", "eos"]
MODES: tuple[Mode, ...] = ("free", "forced", "eos")
DRAFTS = ("none", "whole", "cut", "wrong", "unrelated", "twice", "eos")
WORDS = ("yes", "hello", "world", "we", "never", "café", "日本", "ok.", "[laughs]", "no-one")
ADAPTERS = (None, "default", "none", "rl")
"""Adapters a request of an unmerged case names (the ``unmerged`` fixture's)."""


@dataclass(frozen=True)
class Request:
    """What one request asks (each of its jobs may add a draft)."""

    samples: int
    audio_seed: int
    language: str | None
    prefix: str
    adapter: str | None = None

    def audio(self) -> npt.NDArray[np.float32]:
        """Seeded noise on 16-bit PCM values with a tone that differs per request."""
        rng = np.random.default_rng(self.audio_seed)
        pcm = rng.integers(-9000, 9000, self.samples, dtype=np.int16).astype(np.float32)
        t = np.arange(self.samples) / SR
        pcm += 8000 * np.sin(2 * np.pi * (120 + self.audio_seed % 97 * 13) * t)
        return (np.round(pcm) / 32768).astype(np.float32)

    def label(self) -> str:
        parts = [f"{self.samples} samples ({self.samples / SR:.3f} s)"]
        if self.language is not None:
            parts.append(f"language {self.language!r}")
        if self.prefix:
            parts.append(f"prefix {self.prefix!r}")
        if self.adapter is not None:
            parts.append(f"adapter {self.adapter!r}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Action:
    """One thing the owner of a decoder does.

    ``admit``: new jobs of ``requests`` with drafts of kinds ``drafts``
    (see :func:`_draft`), after those waiting (an abort's resubmissions,
    without drafts; jobs whose adapter could not join); only the jobs that
    may join are admitted, the others wait. ``step``: ``n`` steps.
    ``cancel``: the ``n``-th (modulo) running job, or with ``finished`` the
    ``n``-th job submitted. ``abort``: its jobs wait to come back as new
    ones when ``resubmit``. ``drain``: steps until nothing runs, then admit
    what waits, until nothing does.
    """

    kind: Literal["admit", "step", "cancel", "abort", "drain"]
    requests: tuple[int, ...] = ()
    drafts: tuple[str, ...] = ()
    n: int = 0
    finished: bool = False
    resubmit: bool = False

    def __str__(self) -> str:
        if self.kind == "admit":
            return "admit " + ", ".join(
                str(i) + ("" if d == "none" else f" (draft {d})")
                for i, d in zip(self.requests, self.drafts, strict=True))
        if self.kind == "step":
            return f"step x{self.n}"
        if self.kind == "cancel":
            return f"cancel {'submitted' if self.finished else 'running'} #{self.n}"
        if self.kind == "abort":
            return "abort" + (" (resubmit)" if self.resubmit else "")
        return "drain"


@dataclass(frozen=True)
class Case:
    """Everything a seed draws."""

    seed: int
    tokens_per_second: float
    min_new_tokens: int
    mode: Mode
    eos_scale: float
    adapters: bool
    """Requests name adapters: the case runs on the unmerged model."""
    requests: tuple[Request, ...]
    actions: tuple[Action, ...]
    ring_start: float
    """Where a slot decoder's write column starts, as a fraction of its
    ring (any column is as good): near 1 it wraps past the ring's end mid-run."""
    first_slots: int
    """The slot cache's first slot count (8 shipped): fewer rows make it
    grow and change buckets."""
    quantum: int
    """What the slot cache's columns are rounded up to (128 shipped); 1
    makes a ring no longer than its longest row needs."""

    def describe(self) -> str:
        head = (f"seed {self.seed}: {self.tokens_per_second} tokens/s, min "
                f"{self.min_new_tokens}, {self.mode}"
                + (f" (EOS head x{self.eos_scale})" if self.mode == "eos" else "")
                + (", unmerged" if self.adapters else "")
                + f"; slot ring starts at {self.ring_start:.2f}, {self.first_slots} first "
                f"slots, columns in {self.quantum}s")
        lines = [head, *(f"  request {i}: {r.label()}" for i, r in enumerate(self.requests))]
        lines.append("  schedule: " + "; ".join(map(str, self.actions)))
        return "\n".join(lines)


@dataclass
class Report:
    """What :func:`run` found."""

    problems: list[str] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    closest: float = 0.0
    """The largest distance of a batched logits fingerprint from its alone
    one that passed (to see how much room :data:`LOGITS_TOL` leaves)."""


# --- drawing ----------------------------------------------------------------


def _samples(rng: random.Random) -> int:
    kind = rng.choices(["tiny", "short", "medium", "window", "two", "empty"],
                       weights=[3, 3, 3, 4, 1, 1])[0]
    if kind == "tiny":
        return rng.randint(1, 800)
    if kind == "short":
        return rng.randint(800, 2 * SR)
    if kind == "medium":
        return rng.randint(2 * SR, 25 * SR)
    if kind == "window":  # a window exactly, or just either side of it
        return WINDOW + rng.choice([0, 0, 1, -1, rng.randint(-400, 400)])
    if kind == "two":  # two windows: a prompt longer than the slot cache's first ring
        return rng.choice([WINDOW + 1, 2 * WINDOW, rng.randint(WINDOW + 1, 2 * WINDOW)])
    return 0


def _prefix(rng: random.Random) -> str:
    kind = rng.choices(["none", "words", "long", "blank"], weights=[6, 2, 1, 1])[0]
    if kind == "words":
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    if kind == "long":  # likely longer than the budget: a budget of one token
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
    if kind == "blank":  # no tokens at all: decoded as without a prefix
        return rng.choice([" ", "\n\t "])
    return ""


def _schedule(rng: random.Random, n: int) -> tuple[Action, ...]:
    acts: list[Action] = []
    queue = list(range(n))
    rng.shuffle(queue)
    queue += [rng.randrange(n) for _ in range(rng.randint(0, 4))]  # resubmissions

    def chaos() -> None:
        r = rng.random()
        if r < 0.12:
            acts.append(Action("cancel", n=rng.randrange(64)))
        elif r < 0.17:
            acts.append(Action("cancel", n=rng.randrange(64), finished=True))
        elif r < 0.2:
            acts.append(Action("abort", resubmit=rng.random() < 0.7))
        elif r < 0.23:
            acts.append(Action("drain"))

    while queue:
        # Mostly a few steps apart: rows join while others run.
        k = min(len(queue), rng.choice([1, 1, 1, 2, 2, 3]))
        drafts = rng.choices(DRAFTS, weights=[6, 1, 1, 1, 1, 1, 1], k=k)
        acts.append(Action("admit", tuple(queue[:k]), tuple(drafts)))
        del queue[:k]
        chaos()
        acts.append(Action("step", n=rng.choice([0, 1, 1, 2, 2, 3, 4, 6, 10])))
        chaos()
    for _ in range(rng.randint(0, 3)):
        acts.append(Action("step", n=rng.randint(1, 4)))
        chaos()
    acts.append(Action("drain"))
    # The decoder is reusable: one more request once it went idle.
    acts.append(Action("admit", (rng.randrange(n),), ("none",)))
    acts.append(Action("drain"))
    return tuple(acts)


def draw(seed: int) -> Case:
    """The case of ``seed``: pure data, no model needed."""
    rng = random.Random(seed)
    adapters = rng.random() < 0.2
    requests = []
    # Mostly one adapter (None and "default" name the same one), so that
    # rows run together; now and then another, which waits for an idle batch.
    usual, rare = rng.sample(ADAPTERS, 2)
    for i in range(rng.randint(2, 4)):
        language = rng.choice(LANGUAGES) if rng.random() < 0.35 else None
        adapter = (usual if rng.random() < 0.7 else rare) if adapters else None
        requests.append(Request(_samples(rng), seed * 100 + i, language, _prefix(rng),
                                adapter))
    return Case(
        seed=seed,
        tokens_per_second=rng.choice([0.5, 0.75, 1.0]),
        min_new_tokens=rng.choice([4, 8, 12]),
        mode=rng.choices(MODES, weights=[2, 1, 1])[0],
        eos_scale=rng.choice([0.98, 1.0, 1.02]),
        adapters=adapters,
        requests=tuple(requests),
        actions=_schedule(rng, len(requests)),
        ring_start=rng.choice([0.0, rng.random(), 1.0 - rng.random() * 0.05]),
        first_slots=rng.choice([1, 2, 4, 8]),
        quantum=rng.choice([1, 16, 128]),
    )


# --- what each request gives alone --------------------------------------------


class _Logits:
    """Fingerprints of every logits row a decoder picks a token from: the
    row's maximum and its values at EOS and a fixed sample of the vocabulary."""

    def __init__(self, backend: VoxtralBackend) -> None:
        model: Any = backend.model
        vocab = int(model.config.get_text_config().vocab_size)
        self.ids = torch.tensor([backend.spec.eos, *random.Random(0).sample(range(vocab), 31)],
                                device=backend.loaded.device)
        self.rows: list[npt.NDArray[np.float64]] = []

    def record(self, dec: RowDecoder) -> None:
        """Record what ``dec`` picks from from now on (its eager picks only)."""
        pick = dec._pick

        def recording(logits: torch.Tensor) -> torch.Tensor:
            flat = logits.reshape(-1, logits.shape[-1])
            # Before the pick, which may hold EOS back in place.
            sample = torch.cat([flat.max(-1).values[:, None], flat[:, self.ids]], dim=1)
            self.rows.extend(sample.double().cpu().numpy())
            return pick(logits)

        dec._pick = recording  # type: ignore[method-assign]

    def matrix(self) -> npt.NDArray[np.float64]:
        return np.stack(self.rows) if self.rows else np.zeros((0, len(self.ids) + 1))


@dataclass(frozen=True)
class _Want:
    """What a request decodes to alone."""

    text: str
    tokens: int
    token_ids: tuple[int, ...]
    new: tuple[int, ...]
    """The generated tokens (token_ids without the prefix)."""
    budget: int
    prefixed: bool
    logits: tuple[npt.NDArray[np.float64], ...]
    """The fingerprint of each token's logits alone, and of EOS's when it ended there."""

    def drafted(self, samples: int, draft: Sequence[int]) -> tuple[int, int]:
        """Draft tokens a job with ``draft`` has checked and kept."""
        if not draft or not samples or self.prefixed:
            return 0, 0
        drafted = min(len(draft), self.budget - 1)
        kept = 0
        while kept < drafted and kept < len(self.new) and draft[kept] == self.new[kept]:
            kept += 1
        return drafted, kept


def _draft(kind: str, new: Sequence[int], budget: int, eos: int,
           rng: random.Random) -> tuple[int, ...]:
    toks = list(new)
    if kind == "none":
        return ()
    if kind == "unrelated" or not toks:
        return tuple(rng.randrange(1000, 100_000) for _ in range(rng.randint(1, budget + 2)))
    if kind == "whole":
        return tuple(toks)
    if kind == "cut":
        return tuple(toks[: rng.randint(1, len(toks))])
    if kind == "wrong":
        i = rng.randrange(len(toks))
        return tuple([*toks[:i], toks[i] ^ 1, *toks[i + 1:]])  # ^ 1: still in the vocabulary
    if kind == "twice":  # longer than the budget
        return tuple(toks * 2 + [toks[0]] * 3)
    # "eos": an EOS where the alone tokens end at EOS (a draft past the end of
    # speech), else anywhere; tokens after it.
    i = len(toks) if len(toks) < budget else rng.randint(0, len(toks))
    return tuple([*toks[:i], eos, *toks[i:], *toks[:2]])


def _expect(backend: VoxtralBackend, case: Case, report: Report, tie: _Tie) -> list[_Want]:
    """Each request decoded alone, by ``generate`` and by a lone continuous
    row (whose logits are recorded)."""
    wants = []
    for i, req in enumerate(case.requests):
        job = Job("alone", req.audio(), req.adapter, req.prefix, req.language)
        done = backend.transcribe_jobs([job])[0]
        pre = backend.encode_prefix(req.prefix)
        new = done.token_ids[len(pre):]
        budget = backend.row_budget(req.samples, len(pre))
        logits = _Logits(backend)
        lone = ContinuousDecoder(backend)
        logits.record(lone)
        out = lone.admit([job])
        while lone.active:
            out += lone.step()
        want = _Want(done.text, done.tokens, done.token_ids, tuple(new), budget, bool(pre), ())
        upto = _compare(f"request {i} alone, continuous", req, want, out[0], tie, report)
        wants.append(dataclasses.replace(want, logits=tuple(logits.rows[:upto])))
    return wants


class _Tie:
    """Tells a near-tie from a wrong token by the alone model's logits."""

    def __init__(self, backend: VoxtralBackend) -> None:
        self.backend = backend

    def margin(self, req: Request, want: _Want, got: Sequence[int]) -> tuple[int, float] | None:
        """Where ``got`` (token ids, prefix included) parts from the alone
        tokens, and how far below the alone token the alone model scores
        the batch's there; None when they do not part within the budget
        or the prefix differs."""
        backend = self.backend
        eos = backend.spec.eos
        pre = list(want.token_ids[: len(want.token_ids) - len(want.new)])
        if list(got[: len(pre)]) != pre:
            return None
        mine = list(got[len(pre):])
        alone = list(want.new) + ([eos] if len(want.new) < want.budget else [])
        batch = mine + ([eos] if len(mine) < want.budget else [])
        k = next((i for i, (a, b) in enumerate(zip(alone, batch, strict=False)) if a != b),
                 None)
        if k is None:
            return None
        ids = backend.spec.ids(req.samples, backend.language_ids(req.language)) + pre + alone[:k]
        device = backend.loaded.device
        with torch.inference_mode(), backend.use_adapter(req.adapter):
            out: Any = backend.model(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                input_features=backend.features([req.audio()]).to(backend.loaded.dtype),
                logits_to_keep=1,
            )
            logits = out.logits[0, -1].float()
            if backend.force_tokens:
                logits[eos] = float("-inf")
            return k, float(logits[alone[k]] - logits[batch[k]])


def _compare(where: str, req: Request, want: _Want, done: Done, tie: _Tie,
             report: Report, drafted: tuple[int, int] = (0, 0)) -> int | None:
    """Problems of ``done`` against ``want`` into ``report``; returns how many
    of its tokens' logits to compare (None: all), fewer after a tie."""
    got = (done.text, done.tokens, done.token_ids)
    if got != (want.text, want.tokens, want.token_ids):
        found = tie.margin(req, want, done.token_ids) if req.samples else None
        if found is not None and 0 <= found[1] <= TIE:
            report.ties.append(f"{where}: token {found[0]} differs by {found[1]:.2e}")
            return found[0] + 1
        why = "" if found is None else f" (token {found[0]}: alone's scores {found[1]:.3g} more)"
        report.problems.append(
            f"{where}: got {done.tokens} tokens {list(done.token_ids)} {done.text!r}, alone "
            f"{want.tokens} tokens {list(want.token_ids)} {want.text!r}{why}")
        return 0
    if (done.drafted, done.kept) != drafted:
        report.problems.append(f"{where}: drafted/kept {done.drafted}/{done.kept}, want "
                               f"{drafted[0]}/{drafted[1]}")
    if req.samples and tie.backend.force_tokens and done.tokens != want.budget:
        report.problems.append(f"{where}: {done.tokens} tokens with EOS held back, "
                               f"budget {want.budget}")
    return None


# --- playing a schedule -----------------------------------------------------------


@dataclass
class _Played:
    """What a schedule did: each finished job's request, and how many of
    its tokens' logits to compare."""

    finished: list[tuple[int, int | None]] = field(default_factory=list)


def _play(dec: RowDecoder, backend: VoxtralBackend, config: str, case: Case,
          wants: Sequence[_Want], tie: _Tie, report: Report) -> _Played:
    """The schedule through ``dec``; problems into ``report``."""
    played = _Played()
    submitted: list[Job] = []
    request_of: dict[Job, int] = {}
    running: list[Job] = []  # in submission order
    waiting: list[Job] = []
    seen: set[Job] = set()
    gone: dict[Job, str] = {}  # cancelled or aborted, and which
    steps = 0
    problems = report.problems

    def name(job: Job) -> str:
        return f"{config}, job #{submitted.index(job)} (request {request_of[job]})"

    def new(i: int, kind: str = "none") -> Job:
        req, want = case.requests[i], wants[i]
        # Seeded by the job's number: the same draft in every configuration.
        rng = random.Random(case.seed * 7919 + len(submitted))
        draft = _draft(kind, want.new, want.budget, backend.spec.eos, rng)
        job = Job(("fuzz", len(submitted)), req.audio(), req.adapter, req.prefix,
                  req.language, draft)
        submitted.append(job)
        request_of[job] = i
        return job

    def take(done: Sequence[Done], during: str) -> None:
        for d in done:
            job = d.job
            if job not in request_of:
                problems.append(f"{config}: {during} returned a job never submitted")
            elif job in seen:
                problems.append(f"{name(job)}: done twice ({during})")
            elif job in gone:
                problems.append(f"{name(job)}: done ({during}) after it was {gone[job]}")
            elif job not in running:
                problems.append(f"{name(job)}: done ({during}) but never admitted")
            else:
                seen.add(job)
                running.remove(job)
                i = request_of[job]
                req = case.requests[i]
                upto = _compare(f"{name(job)}, {during}", req, wants[i], d, tie, report,
                                wants[i].drafted(req.samples, job.draft))
                played.finished.append((i, upto))

    def admit(during: str) -> None:
        """Admit the waiting jobs whose adapter is the running one (nothing
        running: the first waiting job's), in order; the others wait."""
        if not waiting:
            return
        current = backend._adapter(running[0].adapter) if running else None
        for job in waiting:
            fits = current is None or backend._adapter(job.adapter) == current
            if dec.can_admit(job) != fits:
                problems.append(f"{name(job)}: can_admit said {not fits} ({during})")
        target = current or backend._adapter(waiting[0].adapter)
        jobs = [j for j in waiting if backend._adapter(j.adapter) == target]
        waiting[:] = [j for j in waiting if j not in jobs]
        running.extend(jobs)
        take(dec.admit(jobs), during)

    def step(during: str) -> None:
        nonlocal steps
        steps += 1
        take(dec.step(), during)

    for a, act in enumerate(case.actions):
        during = f"action {a} ({act})"
        if act.kind == "admit":
            waiting.extend(new(i, d) for i, d in zip(act.requests, act.drafts, strict=True))
            admit(during)
        elif act.kind == "step":
            for _ in range(act.n):
                step(during)
        elif act.kind == "cancel":
            pool = submitted if act.finished else running
            if pool:
                job = pool[act.n % len(pool)]
                expect = job in running
                if dec.cancel(job) != expect:
                    problems.append(f"{name(job)}: cancel said {not expect} ({during})")
                if expect:
                    running.remove(job)
                    gone[job] = "cancelled"
        elif act.kind == "abort":
            got = dec.abort()
            if sorted(map(id, got)) != sorted(map(id, running)):
                problems.append(f"{config}: {during} returned {len(got)} jobs, "
                                f"{len(running)} were running")
            for job in running:
                gone[job] = "aborted"
                if act.resubmit:
                    waiting.append(new(request_of[job]))
            running.clear()
        else:
            while (dec.active or waiting) and steps < 5000:
                if dec.active:
                    step(during)
                else:
                    admit(during)
        if dec.active != len(running):
            problems.append(f"{config}: after {during}: {dec.active} running, "
                            f"want {len(running)}")
        if problems:
            return played
    if dec.step() != [] or dec.active or waiting:
        problems.append(f"{config}: not idle at the end")
    for job in submitted:
        if job not in seen and job not in gone:
            problems.append(f"{name(job)}: never done")
    return played


def _check_logits(config: str, played: _Played, got: npt.NDArray[np.float64],
                  wants: Sequence[_Want], report: Report) -> None:
    """Every finished job's tokens came from logits within LOGITS_TOL of its
    alone ones: each alone fingerprint is matched by at least as many
    recorded rows as finished jobs needed it (others are padding, rows that
    ended, drafts cut)."""
    need: Counter[tuple[int, int]] = Counter()
    for i, upto in played.finished:
        have = len(wants[i].logits)
        for k in range(have if upto is None else min(have, upto)):
            need[i, k] += 1
    for (i, k), n in sorted(need.items()):
        dist = np.abs(got - wants[i].logits[k]).max(axis=1) if len(got) else np.zeros(0)
        close = np.sort(dist[~np.isnan(dist)])
        if len(close) < n or close[n - 1] > LOGITS_TOL:
            off = f"{close[min(n, len(close)) - 1]:.3g}" if len(close) else "nothing"
            report.problems.append(
                f"{config}: request {i}, token {k}: {n} finished job(s) need its alone "
                f"logits, the closest recorded {'is' if n == 1 else 'are'} {off} off")
            return
        report.closest = max(report.closest, float(close[n - 1]))


def _backend(base: VoxtralBackend, case: Case, config: Config | None) -> VoxtralBackend:
    """A backend over ``base``'s model for ``config`` (None: the reference)."""
    cfg = dataclasses.replace(
        base._cfg, tokens_per_second=case.tokens_per_second,
        min_new_tokens=case.min_new_tokens,
        static_cache=config in ("slots", "lookahead", "fixed", "compiled"),
        lookahead=config == "lookahead",
        encoder_graphs=config in ("embedded", "fixed"),
        prefill_graphs=config == "fixed",
        encoder_compile=False,
    )
    backend = VoxtralBackend(base.loaded, cfg)
    backend.force_tokens = case.mode == "forced"
    return backend


def _decoder(backend: VoxtralBackend, config: Config, case: Case,
             compiled: Callable[[VoxtralBackend], SlotDecoder] | None) -> RowDecoder:
    if config == "compiled":
        assert compiled is not None, "the compiled configuration needs a compiled decoder"
        dec: RowDecoder = compiled(backend)
    else:
        dec = backend.decoder
    if isinstance(dec, SlotDecoder):
        # Allocate the ring and put its write column where the case says.
        dec.warm_up(1)
        dec._col = min(dec.columns - 1, int(case.ring_start * dec.columns))
    return dec


@contextlib.contextmanager
def _eos_prone(backend: VoxtralBackend, case: Case) -> Iterator[None]:
    """In ``eos`` mode, EOS's row of the output head made a copy of a token
    the model writes (scaled by ``eos_scale``), so rows end at EOS at many
    points (random weights never write it); restored afterwards."""
    if case.mode != "eos":
        yield
        return
    model: Any = backend.model
    head = model.get_output_embeddings().weight
    eos = backend.spec.eos
    probe = next((r for r in case.requests if r.samples), case.requests[0])
    audio = dataclasses.replace(probe, samples=max(probe.samples, SR)).audio()
    tokens = backend.generate_tokens([audio], max_new_tokens=4)[0]
    token = tokens[random.Random(case.seed).randrange(len(tokens))]
    saved = head[eos].clone()
    with torch.no_grad():
        head[eos] = head[token] * case.eos_scale
    try:
        yield
    finally:
        with torch.no_grad():
            head[eos] = saved


@contextlib.contextmanager
def _slot_geometry(case: Case) -> Iterator[None]:
    """The slot cache's first slots and column rounding as the case says."""
    with (mock.patch.object(slots, "_FIRST_SLOTS", case.first_slots),
          mock.patch.object(slots, "_COLUMN_QUANTUM", case.quantum)):
        yield


def run(case: Case, merged: VoxtralBackend, unmerged: VoxtralBackend | None = None,
        configs: Sequence[Config] = CONFIGS,
        compiled: Callable[[VoxtralBackend], SlotDecoder] | None = None) -> Report:
    """Play ``case`` through each configuration of ``configs`` on the model
    of ``merged`` (``unmerged``'s when the case names adapters), and decode
    its requests in one batched ``transcribe_jobs``. ``compiled`` makes the
    decoder of the ``compiled`` configuration for a backend."""
    report = Report()
    base = merged
    if case.adapters:
        assert unmerged is not None, "a case with adapters needs the unmerged model"
        base = unmerged
        configs = [c for c in configs if c not in ("embedded", "fixed")]
    ref = _backend(base, case, None)
    tie = _Tie(ref)
    with _eos_prone(ref, case), _slot_geometry(case):
        wants = _expect(ref, case, report, tie)
        # Every request and one again, in one generate call per adapter.
        reqs = [*range(len(case.requests)),
                *random.Random(case.seed).choices(range(len(case.requests)), k=1)]
        jobs = [Job(i, r.audio(), r.adapter, r.prefix, r.language)
                for i, r in ((i, case.requests[i]) for i in reqs)]
        for i, done in zip(reqs, ref.transcribe_jobs(jobs), strict=True):
            _compare(f"transcribe_jobs of {len(jobs)}, request {i}", case.requests[i],
                     wants[i], done, tie, report)
        for config in configs:
            backend = _backend(base, case, config)
            dec = _decoder(backend, config, case, compiled)
            logits = _Logits(backend)
            if config != "compiled":
                logits.record(dec)
            try:
                played = _play(dec, backend, config, case, wants, tie, report)
            finally:
                dec.abort()
            if config != "compiled" and not report.problems:
                _check_logits(config, played, logits.matrix(), wants, report)
    return report
