"""The audio encoder's layers compiled in place (``model.voxtral.encoder_compile``):
one compiled graph for every layer, the same hidden states, the same captions."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral import backend as backend_module
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.encoder import (
    compile_layers,
    eager_encoder,
    encoder_parts,
)

from .helpers import audio_batch
from .test_continuous import _admit, _alone, _drain, _jobs


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _feats(backend: VoxtralBackend, seconds: list[float], seed: int) -> torch.Tensor:
    return backend.features(audio_batch(seconds, seed=seed)).to(backend.loaded.dtype)


def _layers(tower: nn.Module) -> nn.ModuleList:
    layers = tower.get_submodule("layers")
    assert isinstance(layers, nn.ModuleList)
    return layers


def _compiled(layer: nn.Module) -> bool:
    return layer._compiled_call_impl is not None  # what nn.Module.compile sets


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_every_layer_runs_one_compiled_graph(merged: VoxtralBackend, fresh_dynamo: None) -> None:
    tower = copy.deepcopy(encoder_parts(merged.model)[0])
    eager = eager_encoder(encoder_parts(merged.model)[0])
    assert compile_layers(tower, backend="aot_eager") == len(_layers(tower)) >= 2
    compiled = eager_encoder(tower)
    feats = _feats(merged, [3.0, 35.0, 12.0, 1.0], seed=30)  # 5 windows
    seen = []
    with torch.inference_mode():
        for n in (1, 2, 3, 5, 1):
            # aot_eager runs the traced ops unfused: the very same numbers.
            assert torch.equal(compiled(feats[:n]), eager(feats[:n]))
            seen.append(_graphs())
    # One window: one graph for both layers; more: one graph whose window
    # count is symbolic, again shared; nothing compiles after that.
    assert seen == [1, 2, 2, 2, 2]


def test_a_tower_without_layers_is_refused() -> None:
    with pytest.raises(LookupError, match="Linear has no layers to compile"):
        compile_layers(nn.Linear(2, 2))


@pytest.mark.slow
def test_inductor_fuses_the_layers_to_the_same_hidden_states(
    merged: VoxtralBackend, fresh_dynamo: None
) -> None:
    """Real inductor (a C++ compiler on the CPU): its fused kernels round in
    another order, so the states agree to float32 rounding, not bit for bit."""
    tower = copy.deepcopy(encoder_parts(merged.model)[0])
    compile_layers(tower)
    feats = _feats(merged, [3.0, 12.0], seed=31)
    with torch.inference_mode():
        want = eager_encoder(encoder_parts(merged.model)[0])(feats)
        got = eager_encoder(tower)(feats)
    assert not torch.equal(got, want)  # inductor's kernels, not the eager ones
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_backend_compiles_its_encoder_at_warm_up_and_captions_the_same(
    tiny_cfg: VoxtralConfig, merged: VoxtralBackend, fresh_dynamo: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(backend_module.ENCODER_COMPILE, "backend", "aot_eager")
    jobs = _jobs(seed=32)
    plain: dict[Job, Done] = _alone(merged, jobs)
    backend = load_voxtral_backend(dataclasses.replace(tiny_cfg, encoder_compile=True), "en")
    tower = encoder_parts(backend.model)[0]
    assert not any(_compiled(layer) for layer in _layers(tower))  # until the worker warms up
    assert backend.warm_up(8).startswith("encoder layers compiled in ")
    assert all(_compiled(layer) for layer in _layers(tower))
    assert _graphs() == 2
    assert backend.warm_up(8) == "nothing to warm up"  # a restarted worker's warm-up
    out: dict[Job, Done] = {}
    _admit(backend.decoder, jobs[:2], out)
    _drain(backend.decoder, out, 2)
    _admit(backend.decoder, jobs[2:], out)
    _drain(backend.decoder, out)
    assert {j.key: (d.text, d.tokens) for j, d in out.items()} == {
        j.key: (d.text, d.tokens) for j, d in plain.items()}
    assert [d.text for d in backend.transcribe_jobs(jobs)] == [plain[j].text for j in jobs]
    assert _graphs() == 2  # live windows (1 to 3 at a time) compiled nothing more


def test_a_compile_that_fails_leaves_the_encoder_eager(
    tiny_cfg: VoxtralConfig, merged: VoxtralBackend, fresh_dynamo: None,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """No C++ compiler on the CPU, say: left compiled, every request would fail."""

    def no_compiler(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")

    monkeypatch.setitem(backend_module.ENCODER_COMPILE, "backend", no_compiler)
    backend = load_voxtral_backend(dataclasses.replace(tiny_cfg, encoder_compile=True), "en")
    said = backend.warm_up(4)
    assert said.startswith("encoder layers left eager (")
    assert "No working C++ compiler found" in said and "details" not in said
    assert "encoder layers not compiled, running eagerly" in caplog.text
    assert not any(_compiled(layer) for layer in _layers(encoder_parts(backend.model)[0]))
    jobs = _jobs(seed=33)[:2]
    assert [d.text for d in backend.transcribe_jobs(jobs)] == [
        d.text for d in merged.transcribe_jobs(jobs)]


def test_the_encoder_traces_as_one_graph(merged: VoxtralBackend, fresh_dynamo: None) -> None:
    """What the encoder graphs capture must not sync with the host: dynamo
    traces the whole tower (convolutions, positions, layers, norm) as one
    graph, a CPU check that a transformers upgrade added no sync."""
    run = eager_encoder(encoder_parts(merged.model)[0])
    feats = _feats(merged, [3.0, 35.0], seed=33)
    with torch.inference_mode():
        got = torch.compile(run, backend="eager", fullgraph=True)(feats)
        torch.testing.assert_close(got, run(feats), rtol=0, atol=0)
