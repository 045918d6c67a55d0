"""The audio side of a batched prefill: encoder, projector, and the prompt's embeddings.

:func:`embed_prompts` turns prompt ids and log-mel windows into the language
model's input embeddings, each window's audio embeddings in place of its
audio placeholder tokens: what Voxtral's own forward does when given
``input_features``, done outside it so that the encoder can run as a CUDA
graph.

:class:`EncoderGraphs` replays the audio encoder as CUDA graphs, one per
power-of-two count of windows (a window's shape is fixed: 30 s of log-mel
frames). At one window the eager encoder spends most of its time launching
its several hundred kernels one by one from Python (on an H200, 7.9 ms of
kernels in a 21 ms call; bench/RESULTS.md); a replay launches them all at
once. Windows past the largest captured count run eagerly.

:func:`compile_layers` compiles the encoder's layers in place (regional
compilation): they are instances of one class, so one compiled graph serves
all of them, and compiling costs one layer's time, not the tower's. What it
fuses is a layer's element-wise work (layer norms, residual adds, the
query's scale, the heads' transposes), which at 8 windows and more takes
about as much GPU time as the matrix products (on an H200; how much fusing
saves is not measured yet, bench/RESULTS.md). The CUDA graphs above capture
the compiled layers like eager ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import nn

__all__ = [
    "EncoderGraphs",
    "capture_graph",
    "compile_layers",
    "eager_encoder",
    "embed_prompts",
    "encoder_parts",
    "submodule",
    "uncompile_layers",
]

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]
"""(windows, mel bins, frames) log-mel features -> the encoder's last hidden states."""


def submodule(model: nn.Module, name: str) -> nn.Module:
    """The outermost submodule of ``model`` called ``name``."""
    found: nn.Module
    for path, found in model.named_modules():
        if path.rsplit(".", 1)[-1] == name:
            return found
    raise LookupError(f"the model has no {name!r}")


def encoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The audio tower and the multi-modal projector of a Voxtral model
    (their place moved across transformers versions)."""
    return submodule(model, "audio_tower"), submodule(model, "multi_modal_projector")


def compile_layers(tower: nn.Module, **options: Any) -> int:
    """Compile each of the audio tower's layers in place with ``torch.compile``
    (``fullgraph``, and ``options``, e.g. a backend); returns how many.

    Nothing compiles until a layer runs: the first call with one window
    compiles a graph for one window, the first with more a graph whose
    window count is symbolic; every layer and every later count reuses them.
    The layers must not be switched between adapters (merged LoRA only):
    each switch would compile again.
    """
    layers = _layers(tower)
    for layer in layers:
        layer.compile(**{"fullgraph": True, **options})
    return len(layers)


def uncompile_layers(tower: nn.Module) -> None:
    """Undo :func:`compile_layers`: the layers run eagerly again (after a
    compile that failed, which would otherwise fail every later call)."""
    for layer in _layers(tower):
        # What nn.Module.compile sets; it has no public inverse.
        layer._compiled_call_impl = None


def _layers(tower: nn.Module) -> nn.ModuleList:
    layers: Any = getattr(tower, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise LookupError(f"the audio tower {type(tower).__name__} has no layers to compile")
    return layers


def eager_encoder(tower: nn.Module) -> Encoder:
    def run(feats: torch.Tensor) -> torch.Tensor:
        out: Any = tower(feats, return_dict=True)
        return out.last_hidden_state  # type: ignore[no-any-return]

    return run


def embed_prompts(model: nn.Module, ids: torch.Tensor, feats: torch.Tensor,
                  encoder: Encoder) -> torch.Tensor:
    """(rows, tokens, hidden) input embeddings of ``ids`` with the audio of
    ``feats`` in their audio placeholder tokens, in order."""
    m: Any = model
    _, projector = encoder_parts(model)
    width = int(m.config.audio_config.intermediate_size)
    audio = projector(encoder(feats).reshape(-1, width))
    embeds = m.get_input_embeddings()(ids)
    # No count check: one would wait for the GPU (the encoder's work) before
    # the prefill could be queued. The prompt builder gives each window its
    # audio tokens (PromptSpec), as the contract tests check.
    slots = (ids == int(m.config.audio_token_id)).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(slots, audio.to(embeds.dtype))  # type: ignore[no-any-return]


T = TypeVar("T")


def capture_graph(fn: Callable[[], T], pool: Any) -> tuple[torch.cuda.CUDAGraph, T]:
    """``fn`` (reading and writing only static tensors) captured as a CUDA
    graph into memory ``pool`` (a ``torch.cuda.graph_pool_handle()``), after
    two warm-up runs on a side stream, as ``torch.cuda.graphs`` asks: lazy
    initialisations (cuBLAS handles, autotuning, compiling) stay out of the
    graph. Returns the graph and what ``fn`` returned while captured (its
    outputs, which every replay overwrites)."""
    with torch.inference_mode():
        side = cast(Any, torch.cuda.Stream)()  # untyped in torch's stubs
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class EncoderGraphs:
    """The audio tower as CUDA graphs, captured by :meth:`capture` for 1, 2,
    4 ... windows (see the module doc); a call with more windows than were
    captured, or before any capture, runs eagerly.

    A call copies its windows into the graph's input (zero windows after
    them: each window is encoded on its own, so padding changes nothing)
    and returns a copy of the outputs it asked for, so a later replay
    cannot overwrite what a caller holds. All graphs share one memory pool,
    captured largest first. Capture and replay from one thread at a time
    (the engine's model thread).
    """

    def __init__(self, tower: nn.Module) -> None:
        self._eager = eager_encoder(tower)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None

    @property
    def captured(self) -> list[int]:
        """Window counts captured so far, ascending."""
        return sorted(self._graphs)

    def capture(self, example: torch.Tensor, windows: int) -> list[int]:
        """Capture every bucket that ``windows`` windows need, with windows
        shaped like ``example`` (mel bins, frames) on its device and dtype;
        returns the counts captured so far."""
        sizes = []
        b = 1
        while b <= _bucket(max(1, windows)):
            sizes.append(b)
            b *= 2
        for b in reversed(sizes):
            if b not in self._graphs:
                self._capture(b, example)
        return self.captured

    def _capture(self, b: int, example: torch.Tensor) -> None:
        static_in = torch.zeros((b, *example.shape[-2:]), dtype=example.dtype,
                                device=example.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, static_out = capture_graph(lambda: self._eager(static_in), self._pool)
        self._graphs[b] = (graph, static_in, static_out)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        n = int(feats.shape[0])
        entry = self._graphs.get(_bucket(n))
        if entry is None:
            return self._eager(feats)
        graph, static_in, static_out = entry
        static_in[:n].copy_(feats)
        static_in[n:].zero_()
        graph.replay()
        return static_out[:n].clone()
