"""Voxtral checkpoints, adapters and export targets that are not what they seem: one
line each (a BackendUnavailable, an ExportError or a BackendError), never random
weights or a traceback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendError, BackendUnavailable
from evoxtral_stream.engine.backends.voxtral import export_merged, voxtral_available
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.export import ExportError
from evoxtral_stream.engine.backends.voxtral.resolve import Kind, resolve

from .conftest import Tiny


def _one_line(info: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.__context__ is None or info.value.__suppress_context__
    return msg


def test_a_base_checkpoint_missing_tensors_is_refused(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """A model.safetensors that lacks tensors (an incomplete or foreign-layout
    file) loaded silently: transformers initialised the missing layers at
    random and the engine captioned with them."""
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    kept = {k: v for k, v in tensors.items() if "audio_tower.layers.0." not in k}
    assert len(kept) < len(tensors)
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(base), adapter=""), "en")
    assert "model.voxtral.base" in _one_line(info)


def test_an_index_that_is_not_an_object_is_one_line(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """model.safetensors.index.json holding valid JSON of another shape
    raised TypeError from resolve() and from voxtral_available() (auto)."""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tekken.json"):
        shutil.copy(tiny.base / name, base / name)
    (base / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(BackendUnavailable) as info:
        resolve(str(base), Kind.BASE)
    assert "model.voxtral.base" in _one_line(info)
    ok, why = voxtral_available(dataclasses.replace(tiny_cfg, base=str(base), adapter=""))
    assert not ok and "model.voxtral.base" in why


def test_an_extra_adapter_name_with_a_dot_is_one_line(
    tiny: Tiny, tiny_cfg: VoxtralConfig
) -> None:
    """[model.voxtral.adapters] "rl.v2" = ... ended in torch's KeyError
    ("module name can't contain '.'") with a traceback, after the base loaded."""
    cfg = dataclasses.replace(tiny_cfg, merge_lora=False)
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(cfg, "en", extra_adapters={"rl.v2": str(tiny.adapter_rl)})
    assert "rl.v2" in _one_line(info)


def test_export_into_the_current_empty_folder(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evoxtral-stream export-merged .` in an empty folder raised ValueError
    from Path('.').with_name: a traceback. Replacing the current folder would
    leave the shell in a folder that is gone, so it is refused in one line,
    before the model loads."""
    here = tmp_path / "out"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(ExportError, match=r"^\. is the current folder; name a new OUTDIR"):
        export_merged(tiny_cfg, Path("."))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_through_a_symlink_to_an_empty_folder(
    tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """OUTDIR a symlink to an empty folder passed the check, then failed after
    the model was loaded and merged: 'cannot write link: Not a directory'."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    export_merged(tiny_cfg, link)
    assert (link / "config.json").is_file()
    assert (link / "tekken.json").is_file()


def test_export_to_a_symlink_loop_is_one_line(tiny_cfg: VoxtralConfig, tmp_path: Path) -> None:
    """OUTDIR a symlink that points at itself ended in Path.resolve's
    RuntimeError 'Symlink loop' (Python before 3.13): a traceback. It is one
    line, before the model loads (the base here is missing), and the link is
    left as it was."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    broken = dataclasses.replace(tiny_cfg, base=str(tmp_path / "no-base"))
    with pytest.raises(ExportError) as info:
        export_merged(broken, loop)
    assert _one_line(info).startswith(f"cannot write {loop}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]
    assert os.readlink(loop) == "loop"


def test_a_job_language_is_one_of_the_codes_exactly(merged: VoxtralBackend) -> None:
    """language_ids: 'raises BackendError for a code not in languages'; 'EN'
    is not in languages (model.language 'EN' is refused at load)."""
    assert "EN" not in merged.languages
    with pytest.raises(BackendError):
        merged.language_ids("EN")
    assert merged.language_ids("en")  # the exact code still works


@pytest.mark.parametrize("kind", [Kind.BASE, Kind.ADAPTER])
def test_a_file_named_as_the_folder_says_so(tiny: Tiny, kind: Kind) -> None:
    """model.voxtral.base pointed at model.safetensors (or the adapter at its
    adapter_model.safetensors), the file rather than its folder, was refused
    as a folder that "does not exist"; the user sees the file right there."""
    folder = tiny.base if kind is Kind.BASE else tiny.adapter
    file = folder / ("model.safetensors" if kind is Kind.BASE else "adapter_model.safetensors")
    with pytest.raises(BackendUnavailable) as info:
        resolve(str(file), kind)
    assert _one_line(info).startswith(
        f"{'Voxtral base model' if kind is Kind.BASE else 'LoRA adapter'} folder {str(file)!r} "
        f"is a file, not a folder; set {kind.value} to the folder that holds it")


def test_a_base_of_another_architecture_is_one_line(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A base folder whose config.json is another model's (a Whisper
    checkpoint's, say) was loaded as Voxtral anyway: transformers warned that
    a `whisper` model instantiates a `voxtral` one, printed a report of some
    seventy lines and failed with 'look at the above report'. It is refused
    before any weights load, naming the model type it found."""
    from transformers import WhisperConfig

    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    WhisperConfig().save_pretrained(str(base))
    capfd.readouterr()
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(base)), "en")
    assert _one_line(info) == (
        f"Voxtral base model folder {str(base)!r} holds a 'whisper' model (model_type in "
        "config.json), not Voxtral; set model.voxtral.base to a Voxtral checkpoint")
    assert capfd.readouterr().err == ""


def _without_tensors(tiny: Tiny, base: Path) -> None:
    """A copy of the tiny base whose weights lack the audio tower's first layer."""
    shutil.copytree(tiny.base, base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "audio_tower.layers.0." not in k},
              str(weights), metadata={"format": "pt"})


def _other_shapes(tiny: Tiny, base: Path) -> None:
    """A copy of the tiny base whose config.json gives the MLPs another width."""
    shutil.copytree(tiny.base, base)
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 48
    (base / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("spoil", "says"), [
    (_without_tensors, "lacks 15 weight tensors (e.g. model.audio_tower.layers.0."),
    (_other_shapes, "has 6 weight tensors of another shape than its config.json gives (e.g. "
                    "model.language_model.layers.0.mlp.down_proj.weight: (32, 64) in the file, "
                    "(32, 48) in the model)"),
], ids=["missing-tensors", "other-shapes"])
def test_a_refused_base_prints_no_load_report(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, spoil: Callable[[Tiny, Path], None],
    says: str,
) -> None:
    """transformers logs a load report (a table of every missing or resized
    tensor, seventy lines for a foreign checkpoint) before the one line
    that refuses the base; a base of other shapes was refused with
    'look at the above report' only. The report is a debug record now,
    the line names what is wrong."""
    base = tmp_path / "base"
    spoil(tiny, base)
    # Beside transformers' own handler (or the root's, in the program):
    # what reaches one reaches the other.
    shown = _Records()
    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addHandler(shown)
    try:
        with pytest.raises(BackendUnavailable) as info:
            load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(base), adapter=""), "en")
    finally:
        reporter.removeHandler(shown)
    msg = _one_line(info)
    assert msg.startswith(f"the Voxtral base model in {str(base)!r} {says}")
    assert msg.endswith("; set model.voxtral.base to a complete checkpoint")
    assert not [m for m in shown.messages if "LOAD REPORT" in m]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_command_refuses_a_base_missing_tensors_in_one_line(
    tiny: Tiny, tmp_path: Path
) -> None:
    """`evoxtral-stream transcribe --backend voxtral` with -q: status 2 and
    stderr the error line alone, not transformers' report before it."""
    base = tmp_path / "base"
    _without_tensors(tiny, base)
    proc = subprocess.run(
        [sys.executable, "-m", "evoxtral_stream", "transcribe", "--backend", "voxtral", "-q",
         "--sample", "--set", f"model.voxtral.base={str(base)!r}",
         "--set", "model.voxtral.adapter=''", "--set", "model.voxtral.device='cpu'"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("evoxtral-stream: error: the Voxtral base model in ")


def test_a_base_with_unused_tensors_loads_with_one_warning(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tensors the model has no place for change nothing it computes: it
    loads, and one warning line names them in place of transformers' table."""
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    shown = _Records()
    reporter = logging.getLogger("transformers.modeling_utils")
    reporter.addHandler(shown)
    try:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(base), adapter=""), "en")
    finally:
        reporter.removeHandler(shown)
    assert not [m for m in shown.messages if "LOAD REPORT" in m]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("holds 1 tensor(s) that the model does not use (e.g. model.extra_head.weight)"
               in m for m in warned), warned


def test_a_load_report_an_error_points_at_is_shown_with_the_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """transformers holds back nothing it raises: an error that says "look at
    the above report" (a quantized checkpoint's conversion entries) must
    find that report in the log, not only at debug level."""
    from evoxtral_stream.engine.backends.voxtral import load as load_mod

    report = logging.getLogger(load_mod._REPORT_LOGGER)
    def load() -> None:
        with load_mod._load_report_held():
            report.warning("LOAD REPORT: CONVERSION failed for model.layers.0.weight")
            raise RuntimeError("look at the CONVERSION entries of the above report")

    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError, match="above report"):
        load()
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING
             and "CONVERSION failed" in r.getMessage()]
    assert len(shown) == 1, [r.getMessage() for r in caplog.records]
    # Held back when the load goes on: our own lines say what matters.
    caplog.clear()
    with caplog.at_level(logging.INFO), load_mod._load_report_held():
        report.warning("LOAD REPORT: unused tensors")
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
