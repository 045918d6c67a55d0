"""Missing weights, libraries or devices: one line naming the key to set."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends import voxtral
from evoxtral_stream.engine.backends.base import BackendUnavailable
from evoxtral_stream.engine.backends.voxtral import resolve as resolve_mod
from evoxtral_stream.engine.backends.voxtral import voxtral_available
from evoxtral_stream.engine.backends.voxtral.backend import load_voxtral_backend

from .conftest import Tiny


def _refused(cfg: VoxtralConfig) -> str:
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(cfg, "en")
    msg = str(info.value)
    assert "\n" not in msg
    # No chained traceback behind the line (raised outside except, or "from None").
    assert info.value.__context__ is None or info.value.__suppress_context__
    return msg


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_missing_base_is_one_line(tiny_cfg: VoxtralConfig, empty_hub_cache: Path) -> None:
    cfg = dataclasses.replace(tiny_cfg, base="mistralai/Voxtral-Mini-3B-2507")
    msg = _refused(cfg)
    assert msg == (
        "Voxtral base model 'mistralai/Voxtral-Mini-3B-2507' is not available offline (no local "
        "folder, not in the Hugging Face cache); download it (hf download "
        "mistralai/Voxtral-Mini-3B-2507) or set model.voxtral.base to a local folder"
    )


def test_unknown_language_is_one_line(tiny_cfg: VoxtralConfig) -> None:
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(tiny_cfg, "english")
    assert str(info.value) == (
        "model.language 'english' is not a language Voxtral transcribes; use one of "
        "auto, de, en, es, fr, hi, it, nl, pt")


def test_a_language_is_one_of_the_codes_exactly(tiny_cfg: VoxtralConfig) -> None:
    """model.language "EN" (or "", " en") was taken: the engine then offered
    streams "EN" beside "en" in hello, and "EN" was refused per stream."""
    for code in ("EN", "", " en", "Auto"):
        with pytest.raises(BackendUnavailable, match=r"is not a language Voxtral transcribes"):
            load_voxtral_backend(tiny_cfg, code)


def test_missing_adapter_is_one_line(tiny_cfg: VoxtralConfig, empty_hub_cache: Path) -> None:
    cfg = dataclasses.replace(tiny_cfg, adapter="YongkangZOU/evoxtral-lora")
    msg = _refused(cfg)
    assert "LoRA adapter 'YongkangZOU/evoxtral-lora' is not available offline" in msg
    assert 'set model.voxtral.adapter to a local folder, or to "" for plain Voxtral' in msg


def test_missing_and_incomplete_folders(
    tiny_cfg: VoxtralConfig, tiny: Tiny, tmp_path: Path
) -> None:
    msg = _refused(dataclasses.replace(tiny_cfg, base=str(tmp_path / "nowhere")))
    assert msg.endswith("does not exist; set model.voxtral.base to a local folder, "
                        "or to a hub id")
    partial = tmp_path / "partial"
    shutil.copytree(tiny.base, partial)
    (partial / "tekken.json").unlink()
    msg = _refused(dataclasses.replace(tiny_cfg, base=str(partial)))
    assert msg.endswith("lacks tekken.json; set model.voxtral.base to a local folder that "
                        "holds them, or to a hub id")
    msg = _refused(dataclasses.replace(tiny_cfg, adapter=str(tmp_path)))
    assert msg.endswith("lacks adapter_config.json, adapter_model.safetensors; set "
                        "model.voxtral.adapter to a local folder that holds them, or to a "
                        'hub id, or to "" for plain Voxtral')
    msg = _refused(dataclasses.replace(tiny_cfg, adapter=str(tmp_path / "nowhere")))
    assert msg.endswith("does not exist; set model.voxtral.adapter to a local folder, or to "
                        'a hub id, or to "" for plain Voxtral')


def test_failed_download_is_one_line(
    tiny_cfg: VoxtralConfig, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    def no_network(*args: object, **kwargs: object) -> str:
        raise OSError("Connection refused\nmore detail that must not show")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    msg = _refused(dataclasses.replace(tiny_cfg, base="mistralai/Voxtral-Mini-3B-2507"))
    assert msg.startswith("could not download Voxtral base model 'mistralai/Voxtral-Mini-3B-2507'")
    assert "OSError: Connection refused" in msg
    assert "model.voxtral.base" in msg


def test_hub_cache_copy_is_found(
    tiny_cfg: VoxtralConfig, tiny: Tiny, empty_hub_cache: Path
) -> None:
    snap = empty_hub_cache / "models--someone--tiny-voxtral" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny.base, snap)
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    cfg = dataclasses.replace(tiny_cfg, base="someone/tiny-voxtral", adapter="")
    found = resolve_mod.find_local("someone/tiny-voxtral", resolve_mod.Kind.BASE)
    assert found is not None
    assert found.source == "cache"
    backend = load_voxtral_backend(cfg, "en")
    assert backend.loaded.base.source == "cache"
    assert backend.name == "voxtral"


def test_an_incomplete_hub_cache_entry_says_what_it_lacks(
    tiny_cfg: VoxtralConfig, tiny: Tiny, empty_hub_cache: Path
) -> None:
    """Offline, a cache entry that lacks files (a download cut short, or an
    `hf download` that fetched only the JSON files) is said to lack them,
    not to be absent from the cache: the user just downloaded into it."""
    for kind, files, ref in [
        ("base", ("config.json", "tekken.json"), "someone/tiny-voxtral"),
        ("adapter", ("adapter_config.json",), "someone/tiny-lora"),
    ]:
        snap = empty_hub_cache / f"models--{ref.replace('/', '--')}" / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        for name in files:
            shutil.copyfile((tiny.base if kind == "base" else tiny.adapter) / name, snap / name)
        (snap.parent.parent / "refs").mkdir()
        (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    msg = _refused(dataclasses.replace(tiny_cfg, base="someone/tiny-voxtral", adapter=""))
    assert msg == (
        "Voxtral base model 'someone/tiny-voxtral' is not available offline (its Hugging Face "
        "cache entry lacks model.safetensors (or model.safetensors.index.json and its shards)); "
        "download it (hf download someone/tiny-voxtral) or set model.voxtral.base to a local "
        "folder")
    msg = _refused(dataclasses.replace(tiny_cfg, adapter="someone/tiny-lora"))
    assert msg.startswith(
        "LoRA adapter 'someone/tiny-lora' is not available offline (its Hugging Face cache "
        "entry lacks adapter_model.safetensors); download it (hf download someone/tiny-lora)")


def test_cuda_device_without_cuda(tiny_cfg: VoxtralConfig) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = _refused(dataclasses.replace(tiny_cfg, device="cuda"))
    assert "no CUDA device is available" in msg
    assert "model.voxtral.device" in msg


def test_extra_adapters_need_unmerged_mode(tiny_cfg: VoxtralConfig, tiny: Tiny) -> None:
    with pytest.raises(BackendUnavailable, match="merge_lora = false"):
        load_voxtral_backend(tiny_cfg, "en", extra_adapters={"rl": str(tiny.adapter_rl)})


def test_a_broken_extra_adapter_names_its_own_key(
    tiny_cfg: VoxtralConfig, tiny: Tiny, tmp_path: Path, empty_hub_cache: Path
) -> None:
    """[model.voxtral.adapters] rl = ...: the line says to fix model.voxtral.adapters.rl,
    not model.voxtral.adapter (which is fine), and offers no "" (refused there)."""
    cfg = dataclasses.replace(tiny_cfg, merge_lora=False)
    key = "set model.voxtral.adapters.rl to a local folder"
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny.adapter_rl, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for ref in (str(tmp_path / "nowhere"), str(tiny.base), "someone/not-cached", str(truncated)):
        with pytest.raises(BackendUnavailable) as info:
            load_voxtral_backend(cfg, "en", extra_adapters={"rl": ref})
        msg = str(info.value)
        assert key in msg or "set model.voxtral.adapters.rl to a complete adapter" in msg, msg
        assert "model.voxtral.adapter " not in msg and "plain Voxtral" not in msg, msg


def test_available_is_cheap_and_says_why(
    tiny_cfg: VoxtralConfig, tiny: Tiny, empty_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hub = dataclasses.replace(tiny_cfg, base="mistralai/Voxtral-Mini-3B-2507")
    ok, why = voxtral_available(hub)
    assert not ok
    assert "not found" in why
    assert "model.voxtral.base" in why
    ok, why = voxtral_available(tiny_cfg)
    assert not ok
    assert "device is cpu" in why
    auto = dataclasses.replace(tiny_cfg, device="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert voxtral_available(auto) == (False, "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    ok, why = voxtral_available(auto)
    assert ok, why
    assert "Fake GPU" in why
    # An extra adapter that is not there: auto takes Whisper, saying which,
    # instead of choosing Voxtral and then failing to load it.
    extra = dataclasses.replace(auto, merge_lora=False,
                                adapters={"rl": str(tiny.adapter), "calm": str(tmp_path / "no")})
    ok, why = voxtral_available(extra)
    assert not ok
    assert why == (f"extra LoRA adapter {str(tmp_path / 'no')!r} not found "
                   "(no complete local folder; model.voxtral.adapters.calm)"), why
    ok, why = voxtral_available(dataclasses.replace(extra, adapters={"rl": str(tiny.adapter)}))
    assert ok, why


def test_package_import_does_not_load_torch_modules() -> None:
    # The engine imports the package to ask voxtral_available; it must not
    # pull in the backend (and transformers) until a load is asked for.
    import subprocess
    import sys

    code = (
        "import sys; import evoxtral_stream.engine.backends.voxtral as v; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout.split()
    assert out == ["False", "False"]
    assert callable(voxtral.load_voxtral_backend)


def test_truncated_base_weights_are_one_line(
    tiny_cfg: VoxtralConfig, tiny: Tiny, tmp_path: Path
) -> None:
    folder = tmp_path / "base"
    shutil.copytree(tiny.base, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    msg = _refused(dataclasses.replace(tiny_cfg, base=str(folder), adapter=""))
    assert "cannot load the Voxtral base model" in msg
    assert "model.voxtral.base" in msg
