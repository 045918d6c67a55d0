"""Continuous batching for the Voxtral backend: jobs join and leave between steps.

:class:`ContinuousDecoder` runs its own greedy loop instead of ``generate``.
New jobs are prefilled together (one audio-encoder pass for every window of
every new job) into a fresh KV cache, which is then merged into the running
batch; each :meth:`ContinuousDecoder.step` feeds every running row its last
token. Rows of different lengths share one cache by left padding: a row's
real tokens are the last columns of its cache row, the columns before them
are zeros that the attention mask hides, and each row's positions count its
real tokens from 0, exactly as ``generate`` numbers left-padded prompts. So
a job decodes to the same tokens whatever else runs beside it.

Finished rows leave the batch at once, and the leading columns no remaining
row needs are cut off, so the cache is never wider than the longest running
row.

:class:`RowDecoder` is what both decoders share (admission rules, the batched
prefill, greedy picks, finishing rows); :class:`.slots.SlotDecoder` keeps its
rows in a fixed-shape cache instead.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import torch

from evoxtral_stream.engine.backends.base import BackendError, Done, Job

from .encoder import embed_prompts

if TYPE_CHECKING:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from .backend import VoxtralBackend

__all__ = ["ContinuousDecoder", "RowDecoder"]

Audio = npt.NDArray[np.float32]


@dataclass(eq=False)
class _Row:
    """One running job: what it continues from, what it generated, how long it is."""

    job: Job
    prefix: list[int]
    budget: int
    length: int
    """Real (unpadded) tokens of this row in the cache."""
    tokens: list[int] = field(default_factory=list)
    drafted: int = 0
    """Draft tokens checked at admission (the first ``kept`` of ``tokens`` came from them)."""
    kept: int = 0


@dataclass(eq=False)
class _Batch:
    """Rows sharing one left-padded KV cache, all waiting for their next token.

    ``mask`` is (rows, width) with a row's ones in its last ``length``
    columns; ``pos`` is each row's position for the token in ``next``, which
    is not in the cache yet.
    """

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor
    pos: torch.Tensor
    next: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (ascending, non-empty) and cut the leading
        columns that are padding in all of them."""
        rows = [self.rows[i] for i in keep]
        # Lengths live on the host, so trimming costs no device sync.
        cut = self.width - max(r.length for r in rows)
        if len(rows) == len(self.rows) and not cut:
            return
        idx = torch.tensor(keep, dtype=torch.long).to(self.mask.device, non_blocking=True)
        # Indexing copies, so the old, wider tensors are freed at once. All
        # copies are made before any is kept: out of memory changes nothing.
        kv = [(k[idx, :, cut:], v[idx, :, cut:]) for k, v in map(_kv, _layers(self.cache))]
        mask, pos, nxt = self.mask[idx, cut:], self.pos[idx], self.next[idx]
        for layer, (k, v) in zip(_layers(self.cache), kv, strict=True):
            layer.keys, layer.values = k, v
        self.mask, self.pos, self.next, self.rows = mask, pos, nxt, rows

    def merge(self, other: _Batch) -> None:
        """Append ``other``'s rows, left-padding both caches to one width;
        out of memory changes nothing."""
        width = max(self.width, other.width)
        kv = [
            (_stack(k1, k2, width), _stack(v1, v2, width))
            for (k1, v1), (k2, v2) in zip(
                map(_kv, _layers(self.cache)), map(_kv, _layers(other.cache)), strict=True
            )
        ]
        mask = _stack(self.mask, other.mask, width)
        pos = torch.cat([self.pos, other.pos])
        nxt = torch.cat([self.next, other.next])
        for layer, (k, v) in zip(_layers(self.cache), kv, strict=True):
            layer.keys, layer.values = k, v
        self.mask, self.pos, self.next = mask, pos, nxt
        self.rows = self.rows + other.rows


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # ContinuousDecoder checks that every layer is a plain DynamicLayer.
    return cast("list[DynamicLayer]", cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's (batch, heads, columns, dim) keys and values."""
    assert layer.keys is not None
    assert layer.values is not None
    return layer.keys, layer.values


def _fill(cache: DynamicCache, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give an empty cache's layers ``keys[l]`` and ``values[l]`` as they
    are, without a copy per layer (what ``update`` would make)."""
    for layer, k, v in zip(_layers(cache), keys, values, strict=True):
        layer.lazy_initialization(k, v)  # transformers 5.24's DynamicLayer (pinned)
        layer.keys, layer.values = k, v


def _stack(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """``a`` over ``b`` along the batch, each right-aligned in ``width`` columns
    of the sequence dimension (the third of four, or the second of two)."""
    seq = 2 if a.dim() == 4 else 1
    shape = list(a.shape)
    shape[0] = a.shape[0] + b.shape[0]
    shape[seq] = width
    out = a.new_zeros(shape)
    out[: a.shape[0]].narrow(seq, width - a.shape[seq], a.shape[seq]).copy_(a)
    out[a.shape[0] :].narrow(seq, width - b.shape[seq], b.shape[seq]).copy_(b)
    return out


def _cut_tails(cache: DynamicCache, mask: torch.Tensor, cut: Sequence[int]) -> torch.Tensor:
    """Drop the last ``cut[r]`` columns of row ``r`` from a left-padded cache.

    Each row moves right by its cut, so its kept tokens stay the last
    columns; the columns it leaves at the front become padding. Returns the
    new mask (the layers are changed in place).
    """
    width = mask.shape[1]
    shift = torch.tensor(list(cut), dtype=torch.long).to(mask.device, non_blocking=True)
    src = torch.arange(width, device=mask.device)[None, :] - shift[:, None]
    inside = src >= 0
    src = src.clamp(min=0)
    for layer in _layers(cache):
        k, v = _kv(layer)
        index = src[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3])
        layer.keys, layer.values = k.gather(2, index), v.gather(2, index)
    return mask.gather(1, src) * inside


def _as_audio(a: npt.NDArray[Any]) -> Audio:
    arr = np.asarray(a, dtype=np.float32)
    if arr.ndim != 1:
        raise BackendError(f"audio must be mono (1-D), got shape {arr.shape}")
    return arr


class RowDecoder(abc.ABC):
    """What every continuous-batching decoder shares: admission rules, the
    batched prefill, greedy picking and finishing rows.

    Subclasses keep the running rows' KV cache: :meth:`_join` takes freshly
    prefilled rows in, :meth:`_decode` feeds every running row its next token,
    :meth:`_keep` drops rows. One thread only.
    """

    def __init__(self, backend: VoxtralBackend) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.backend = backend
        self._model: Any = cast(Any, backend.model)
        self._adapter: str | None = None
        # Both caches keep every column of a row; sliding-window or other
        # layers would need their own handling.
        kinds = {type(layer) for layer in DynamicCache(config=self._model.config).layers}
        if kinds - {DynamicLayer}:
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise BackendError(f"continuous batching needs full-attention layers, not {names}")

    @property
    @abc.abstractmethod
    def rows(self) -> Sequence[_Row]:
        """The running rows, in batch order."""

    @property
    def active(self) -> int:
        """Jobs running."""
        return len(self.rows)

    def can_admit(self, job: Job) -> bool:
        """True when nothing runs or ``job``'s adapter is the running one.

        Raises :class:`BackendError` for an adapter the backend does not have.
        """
        name = self.backend._adapter(job.adapter)
        return not self.rows or name == self._adapter

    def admit(self, jobs: Sequence[Job]) -> list[Done]:
        """Prefill ``jobs`` together and add them to the running batch.

        Returns the jobs already done: empty audio (text ""), rows whose
        first token ended them, and running jobs that a step launched ahead
        (:class:`.slots.SlotDecoder` with lookahead) finished, that step being
        completed first. All jobs must share one adapter, the running
        one if anything runs; otherwise, or for an unknown adapter, a
        non-mono array or a job already running, raises :class:`BackendError`
        before anything changes. Out of GPU memory raises it too (the running
        rows are left as they were); the owner then calls :meth:`abort`.
        """
        names = {self.backend._adapter(job.adapter) for job in jobs}
        running = {id(r.job) for r in self.rows}
        if len(names) > 1:
            raise BackendError(f"one admit takes one adapter, not {', '.join(sorted(names))}")
        if running and names - {self._adapter}:
            raise BackendError(f"adapter {names.pop()} cannot join while {self._adapter} runs")
        if len({id(j) for j in jobs} | running) < len(jobs) + len(running):
            raise BackendError("a job was admitted twice")
        arrays = [_as_audio(job.audio) for job in jobs]
        done = [Done(job, "") for job, a in zip(jobs, arrays, strict=True) if not len(a)]
        todo = [(job, a) for job, a in zip(jobs, arrays, strict=True) if len(a)]
        if not todo:
            return done
        name = names.pop()
        try:
            with torch.inference_mode():
                batch = self._prefill(name, todo)
                # Rows join between two steps. A step still in flight (see
                # _settle) ends here, after the prefill was queued behind it:
                # the host's work on the prompts and audio overlapped it.
                done = self._settle() + done
                keep = self._advance(batch.rows, batch.next.tolist(), done)
                if keep:
                    batch.select(keep)
                    self._join(name, batch)
                    self._adapter = name
        except torch.cuda.OutOfMemoryError:
            longest = max(len(a) for _, a in todo) / self.backend.spec.sampling_rate
            raise BackendError(
                f"out of GPU memory admitting {len(todo)} requests "
                f"({longest:.1f} s longest) beside {self.active}; lower worker.max_batch"
            ) from None
        return done

    def step(self) -> list[Done]:
        """Generate one token for every running job; return those that finished.

        Nothing running: returns []. Out of GPU memory raises
        :class:`BackendError`; the owner then calls :meth:`abort`.
        """
        rows = self.rows
        if not rows:
            return []
        done: list[Done] = []
        try:
            with torch.inference_mode():
                with self.backend.use_adapter(self._adapter):
                    tokens = self._decode()
                for row in rows:
                    row.length += 1
                keep = self._advance(rows, tokens, done)
                self._drop(keep)
        except torch.cuda.OutOfMemoryError:
            raise BackendError(
                f"out of GPU memory decoding {len(rows)} requests "
                f"({max(r.length for r in rows)} cached tokens longest); lower worker.max_batch"
            ) from None
        return done

    def cancel(self, job: Job) -> bool:
        """Drop ``job``'s row; False when it is not running."""
        rows = self.rows
        keep = [i for i, r in enumerate(rows) if r.job is not job]
        if len(keep) == len(rows):
            return False
        with torch.inference_mode():
            self._drop(keep)
        return True

    def abort(self) -> list[Job]:
        """Drop every running job and return them; the decoder stays usable."""
        jobs = [r.job for r in self.rows]
        self._clear()
        self._adapter = None
        return jobs

    # --- for subclasses -------------------------------------------------------

    def _settle(self) -> list[Done]:
        """Finish a decode step that is still running, if the subclass
        launches steps ahead; the jobs it finished."""
        return []

    @abc.abstractmethod
    def _join(self, name: str, batch: _Batch) -> None:
        """Take the prefilled rows of ``batch`` (all going on) into the running batch."""

    @abc.abstractmethod
    def _decode(self) -> list[int]:
        """One forward of every running row's next token; the tokens after it,
        on the host (the one host-device sync of a step).

        Runs under the running adapter; must leave the state unchanged when it
        raises out of memory.
        """

    @abc.abstractmethod
    def _keep(self, keep: Sequence[int]) -> None:
        """Keep only the running rows ``keep`` (ascending, non-empty)."""

    @abc.abstractmethod
    def _clear(self) -> None:
        """Drop every running row."""

    def _drop(self, keep: Sequence[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if keep:
            self._keep(keep)
        else:
            self.abort()

    def _prefill(self, name: str, todo: Sequence[tuple[Job, Audio]]) -> _Batch:
        """One forward over the prompts (and prefixes) of ``todo``, left-padded
        among themselves into a fresh cache; ``next`` holds each row's first token.

        A job's draft rides in the same forward after its prompt: the draft
        tokens that greedy decoding would have produced (each the argmax
        after the ones before it) are kept as the row's first tokens, the
        first that is not is replaced by that argmax (``next``), and the rest
        are cut from the cache. So a row starts where plain decoding would
        be after those steps. Drafts are dropped with a prefix (the prefix
        is forced text; a draft is only a guess).
        """
        from transformers import DynamicCache

        backend = self.backend
        device = backend.loaded.device
        prefixes = [backend.encode_prefix(job.prefix) for job, _ in todo]
        languages = [backend.language_ids(job.language) for job, _ in todo]
        budgets = [backend.row_budget(len(a), len(pre)) for (_, a), pre in zip(todo, prefixes,
                                                                             strict=True)]
        # At most budget - 1 draft tokens: the row's next token comes after them.
        drafts = [list(job.draft[: max(0, budget - 1)]) if job.draft and not pre else []
                  for (job, _), pre, budget in zip(todo, prefixes, budgets, strict=True)]
        ids_rows, mask_rows = backend.spec.left_padded(
            [len(a) for _, a in todo],
            [pre + d for pre, d in zip(prefixes, drafts, strict=True)], languages)
        ids = torch.tensor(ids_rows, dtype=torch.long).to(device, non_blocking=True)
        mask = torch.tensor(mask_rows, dtype=torch.long).to(device, non_blocking=True)
        # Real tokens numbered from 0, padding at 0: what generate does.
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=self._model.config)
        feats = backend.features([a for _, a in todo]).to(backend.loaded.dtype)
        longest = max(len(d) for d in drafts)
        encoder = backend.encoder
        graphs = backend.prefill_graphs
        fixed = None
        with backend.use_adapter(name):
            if encoder is None:
                inputs: dict[str, torch.Tensor] = {"input_ids": ids, "input_features": feats}
            else:
                inputs = {"inputs_embeds": embed_prompts(self._model, ids, feats, encoder)}
                if graphs is not None and not longest:
                    fixed = graphs(inputs["inputs_embeds"], mask, pos)
            if fixed is None:
                logits = self._model(
                    **inputs,
                    attention_mask=mask,
                    position_ids=pos,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=longest + 1,
                ).logits
            else:
                # Fixed shapes (model.voxtral.prefill_graphs).
                last, keys, values = fixed
                logits = last[:, None]
                _fill(cache, keys, values)
        rows = [
            _Row(job, pre, budget, sum(m))
            for (job, _), pre, budget, m in zip(todo, prefixes, budgets, mask_rows, strict=True)
        ]
        if not longest:
            return _Batch(rows, cache, mask, mask.sum(-1), self._pick(logits[:, -1]))
        # picks[r][i]: the greedy token after row r's last longest - i tokens.
        picks = cast(list[list[int]], self._pick(logits).tolist())
        eos = backend.spec.eos
        first: list[int] = []
        cut: list[int] = []
        for row, draft, row_picks in zip(rows, drafts, picks, strict=True):
            mine = row_picks[len(row_picks) - len(draft) - 1:]
            kept = 0
            while kept < len(draft) and mine[kept] == draft[kept] != eos:
                kept += 1
            row.tokens = list(draft[:kept])
            row.drafted, row.kept = len(draft), kept
            row.length -= len(draft) - kept
            first.append(mine[kept])
            cut.append(len(draft) - kept)
            backend.tokens_generated += kept
            backend.draft_tokens += len(draft)
            backend.draft_kept += kept
        if any(cut):
            mask = _cut_tails(cache, mask, cut)
        nxt = torch.tensor(first, dtype=torch.long).to(device, non_blocking=True)
        return _Batch(rows, cache, mask, mask.sum(-1), nxt)

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens from (..., vocab) logits, which it may change;
        EOS is held back when forced.

        Rows never go past their budget, so masking EOS on every step is the
        same as masking it until the budget.
        """
        if self.backend.force_tokens:
            logits[..., self.backend.spec.eos] = float("-inf")
        return logits.argmax(dim=-1)

    def _advance(self, rows: Sequence[_Row], tokens: Sequence[int], done: list[Done]) -> list[int]:
        """Give each row its new token; append the finished ones to ``done``
        and return the indices of the rows that go on."""
        backend = self.backend
        eos = backend.spec.eos
        keep: list[int] = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if tok != eos:
                row.tokens.append(tok)
                backend.tokens_generated += 1
            if tok == eos or len(row.tokens) >= row.budget:
                text = backend.text(row.job, row.prefix + row.tokens)
                done.append(Done(row.job, text, len(row.tokens),
                                 tuple(row.prefix + row.tokens), row.drafted, row.kept))
            else:
                keep.append(i)
        return keep


class ContinuousDecoder(RowDecoder):
    """Greedy continuous batching over one left-padded, growing KV cache.

    Implements the :class:`~evoxtral_stream.engine.backends.base.SteppingBackend`
    contract; one thread only. Every running job uses one adapter. A job
    decodes to the same text and token count as
    ``backend.transcribe_jobs([job])`` alone, whenever it was admitted.
    """

    def __init__(self, backend: VoxtralBackend) -> None:
        super().__init__(backend)
        self._batch: _Batch | None = None

    @property
    def rows(self) -> Sequence[_Row]:
        return () if self._batch is None else self._batch.rows

    @property
    def width(self) -> int:
        """Columns of the shared KV cache: the longest running row's tokens."""
        return 0 if self._batch is None else self._batch.width

    def _join(self, name: str, batch: _Batch) -> None:
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)

    def _decode(self) -> list[int]:
        batch = self._batch
        assert batch is not None
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        out = self._model(
            input_ids=batch.next[:, None],
            attention_mask=mask,
            position_ids=batch.pos[:, None],
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        nxt = self._pick(out.logits[:, -1])
        batch.mask, batch.pos, batch.next = mask, batch.pos + 1, nxt
        return cast(list[int], nxt.tolist())

    def _keep(self, keep: Sequence[int]) -> None:
        assert self._batch is not None
        self._batch.select(keep)

    def _clear(self) -> None:
        self._batch = None
