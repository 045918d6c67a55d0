"""bench/voxtral_kernels.py runs end to end on the tiny checkpoint (CPU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from tests.helpers.bench import load_bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")



def _load() -> ModuleType:
    return load_bench("voxtral_kernels")


def test_tiny_run_reports_every_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--batches", "1,2", "--new-tokens", "3", "--audio-s", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("unmerged", 1),
        ("reference", 1),
        ("unmerged", 2),
        ("reference", 2),
        ("merged", 1),
        ("merged", 2),
        ("slots", 1),
        ("slots", 2),
        ("lookahead", 1),
        ("lookahead", 2),
        ("draft80", 1),
        ("draft80", 2),
    ]
    for r in rows:
        assert r["prep_ms"] > 0 or r["mode"] in ("slots", "lookahead", "draft80")  # in admit
        assert r["end_to_end_ms"] > 0
        assert r["new_tokens"] == 3
        if r["mode"] != "reference":
            assert r["prefill_ms"] > 0
            assert r["prefill_per_window_ms"] == pytest.approx(r["prefill_ms"] / r["batch"])
            assert math.isfinite(r["decode_per_token_ms"])
    assert data["meta"]["tiny"] is True
    # Per-token figures are (end to end - prefill) / tokens of single repeats:
    # on a busy CPU with a tiny model the difference is noise and may be
    # negative (a CI run saw -3.5 ms for slots), so only their being finite
    # is checked above; speed belongs in the benchmark, not here.
    assert "merged B=2" in capsys.readouterr().out


def test_budget_skips_what_would_start_late(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load()
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--batches", "1", "--new-tokens", "2", "--audio-s", "1",
            "--budget-s", "0", "--json", str(out)]
    assert bench.main(argv) == 0
    assert json.loads(out.read_text())["rows"] == []
    said = capsys.readouterr().out
    for what in ("unmerged B=1", "reference B=1", "merged B=1", "slots B=1", "lookahead B=1",
                 "draft80 B=1"):
        assert f"{what}: skipped (time budget" in said


def test_rows_are_written_as_they_come(tmp_path: Path) -> None:
    bench = _load()
    seen: list[int] = []
    rows = bench.run(tiny=True, batches=[1], new_tokens=2, audio_s=1.0, rank=4, repeats=1,
                     reference=False, log=lambda _: None,
                     on_row=lambda rs: seen.append(len(rs)))
    assert seen == [1, 2, 3, 4, 5] == list(range(1, len(rows) + 1))


def test_layers_keep_the_full_widths() -> None:
    from evoxtral_stream.engine.backends.voxtral.tiny import tiny_voxtral_config

    full, cut = tiny_voxtral_config(full=True), tiny_voxtral_config(full=True, layers=1)
    assert (cut.text_config.num_hidden_layers, cut.audio_config.num_hidden_layers) == (1, 1)
    assert full.text_config.num_hidden_layers > 1 and full.audio_config.num_hidden_layers > 1
    for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size"):
        assert getattr(cut.text_config, name) == getattr(full.text_config, name), name
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_mel_bins"):
        assert getattr(cut.audio_config, name) == getattr(full.audio_config, name), name


def test_layers_do_not_go_with_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load().main(["--tiny", "--layers", "1"])
    assert exit_info.value.code == 2
    assert "--layers" in capsys.readouterr().err


def test_paths_pick_what_runs_and_profile_breaks_the_prefill_down(tmp_path: Path) -> None:
    bench = _load()
    out, prof = tmp_path / "rows.json", tmp_path / "prefill.md"
    argv = ["--tiny", "--batches", "1", "--new-tokens", "2", "--audio-s", "1", "--paths",
            "merged", "--profile", str(prof), "--profile-batches", "1,2", "--json", str(out),
            "--profile-compiled", "--compile-backend", "aot_eager"]
    assert bench.main(argv) == 0
    assert [r["mode"] for r in json.loads(out.read_text())["rows"]] == ["merged"]
    text = prof.read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 1 |")
            or line.startswith("| 2 |")]
    # Off CUDA the compiled layers run without graphs: one more row.
    assert [(r[0].strip("| "), r[2]) for r in rows] == [
        (b, part) for b in ("1", "2")
        for part in ("encoder", "projector", "language model", "whole prefill",
                     "encoder, compiled")]
    for r in rows:
        assert float(r[3].removesuffix(" ms")) > 0  # wall time of the part
    assert "Top operators" in text and "aten::" in text


def test_a_profile_cut_short_keeps_the_batches_it_finished(tmp_path: Path) -> None:
    """On the GPU the outer timeout may end a profile midway (compiling)."""
    prof = tmp_path / "prefill.md"
    argv = ["--tiny", "--batches", "1", "--new-tokens", "2", "--audio-s", "1", "--paths",
            "merged", "--profile", str(prof), "--profile-batches", "1,0"]  # 0: it fails
    assert _load().main(argv) == 0
    parts = [line.split(" | ")[2] for line in prof.read_text().splitlines()
             if line.startswith("| 1 |")]
    assert parts == ["encoder", "projector", "language model", "whole prefill"]


@pytest.mark.parametrize("backend", ["no_such_backend", "fails_when_compiling"])
def test_a_compile_that_fails_leaves_the_profile_s_other_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str,
) -> None:
    """A device machine without what inductor needs (a C compiler for Triton)
    must not cost the batch's other rows: an unknown backend fails at once,
    a failing compiler at the first call."""
    import torch

    if backend == "fails_when_compiling":
        def fails(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> NoReturn:
            raise RuntimeError("no C compiler")

        torch._dynamo.register_backend(fails, name=backend)
    prof = tmp_path / "prefill.md"
    argv = ["--tiny", "--batches", "1", "--new-tokens", "2", "--audio-s", "1", "--paths",
            "merged", "--profile", str(prof), "--profile-batches", "1", "--profile-compiled",
            "--compile-backend", backend]
    assert _load().main(argv) == 0
    assert "no compiled encoder: " in capsys.readouterr().out
    parts = [line.split(" | ")[2] for line in prof.read_text().splitlines()
             if line.startswith("| 1 |")]
    assert parts == ["encoder", "projector", "language model", "whole prefill"]


def test_unknown_path_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load().main(["--tiny", "--paths", "merged,fast"])
    assert exit_info.value.code == 2
    assert "unknown fast" in capsys.readouterr().err
