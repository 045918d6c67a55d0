"""The language model's prompt prefill at fixed shapes, replayed as CUDA graphs.

At one window the prompt prefill launches about 1,250 kernels one by one
from Python: on an H200, 8.1 ms of kernels in a 31 ms call
(bench/RESULTS.md). :class:`PrefillGraphs` runs it at a handful of fixed
shapes instead, (rows, columns) buckets, so that each can be captured once
as a CUDA graph and replayed with one launch.

The route (the same with or without graphs, so the CPU tests check it): the
prompts' input embeddings (:func:`.encoder.embed_prompts`) are left-padded
further, to the bucket's columns, and the bucket's spare rows are empty.
The attention mask is built in the graph from a (rows, columns) mask of
real tokens: causal, real keys only, and every query its own key too, so
that a padding position attends to something and stays finite (its keys
and values are never read: every later mask hides them). Keys and values
go into one preallocated buffer (:class:`PrefillCache`) shared by every
bucket; a call copies out its rows' last ``width`` columns, so what it
returns is what the plain prefill gives (on a GPU up to rounding: padded
shapes may sum in another order): logits of each row's last token and a
cache as wide as the longest prompt.

Buckets: 1, 2 and 4 rows (from 8 rows up the prefill is bound by the GPU,
not by launches, and graphs gain nothing) and columns in steps of
:data:`COLUMN_STEP` from the shortest one-window prompt to the longest one
with a prefix as long as a window's token budget. Anything else (more rows,
a longer prompt, drafts, which need more than the last logits) runs the
plain prefill.
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import torch
from torch import nn

from evoxtral_stream.engine.backends.base import one_line

from .attention import mask_for, scores_add_mask
from .encoder import capture_graph

__all__ = ["COLUMN_STEP", "ROW_BUCKETS", "PrefillCache", "PrefillGraphs"]

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4)
COLUMN_STEP = 64


class PrefillCache:
    """Keys and values of a prefill at fixed shapes; duck-types the part of
    transformers' ``Cache`` that the attention layers call.

    ``keys``/``values`` are (layers, rows, kv heads, columns, head dim),
    allocated once for the largest bucket; a bucket of ``b`` rows and ``t``
    columns writes and reads ``[layer, :b, :, :t]``.
    """

    def __init__(self, layers: int, rows: int, heads: int, columns: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, rows, heads, columns, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a whole prompt's keys and values, (rows, kv heads, columns,
        head dim); return them as the layer's cache."""
        b, _, t, _ = key_states.shape
        keys, values = self.keys[layer_idx, :b, :, :t], self.values[layer_idx, :b, :, :t]
        keys.copy_(key_states)
        values.copy_(value_states)
        return keys, values


