"""export-merged writes a checkpoint that serves without LoRA support."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable
from evoxtral_stream.engine.backends.voxtral import export_merged
from evoxtral_stream.engine.backends.voxtral.backend import VoxtralBackend, load_voxtral_backend
from evoxtral_stream.engine.backends.voxtral.export import ExportError

from .conftest import Tiny
from .helpers import audio_batch, logits


def test_export_round_trips(
    tiny_cfg: VoxtralConfig, merged: VoxtralBackend, tmp_path: Path
) -> None:
    from transformers import VoxtralForConditionalGeneration

    out = tmp_path / "merged"
    export_merged(tiny_cfg, out)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tekken.json",
        "preprocessor_config.json",
        "evoxtral_merge.json",
    ):
        assert (out / name).is_file(), name
    note = json.loads((out / "evoxtral_merge.json").read_text())
    assert note["merged"] is True
    assert note["dtype"] == "float32"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k for k in keys)
    assert "audio_tower.layers.0.self_attn.q_proj.weight" in keys  # the layout every version reads

    reloaded: Any = VoxtralForConditionalGeneration.from_pretrained(str(out))
    batch = audio_batch([2.0, 6.0], seed=9)
    want = logits(merged.model, merged, batch)
    assert float((logits(reloaded, merged, batch) - want).abs().max()) == 0.0
    # The exported folder is itself a base the backend loads (plain, no adapter).
    plain = load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(out), adapter=""), "en")
    assert plain.generate_tokens(batch) == merged.generate_tokens(batch)


def test_export_keeps_the_checkpoint_dtype(tiny_cfg: VoxtralConfig, tmp_path: Path) -> None:
    out = tmp_path / "auto"
    export_merged(dataclasses.replace(tiny_cfg, dtype="auto"), out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("multi_modal_projector.linear_1.weight").dtype == torch.float32
    out16 = tmp_path / "bf16"
    export_merged(dataclasses.replace(tiny_cfg, dtype="bfloat16"), out16)
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert f.get_tensor("multi_modal_projector.linear_1.weight").dtype == torch.bfloat16


def test_export_refuses_a_non_empty_folder(tiny_cfg: VoxtralConfig, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_merged(tiny_cfg, tmp_path)


def test_an_unwritable_outdir_is_refused_before_the_model_loads(
    tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """A full-size base takes minutes to load and merge: an OUTDIR that cannot
    be made is refused first (here under a file; the base is missing too, and
    was what the line named), and a failed load leaves no folder behind: nor
    the folders it made above OUTDIR, which it used to leave."""
    (tmp_path / "a-file").write_text("")
    broken = dataclasses.replace(tiny_cfg, base=str(tmp_path / "no-base"))
    with pytest.raises(ExportError, match=r"cannot write .*a-file/out"):
        export_merged(broken, tmp_path / "a-file" / "out")
    with pytest.raises(BackendUnavailable, match="does not exist"):
        export_merged(broken, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        export_merged(broken, tmp_path / "new" / "models" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_write_that_fails_partway_leaves_nothing_and_the_next_try_works(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up after the weights are written (here: copying the
    tokenizer fails) left a half checkpoint in OUTDIR, which the next run
    refused as a folder that is not empty. The files now go to a folder
    beside it that is renamed once all are written."""
    out = tmp_path / "merged"
    real_copy = shutil.copyfile

    def full_disk(src: Any, dst: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(ExportError, match=r"cannot write .*merged: No space left on device"):
        export_merged(tiny_cfg, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    out.mkdir()  # an empty OUTDIR made beforehand stays usable too
    export_merged(tiny_cfg, out)
    assert (out / "tekken.json").is_file() and (out / "evoxtral_merge.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_export_reaches_the_disk_before_its_folder_is_renamed(
        tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename that publishes OUTDIR could reach the disk before the files
    in it: after a power loss OUTDIR would hold empty or short weights. Every
    file and the folder are synced before the rename, the parent after it."""
    out = tmp_path / "merged"
    done: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        done.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        done.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    export_merged(tiny_cfg, out)
    stage = str(tmp_path / ".merged.part")
    before = done[: done.index("rename")]
    assert sorted(before) == sorted([*(f"{stage}/{p.name}" for p in out.iterdir()), stage])
    assert done[done.index("rename") + 1:] == [str(tmp_path)]


def test_export_merged_command(tiny: Tiny, tmp_path: Path) -> None:
    """`evoxtral-stream export-merged OUTDIR` as a user runs it. With -q
    (warnings and errors only) stderr stays empty: transformers' "Loading
    weights" and "Writing model shards" bars were drawn there all the same."""
    out = tmp_path / "merged"
    args = ["--set", f"model.voxtral.base={str(tiny.base)!r}",
            "--set", f"model.voxtral.adapter={str(tiny.adapter)!r}", "-q"]
    proc = subprocess.run([sys.executable, "-m", "evoxtral_stream", "export-merged", str(out),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (out / "config.json").is_file() and (out / "tekken.json").is_file()
    assert list(out.glob("*.safetensors"))
    again = subprocess.run([sys.executable, "-m", "evoxtral_stream", "export-merged", str(out),
                            *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "evoxtral-stream: error:" in again.stderr and "Traceback" not in again.stderr


def test_exported_files_are_readable_as_the_umask_allows(
    tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """safetensors writes the weights through a private temporary file, so the
    export's model.safetensors was mode 0600 while every other file was 0644:
    a checkpoint exported by an admin could not be loaded by the service user
    (docs/systemd.md runs `serve` as its own user). Every file now gets the
    mode the umask gives a new file."""
    old = os.umask(0o022)
    try:
        export_merged(tiny_cfg, tmp_path / "merged")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {"0o644"}, modes
    assert oct((tmp_path / "merged").stat().st_mode & 0o777) == "0o755"


def test_the_merged_adapter_is_not_merged_into_the_export_again(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The exported folder as the base with model.voxtral.adapter still set
    (the default config sets it to the Evoxtral LoRA) loaded and merged the
    LoRA a second time, silently. The export's evoxtral_merge.json now holds
    the adapter's digest and the load refuses that adapter in one line, named
    as at the export or through a copy of its folder, also as an extra
    adapter; another adapter goes on top, with a warning."""
    out = tmp_path / "merged"
    export_merged(tiny_cfg, out)
    copy = tmp_path / "lora-copy"
    shutil.copytree(tiny.adapter, copy)
    for ref in (tiny_cfg.adapter, str(copy)):
        with pytest.raises(BackendUnavailable) as info:
            load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(out), adapter=ref), "en")
        assert str(info.value) == (
            f"LoRA adapter {ref!r} is already merged into the Voxtral base model in "
            f"{str(out)!r} (evoxtral_merge.json); set model.voxtral.adapter = \"\" to serve "
            "it as exported")
    unmerged = dataclasses.replace(tiny_cfg, base=str(out), adapter="", merge_lora=False)
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(unmerged, "en", extra_adapters={"again": str(copy)})
    assert str(info.value).endswith("remove model.voxtral.adapters.again to serve it as exported")
    with caplog.at_level("WARNING"):
        on_top = load_voxtral_backend(
            dataclasses.replace(tiny_cfg, base=str(out), adapter=str(tiny.adapter_rl)), "en")
    assert on_top.loaded.adapters == ("default",)
    assert f"already has LoRA adapter {tiny_cfg.adapter!r} merged in" in caplog.text


def test_an_adapter_merged_from_the_hub_is_refused_before_any_download(
    tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """An export of the hub's Evoxtral LoRA served with the default adapter
    setting: refused by its hub id, before the adapter is looked up (offline
    here; online it would have been downloaded first), also from a note that
    has no digest."""
    out = tmp_path / "merged"
    export_merged(dataclasses.replace(tiny_cfg, adapter=""), out)
    note = json.loads((out / "evoxtral_merge.json").read_text())
    note.update(adapter="YongkangZOU/evoxtral-lora", merged=True)
    note.pop("adapter_sha256", None)
    (out / "evoxtral_merge.json").write_text(json.dumps(note))
    cfg = dataclasses.replace(tiny_cfg, base=str(out), adapter="YongkangZOU/evoxtral-lora")
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(cfg, "en")
    assert str(info.value).startswith("LoRA adapter 'YongkangZOU/evoxtral-lora' is already "
                                      "merged into the Voxtral base model in ")


def test_export_leaves_the_compile_cache_alone(
    tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """export-merged compiles nothing, yet run with serve's config it made
    model.voxtral.compile_cache_dir (owned by whoever exported: root, for a
    service user's /var/cache/evoxtral/compile) and refused to export where
    that folder could not be written. It now leaves the setting alone."""
    from evoxtral_stream.engine.backends.voxtral.compile_cache import ENV

    monkeypatch.delenv(ENV, raising=False)
    cache = tmp_path / "cache" / "compile"
    export_merged(dataclasses.replace(tiny_cfg, compile_cache_dir=str(cache)), tmp_path / "one")
    assert not (tmp_path / "cache").exists()
    (tmp_path / "a-file").write_text("")
    unusable = str(tmp_path / "a-file" / "compile")
    export_merged(dataclasses.replace(tiny_cfg, compile_cache_dir=unusable), tmp_path / "two")
    assert (tmp_path / "two" / "model.safetensors").is_file()
    assert ENV not in os.environ


def test_export_keeps_the_base_generation_config(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path
) -> None:
    """The export wrote the generation config the engine had cut down to its
    greedy decoding (special token ids only), not the base's: an engine
    serving the export (vLLM takes its default sampling from that file)
    lost what the base asked for. The base's file is copied as it is."""
    base = tmp_path / "base"
    shutil.copytree(tiny.base, base)
    asked = json.loads((base / "generation_config.json").read_text())
    asked.update(repetition_penalty=1.1, temperature=0.2, do_sample=True)
    (base / "generation_config.json").write_text(json.dumps(asked, indent=2))
    out = tmp_path / "merged"
    export_merged(dataclasses.replace(tiny_cfg, base=str(base)), out)
    assert (out / "generation_config.json").read_bytes() == (
        base / "generation_config.json").read_bytes()


def test_extra_adapters_are_said_to_be_left_out(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """serve's config with [model.voxtral.adapters] (and the merge_lora =
    false they need) exported model.voxtral.adapter alone without a word:
    the export merges one adapter, and now says which ones it leaves out."""
    cfg = dataclasses.replace(tiny_cfg, merge_lora=False, adapters={"rl": str(tiny.adapter_rl)})
    with caplog.at_level("WARNING"):
        export_merged(cfg, tmp_path / "merged")
    assert ("model.voxtral.adapters rl not exported: only model.voxtral.adapter is merged"
            in caplog.text)
    note = json.loads((tmp_path / "merged" / "evoxtral_merge.json").read_text())
    assert note["adapter"] == tiny_cfg.adapter and note["merged"] is True


def test_an_export_of_an_export_keeps_saying_what_is_merged_in_it(
    tiny_cfg: VoxtralConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An export exported again with model.voxtral.adapter = "" (as the
    refusal to merge it twice says to set; another dtype, another shard
    size) wrote a note saying nothing was merged, so the default config's
    adapter was merged into the second export a second time, unsaid. Its
    note now carries the base's, and the warning no longer calls it plain
    Voxtral."""
    first = tmp_path / "first"
    export_merged(tiny_cfg, first)
    again = tmp_path / "again"
    with caplog.at_level("WARNING"):
        export_merged(dataclasses.replace(tiny_cfg, base=str(first), adapter=""), again)
    with pytest.raises(BackendUnavailable, match="is already merged into"):
        load_voxtral_backend(dataclasses.replace(tiny_cfg, base=str(again)), "en")
    note = json.loads((again / "evoxtral_merge.json").read_text())
    before = json.loads((first / "evoxtral_merge.json").read_text())
    assert (note["adapter"], note["adapter_sha256"], note["merged"]) == (
        before["adapter"], before["adapter_sha256"], True)
    assert "plain Voxtral" not in caplog.text
