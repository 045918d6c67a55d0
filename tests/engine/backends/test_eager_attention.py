"""``model.voxtral.attn_implementation = "eager"``: every decoder still decodes
a job as it does alone.

The slot cache's decode step and the fixed-shape prefill build their own
4-D attention masks, which transformers hands to the attention as they
are: ``sdpa`` takes a boolean mask, eager attention adds the mask to the
scores, so a boolean one masked nothing there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import Done, Job
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.encoder import eager_encoder, encoder_parts

from .test_continuous import KINDS, _admit, _alone, _audio, _drain, _fixed_prefill, make_decoder


@pytest.fixture(scope="module")
def eager(tiny_cfg: VoxtralConfig) -> VoxtralBackend:
    backend = load_voxtral_backend(dataclasses.replace(tiny_cfg, attn_implementation="eager"),
                                   "en")
    model: Any = backend.model
    assert model.config.get_text_config()._attn_implementation == "eager"
    return backend


@pytest.mark.parametrize("kind", KINDS)
def test_eager_attention_decodes_as_alone_on_every_decoder(
    eager: VoxtralBackend, merged: VoxtralBackend, kind: str
) -> None:
    # One window each (the fixed prefill's buckets hold them), one with a prefix.
    jobs = [Job(0, _audio(0.7, 90)), Job(1, _audio(12.0, 91)),
            Job(2, _audio(5.0, 92), prefix="so I was"), Job(3, _audio(3.0, 93))]
    want = _alone(eager, jobs)
    # Eager attention is sdpa's arithmetic: the same greedy tokens.
    assert want == _alone(merged, jobs)
    dec = make_decoder(eager, kind)
    if kind in ("embedded", "fixed"):
        eager._encoder = eager_encoder(encoder_parts(eager.model)[0])
    if kind == "fixed":
        eager._prefill_graphs = _fixed_prefill(eager)
    out: dict[Job, Done] = {}
    try:
        _admit(dec, jobs[:1], out)
        _drain(dec, out, 2)
        _admit(dec, jobs[1:], out)  # joining a running row
        _drain(dec, out)
    finally:
        dec.abort()
        eager._encoder, eager._prefill_graphs = None, None
    assert out == want
