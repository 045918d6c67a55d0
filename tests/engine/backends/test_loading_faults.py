"""Voxtral checkpoints, adapters and export targets that are not what they seem: one
line each (a BackendUnavailable, an ExportError or a BackendError), never random
weights or a traceback."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
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
