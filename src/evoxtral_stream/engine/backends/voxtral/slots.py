"""Continuous batching over a preallocated KV cache, so a decode step can be a CUDA graph.

:class:`SlotDecoder` keeps the keys and values of every layer in two tensors
allocated once, (layers x slots, kv heads, columns, head dim). Running rows
are packed into slots 0..n-1. All rows share one write column that moves on
by one per step around a ring of ``columns``: a row's tokens are the
``length`` columns that end just before the write column (modulo
``columns``). Attention does not care where a key sits (its position is in
the rotary embedding applied before caching), so the ring is never shifted
or compacted; it only has to hold the longest row, prompt plus budget.

A step runs the smallest power-of-two bucket of slots that holds the running
rows, so its shapes come from a handful; with ``compile`` those steps are
compiled (on CUDA: ``mode="reduce-overhead"``, which replays them as CUDA
graphs). With ``shared`` (the default) one compiled step serves every bucket
from 2 rows up, its batch size symbolic, and bucket 1 has its own; a CUDA
graph is still captured per bucket, which takes a moment where compiling
takes tens of seconds (on an H200 the full-size step compiled for buckets 1
and 2 in 83 s; seven buckets one by one, up to 64 rows, had not finished after
440 s). Prefill stays eager: new jobs go through the shared batched prefill
(:class:`.continuous.RowDecoder`) and their keys and values are copied into
free slots. A row that leaves is replaced by the last running row, so only
that row's cache moves.

Growing (more slots, or a longer ring for a longer row) reallocates and
copies, and with ``compile`` costs a new graph; it happens rarely, and the
log says when.

With ``lookahead``, a step launches the next one, fed its tokens where they
already are (on the device), before the host reads them. The host's work
between steps (reading the tokens, finishing rows, the worker taking new
requests) then overlaps the GPU running the next step instead of leaving it
idle. A row that ended is still in that next step; its token there is
dropped. Host buffers on either side of a step are pinned, so no copy waits
for the GPU to go idle. An admission first finishes the step in flight (its
finished rows come back with the admission), so rows always join between
two steps.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from evoxtral_stream.engine.backends.base import BackendError, Done, Job

from .attention import mask_for, scores_add_mask
from .continuous import RowDecoder, _Batch, _kv, _layers, _Row

if TYPE_CHECKING:
    from .backend import VoxtralBackend

__all__ = ["SlotCache", "SlotDecoder", "bucket", "graphs_in_this_thread"]

log = logging.getLogger(__name__)

_FIRST_SLOTS = 8
_COLUMN_QUANTUM = 128
# dynamo specialises the compiled step on its shapes: one graph per bucket
# (and per adapter when unmerged), more than the default limit of 8.
_RECOMPILE_LIMIT = 64


def graphs_in_this_thread() -> None:
    """Give the calling thread inductor's per-thread CUDA-graph state.

    Before torch 2.13 a CUDA-graph step compiled with ``reduce-overhead``
    fails an assert with no message (pytorch/pytorch#123177) when called from
    a thread that neither imported inductor's ``cudagraph_trees`` nor was
    started by autograd: the engine's model thread, and a restarted worker's
    new one. It lost every slot-mode final on an H200 (torch 2.11). torch
    2.13 sets the state up itself, the same way as here; with it set, each
    thread records its own graphs.
    """
    if torch._C._is_key_in_tls("tree_manager_containers"):
        return
    try:
        from torch._inductor import cudagraph_trees
    except ImportError:  # a build without inductor compiles nothing
        return
    init = getattr(cudagraph_trees, "_initialize_tls", None)
    if init is not None:  # torch 2.13 and later
        init(cudagraph_trees.local)
        return
    # What the module does at import for its importing thread (torch 2.11).
    local: Any = cudagraph_trees.local
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)
    _stash_in_tls("tree_manager_containers", local.tree_manager_containers)
    _stash_in_tls("tree_manager_locks", local.tree_manager_locks)


def _stash_in_tls(key: str, obj: object) -> None:
    """``torch._C._stash_obj_in_tls``, giving it the reference it keeps.

    torch 2.11's binding keeps a reference it never took and drops it when
    the thread ends, so the end of a thread set up here (the model thread,
    at a restart or the shutdown) freed the state twice and crashed the
    process. Its importing thread never ends, so torch itself never hit it;
    torch 2.13 takes its reference.
    """
    before = sys.getrefcount(obj)
    torch._C._stash_obj_in_tls(key, obj)
    if sys.getrefcount(obj) == before:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def bucket(n: int, slots: int) -> int:
    """Rows a step runs for ``n`` running rows: the next power of two, at most ``slots``."""
    return min(slots, 1 << max(0, n - 1).bit_length())


class SlotCache:
    """The fixed-shape KV cache a decode step writes into; duck-types the part
    of transformers' ``Cache`` that the attention layers call.

    ``keys``/``values`` are (layers * slots, kv heads, columns, head dim):
    layer ``l``'s slot ``s`` is row ``l * slots + s``. ``col`` (a one-element
    device tensor) is the write column of the step about to run.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        heads: int,
        columns: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.slots, self.columns = layers, slots, columns
        shape = (layers * slots, heads, columns, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self._heads = torch.arange(heads, device=device)
        # Fixed addresses: a captured graph keeps writing into these.
        for t in (self.keys, self.values, self.col):
            torch._dynamo.mark_static_address(t)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per row at ``col``; return the layer's first rows.

        ``key_states`` is (rows, kv heads, 1, head dim), rows being a bucket.
        """
        b = key_states.shape[0]
        base = layer_idx * self.slots
        rows = torch.arange(base, base + b, device=key_states.device)[:, None]
        col = self.col.expand(b)[:, None]
        index = (rows, self._heads[None, :], col)
        # index_put_ on the whole tensor (not a slice of it) stays in place
        # when compiled.
        self.keys.index_put_(index, key_states[:, :, 0])
        self.values.index_put_(index, value_states[:, :, 0])
        return self.keys[base : base + b], self.values[base : base + b]

    def mask(self, lengths: torch.Tensor) -> torch.Tensor:
        """(rows, 1, 1, columns) boolean mask: each row's ``length`` cached
        columns before ``col``, and ``col`` itself."""
        j = torch.arange(self.columns, device=lengths.device)
        dist = torch.remainder(self.col - j, self.columns)
        return (dist[None, :] <= lengths[:, None])[:, None, None, :]

    def ring(self, width: int, col: int) -> torch.Tensor:
        """Columns of the ``width`` tokens that end just before column ``col``, in order."""
        start = col - width
        return torch.remainder(torch.arange(start, col, device=self.col.device), self.columns)

    def put(self, slots: Sequence[int], batch: _Batch, col: int) -> None:
        """Copy every row of a prefilled ``batch`` into ``slots``, ending before ``col``.

        Each row's padding columns land in its own slot, outside its length.
        """
        width = batch.width
        dst_cols = self.ring(width, col)
        slot_t = torch.tensor(list(slots), dtype=torch.long).to(self.col.device, non_blocking=True)
        # Every layer in one write (a few launches, not two per layer: at one
        # window the host's launches are the cost).
        offsets = torch.arange(self.layers, device=self.col.device)[:, None] * self.slots
        index = (
            (offsets + slot_t[None, :]).flatten()[:, None, None],
            self._heads[None, :, None],
            dst_cols[None, None, :],
        )
        kv = [_kv(layer) for layer in _layers(batch.cache)]
        for dst, src in ((self.keys, [k for k, _ in kv]), (self.values, [v for _, v in kv])):
            dst.index_put_(index, torch.stack(src).flatten(0, 1).to(dst.dtype))

    def move(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy slots ``src`` into slots ``dst`` (disjoint), in every layer."""
        offsets = torch.arange(self.layers, device=self.col.device)[:, None] * self.slots
        s = torch.tensor(list(src), dtype=torch.long).to(self.col.device, non_blocking=True)
        d = torch.tensor(list(dst), dtype=torch.long).to(self.col.device, non_blocking=True)
        s_all, d_all = (offsets + s[None, :]).flatten(), (offsets + d[None, :]).flatten()
        self.keys.index_copy_(0, d_all, self.keys.index_select(0, s_all))
        self.values.index_copy_(0, d_all, self.values.index_select(0, s_all))

    def grown(self, slots: int, columns: int, used: int, width: int, col: int) -> SlotCache:
        """A larger cache holding slots ``0..used-1``' last ``width`` columns
        before ``col``; they end before column ``width`` there."""
        heads, head_dim = self.keys.shape[1], self.keys.shape[3]
        new = SlotCache(
            self.layers, slots, heads, columns, head_dim, self.keys.dtype, self.keys.device
        )
        if used and width:
            cols = self.ring(width, col)
            for old_t, new_t in ((self.keys, new.keys), (self.values, new.values)):
                old = old_t.view(self.layers, self.slots, heads, self.columns, head_dim)
                dst = new_t.view(self.layers, slots, heads, columns, head_dim)
                dst[:, :used, :, :width] = old[:, :used].index_select(3, cols)
        return new


@dataclass(eq=False)
class _Flight:
    """A launched decode step whose tokens the host has not read yet.

    ``out`` is the step's (bucket,) next tokens on the device, a copy the next
    replay cannot overwrite; ``host`` its copy on the host, valid once
    ``ready`` (None off CUDA) has fired; running row ``i``'s token is
    ``out[index[i]]`` (rows that left since the launch are not in ``index``).
    """

    out: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None
    index: list[int]

    def tokens(self) -> list[int]:
        """The running rows' tokens; waits for this step only."""
        if self.ready is not None:
            self.ready.synchronize()
        flat = cast(list[int], self.host.tolist())
        return [flat[i] for i in self.index]


class SlotDecoder(RowDecoder):
    """Greedy continuous batching over a :class:`SlotCache`.

    Same contract and same results as
    :class:`~.continuous.ContinuousDecoder`: a job decodes to what
    ``backend.transcribe_jobs([job])`` gives it alone. ``compile`` is None
    (eager steps) or keyword arguments for ``torch.compile`` of the step;
    ``lookahead`` launches each step before the host reads the one before
    (see the module doc); it may be switched between calls (benchmarks
    compare both on the same compiled steps). ``shared`` compiles one step
    for every bucket of 2 rows or more (see the module doc); without it each
    bucket compiles its own.
    """

    def __init__(
        self,
        backend: VoxtralBackend,
        *,
        compile: dict[str, Any] | None = None,
        columns: int = 0,
        lookahead: bool = False,
        shared: bool = True,
    ) -> None:
        super().__init__(backend)
        cfg = self._model.config.get_text_config()
        self._shape = (
            int(cfg.num_hidden_layers),
            int(cfg.num_key_value_heads),
            int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        )
        spec = backend.spec
        # Room for a 30 s window's prompt, a prefix of a few seconds' text and
        # a full 30 s budget; longer rows grow the ring.
        one_window = len(spec.ids(spec.samples_per_window)) + backend.max_new_tokens(
            2 * spec.samples_per_window
        )
        self._min_columns = max(columns, one_window)
        self._cache: SlotCache | None = None
        self._rows: list[_Row] = []
        self._next: list[int] = []
        self._col = 0
        self.lookahead = lookahead
        self._flight: _Flight | None = None
        self._settling = False
        device = backend.loaded.device
        self._pinned = device.type == "cuda"
        # The pad rows' token, gathered with the running rows' on the device.
        self._pad_token = torch.full((1,), backend.spec.pad, dtype=torch.long, device=device)
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        self._step = self._forward
        self._compiled = compile is not None
        self._additive_mask = scores_add_mask(self._model)
        self._shared = shared and compile is not None
        if compile is not None:
            dynamo: Any = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
            if self._shared:
                # Symbolic where marked (see _run_step), static elsewhere.
                compile = {**compile, "dynamic": None}
            self._step = cast(Any, torch.compile(self._forward, **compile))

    @property
    def rows(self) -> Sequence[_Row]:
        return self._rows

    @property
    def slots(self) -> int:
        """Slots allocated (0 before the first admission)."""
        return 0 if self._cache is None else self._cache.slots

    @property
    def columns(self) -> int:
        """Ring columns allocated (0 before the first admission)."""
        return 0 if self._cache is None else self._cache.columns

    def span(self, job: Job) -> int:
        """Columns ``job`` needs: its prompt (in its language), prefix and budget."""
        backend = self.backend
        prefix = len(backend.encode_prefix(job.prefix))
        language = backend.language_ids(job.language)
        prompt = len(backend.spec.ids(len(job.audio), language)) + prefix
        return prompt + backend.row_budget(len(job.audio), prefix)

    def warm_up(self, rows: int) -> list[int]:
        """Allocate room for ``rows`` rows and run the step of every bucket up
        to it (twice when compiled), so compiling and capturing CUDA graphs
        happen now rather than on a live request. Returns the buckets run.

        Only while nothing runs (raises :class:`BackendError` otherwise): the
        steps write into free slots.
        """
        if self._rows:
            raise BackendError("warm_up needs an idle decoder")
        if self._compiled:
            graphs_in_this_thread()
        cache = self._fit(max(1, rows), 0)
        sizes = sorted({bucket(n, cache.slots) for n in range(1, max(1, rows) + 1)})
        device = cache.col.device
        # Compiled, twice: inductor's CUDA-graph trees run a step eagerly the
        # first time a thread calls it and record its graph the second time.
        runs = 2 if self._compiled else 1
        with torch.inference_mode(), self.backend.use_adapter(None):
            for b in sizes:
                for _ in range(runs):
                    cache.col.fill_(self._col)
                    zeros = torch.zeros(b, dtype=torch.long, device=device)
                    self._run_step(torch.full_like(zeros, self.backend.spec.pad), zeros)
        return sizes

    # --- RowDecoder ---------------------------------------------------------

    def _join(self, name: str, batch: _Batch) -> None:
        assert self._flight is None, "admit settles the step in flight first"
        need = max(self._need(r) for r in batch.rows)
        n, k = len(self._rows), len(batch.rows)
        cache = self._fit(n + k, need)
        cache.put(range(n, n + k), batch, self._col)
        self._rows.extend(batch.rows)
        self._next.extend(cast(list[int], batch.next.tolist()))

    def _decode(self) -> list[int]:
        cache = self._cache
        assert cache is not None
        n = len(self._rows)
        b = bucket(n, cache.slots)
        pad = b - n
        lengths = [r.length for r in self._rows]
        flight = self._flight
        if flight is None:
            packed = self._upload([*self._next, *[self.backend.spec.pad] * pad, *lengths,
                                   *[0] * pad])
            flight = self._launch(packed[:b], packed[b:], n)
        self._flight = None
        if self.lookahead and not self._settling:
            # The next step, fed this one's tokens on the device. Positions
            # are one on: this step's token is cached by then.
            source = torch.cat([flight.out, self._pad_token])
            packed = self._upload([*flight.index, *[len(flight.out)] * pad,
                                   *[x + 1 for x in lengths], *[0] * pad])
            self._flight = self._launch(source.index_select(0, packed[:b]), packed[b:], n)
        self._next = flight.tokens()
        return self._next

    def _settle(self) -> list[Done]:
        """Finish the step in flight (lookahead) without launching another."""
        if self._flight is None:
            return []
        self._settling = True
        try:
            return self.step()
        finally:
            self._settling = False

    def _keep(self, keep: Sequence[int]) -> None:
        assert self._cache is not None
        m = len(keep)
        kept = set(keep)
        holes = [i for i in range(m) if i not in kept]
        movers = [i for i in keep if i >= m]
        if holes:
            # After the step in flight (stream order), so what it writes moves too.
            self._cache.move(movers, holes)
        rows, nxt = self._rows[:m], self._next[:m]
        index = self._flight.index[:m] if self._flight is not None else []
        for hole, mover in zip(holes, movers, strict=True):
            rows[hole], nxt[hole] = self._rows[mover], self._next[mover]
            if self._flight is not None:
                index[hole] = self._flight.index[mover]
        self._rows, self._next = rows, nxt
        if self._flight is not None:
            self._flight.index = index

    def _clear(self) -> None:
        # The cache stays allocated for the next admission; stale columns are
        # outside every new row's length. A step in flight is left to finish
        # on the device; nothing reads it.
        self._rows, self._next, self._flight = [], [], None

    # --- internals ----------------------------------------------------------

    def _forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The step itself (what gets compiled): greedy next tokens of a bucket.

        Positions count a row's real tokens from 0, so a token's position is
        its row's length; the pad rows of a bucket (length 0) see only their
        own column.
        """
        cache = self._cache
        assert cache is not None
        out = self._model(
            input_ids=ids[:, None],
            attention_mask=mask_for(cache.mask(lengths), self._additive_mask, cache.keys.dtype),
            position_ids=lengths[:, None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return self._pick(out.logits[:, -1])

    def _run_step(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The step for one bucket; shared, a bucket of 2 rows or more has a
        symbolic batch size (1 stays static: dynamo specialises it anyway, and
        some torch versions refuse to mark a size-1 dimension)."""
        if self._shared and ids.shape[0] > 1:
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(lengths, 0)
        return self._step(ids, lengths)

    def _upload(self, values: list[int]) -> torch.Tensor:
        """``values`` as a long tensor on the device, copied without waiting
        for the GPU (from pinned memory on CUDA)."""
        host = torch.tensor(values, dtype=torch.long)
        if self._pinned:
            host = host.pin_memory()
        return host.to(self._pad_token.device, non_blocking=True)

    def _launch(self, ids: torch.Tensor, lengths: torch.Tensor, n: int) -> _Flight:
        """Queue one step of a bucket (``ids``, ``lengths``) for ``n`` running
        rows at the write column, and the copy of its tokens to the host."""
        cache = self._cache
        assert cache is not None
        if self._compiled:
            graphs_in_this_thread()
        cache.col.fill_(self._col)
        # A replayed CUDA graph reuses its output: keep a copy of this one.
        out = self._run_step(ids, lengths).clone()
        ready: torch.cuda.Event | None = None
        if self._pinned:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            ready = cast(Any, torch.cuda.Event)()  # untyped in torch's stubs
            ready.record()
        else:
            host = out
        self._col = (self._col + 1) % cache.columns
        return _Flight(out, host, ready, list(range(n)))

    def _need(self, row: _Row) -> int:
        """Columns ``row`` occupies by the time it ends."""
        return row.length + row.budget - len(row.tokens)

    def _fit(self, rows: int, need: int) -> SlotCache:
        """The cache, grown if needed to hold ``rows`` rows and a row of ``need`` columns."""
        cache = self._cache
        slots = cache.slots if cache is not None else _FIRST_SLOTS
        while slots < rows:
            slots *= 2
        need = max([need, *map(self._need, self._rows)])
        columns = cache.columns if cache is not None else 0
        if cache is None or columns < need:
            columns = max(need, self._min_columns)
            columns = _COLUMN_QUANTUM * math.ceil(columns / _COLUMN_QUANTUM)
        if cache is not None and (slots, columns) == (cache.slots, cache.columns):
            return cache
        if cache is None:
            layers, heads, head_dim = self._shape
            loaded = self.backend.loaded
            new = SlotCache(layers, slots, heads, columns, head_dim, loaded.dtype, loaded.device)
        else:
            log.info(
                "slot cache grows to %d slots x %d columns (%d rows running)",
                slots, columns, len(self._rows),
            )
            width = max((r.length for r in self._rows), default=0)
            new = cache.grown(slots, columns, len(self._rows), width, self._col)
            self._col = width
        self._cache = new
        return new

