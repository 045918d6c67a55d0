"""With ``--log-format json`` stderr holds JSON lines only, also while Voxtral loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from .conftest import Tiny
from .helpers import audio_batch


def _stderr_records(args: list[str]) -> list[dict[str, object]]:
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines
    bad = [line for line in lines if not line.startswith("{")]
    assert not bad, f"not JSON on stderr: {bad[:3]}"
    return [json.loads(line) for line in lines]


def test_voxtral_loading_and_export_write_no_progress_bars(tiny: Tiny, tmp_path: Path) -> None:
    """transformers' "Loading weights" and "Writing model shards" bars would
    break a log shipper's one-object-per-line stream; the tokenizer's own
    INFO chatter is none of an operator's business."""
    wav = tmp_path / "a.wav"
    pcm = (audio_batch([1.5])[0] * 32767).astype(np.int16)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm.tobytes())
    model = ["--set", f"model.voxtral.base={str(tiny.base)!r}",
             "--set", f"model.voxtral.adapter={str(tiny.adapter)!r}",
             "--set", "model.voxtral.device='cpu'", "--log-format", "json"]
    records = _stderr_records(["transcribe", "--backend", "voxtral", "--no-partials",
                               "--set", "model.voxtral.tokens_per_second=2.0",
                               "--set", "model.voxtral.min_new_tokens=3", *model, str(wav)])
    assert any("Voxtral loaded" in str(r["msg"]) for r in records)
    # mistral_common's INFO lines on its vocabulary sizes are held back.
    assert not [r for r in records if str(r["logger"]).startswith("mistral_common")]
    records = _stderr_records(["export-merged", str(tmp_path / "merged"), *model])
    assert any("merged model written" in str(r["msg"]) for r in records)