class _Graph:
    """One bucket: its static inputs, and on CUDA its captured graph."""

    def __init__(self, rows: int, columns: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.rows, self.columns = rows, columns
        self.embeds = torch.zeros((rows, columns, hidden), dtype=dtype, device=device)
        self.real = torch.zeros((rows, columns), dtype=torch.bool, device=device)
        self.pos = torch.zeros((rows, columns), dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class PrefillGraphs:
    """The prompt prefill of ``model`` at fixed (rows, columns) buckets (see
    the module doc); CUDA graphs once :meth:`capture` ran, on CUDA only.
    One thread at a time (the engine's model thread); the model must not
    switch adapters (merged LoRA).
    """

    def __init__(self, model: nn.Module, shortest: int, longest: int) -> None:
        m: Any = model
        cfg = m.config.get_text_config()
        heads = int(cfg.num_key_value_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        param = next(model.parameters())
        self._model = model
        self._dtype, self._device = param.dtype, param.device
        self._hidden = int(cfg.hidden_size)
        first = COLUMN_STEP * math.ceil(shortest / COLUMN_STEP)
        last = COLUMN_STEP * math.ceil(longest / COLUMN_STEP)
        self.columns = tuple(range(first, last + 1, COLUMN_STEP))
        """Column buckets, ascending."""
        self.cache = PrefillCache(int(cfg.num_hidden_layers), ROW_BUCKETS[-1], heads, last,
                                  head_dim, self._dtype, self._device)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None
        self._additive_mask = scores_add_mask(model)
        self.enabled = True
        """False after a capture failed: every call then returns None."""

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(rows, columns) buckets captured as CUDA graphs, ascending."""
        return sorted(k for k, g in self._graphs.items() if g.graph is not None)

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The smallest bucket that holds ``rows`` prompts of ``width``
        columns; None if none does."""
        b = next((r for r in ROW_BUCKETS if r >= rows), None)
        t = next((c for c in self.columns if c >= width), None)
        return None if b is None or t is None else (b, t)

    def capture(self, max_rows: int) -> list[tuple[int, int]]:
        """Capture every bucket of up to ``max_rows`` rows (CUDA only; largest
        first, into one memory pool). A capture that fails disables the
        graphs (logged): the plain prefill runs instead. Returns
        :attr:`captured`."""
        if self._device.type != "cuda" or not self.enabled:
            return self.captured
        todo = [(b, t) for b in ROW_BUCKETS if b <= max(1, max_rows) for t in self.columns]
        try:
            for key in sorted(todo, reverse=True):
                graph = self._graph(*key)
                if graph.graph is None:
                    self._capture(graph)
        except Exception as e:  # a host sync in the model, say: eager is still right
            self.enabled = False
            self._graphs.clear()  # and their memory with them
            self._pool = None
            log.warning("prefill graphs disabled, the prompt prefill runs eagerly: %s",
                        one_line(e))
        return self.captured

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Prefill left-padded prompts: ``embeds`` (rows, width, hidden),
        ``mask`` (rows, width) of real tokens, ``pos`` their positions.

        Returns each row's last-token logits (rows, vocab), keys and values
        (layers, rows, kv heads, width, head dim), all the caller's own (one
        copy each, not one per layer: at one window the launches are the
        cost); None when no bucket holds the prompts (run the plain prefill).
        """
        n, width = int(embeds.shape[0]), int(embeds.shape[1])
        key = self.bucket(n, width) if self.enabled else None
        if key is None:
            return None
        graph = self._graph(*key)
        t = graph.columns
        graph.embeds.zero_()
        graph.embeds[:n, t - width:].copy_(embeds)
        graph.real.zero_()
        graph.real[:n, t - width:].copy_(mask.bool())
        graph.pos.zero_()
        graph.pos[:n, t - width:].copy_(pos)
        if graph.graph is not None:
            graph.graph.replay()
            logits = graph.logits
        else:
            logits = self._forward(graph)
        assert logits is not None
        return (logits[:n, -1].clone(), self.cache.keys[:, :n, :, t - width:t].clone(),
                self.cache.values[:, :n, :, t - width:t].clone())

    # --- internals ----------------------------------------------------------

    def _graph(self, rows: int, columns: int) -> _Graph:
        key = (rows, columns)
        if key not in self._graphs:
            self._graphs[key] = _Graph(rows, columns, self._hidden, self._dtype, self._device)
        return self._graphs[key]

    def _forward(self, graph: _Graph) -> torch.Tensor:
        """The bucket's prefill from its static inputs (what gets captured)."""
        t = graph.columns
        causal = torch.ones((t, t), dtype=torch.bool, device=self._device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=self._device)
        allowed = (causal[None, None] & graph.real[:, None, None, :]) | eye[None, None]
        mask = mask_for(allowed, self._additive_mask, self._dtype)
        with torch.inference_mode():
            out: Any = self._model(
                inputs_embeds=graph.embeds,
                attention_mask=mask,
                position_ids=graph.pos,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return cast(torch.Tensor, out.logits)

    def _capture(self, graph: _Graph) -> None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph.graph, graph.logits = capture_graph(lambda: self._forward(graph), self._pool)
