"""The old-layout Evoxtral adapter lands completely and computes exactly."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable
from evoxtral_stream.engine.backends.voxtral import adapter as adapter_mod
from evoxtral_stream.engine.backends.voxtral import load as load_mod
from evoxtral_stream.engine.backends.voxtral.adapter import (
    AdapterError,
    attach_adapter,
    map_adapter_key,
)
from evoxtral_stream.engine.backends.voxtral.backend import (
    NO_ADAPTER,
    VoxtralBackend,
    load_voxtral_backend,
)

from .conftest import Tiny
from .helpers import audio_batch, logits, reference_model

TOL = 1e-4


def _fresh(tiny: Tiny) -> Any:
    from transformers import VoxtralForConditionalGeneration

    return VoxtralForConditionalGeneration.from_pretrained(str(tiny.base), dtype=torch.float32)


def test_saved_keys_use_the_old_layout(tiny: Tiny) -> None:
    keys = list(load_file(str(tiny.adapter / "adapter_model.safetensors")))
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.audio_tower.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.multi_modal_projector.linear_1.lora_A.weight" in keys
    # 2 LM layers x 7 + 2 audio layers x 3 (q/k/v) + 2 projector = 22 modules.
    assert len(keys) == 2 * 22


def test_every_old_key_maps_onto_a_module(tiny: Tiny) -> None:
    model = _fresh(tiny)
    names = dict(model.named_modules())
    for key in load_file(str(tiny.adapter / "adapter_model.safetensors")):
        module = map_adapter_key(key).removeprefix("base_model.model.").rsplit(".", 2)[0]
        assert module in names, key
    assert map_adapter_key("base_model.model.model.audio_tower.x.lora_A.weight") == (
        "base_model.model.model.audio_tower.x.lora_A.weight"
    )


def test_plain_peft_drops_the_audio_tower_and_projector_lora(tiny: Tiny) -> None:
    """The upstream behaviour this backend works around (canary for peft upgrades)."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm: Any = PeftModel.from_pretrained(_fresh(tiny), str(tiny.adapter))
    assert any("missing adapter keys" in str(w.message) for w in caught)
    base = pm.get_base_model()
    audio_b = base.get_submodule("model.audio_tower.layers.0.self_attn.q_proj").lora_B["default"]
    proj_b = base.get_submodule("model.multi_modal_projector.linear_1").lora_B["default"]
    lm_b = base.get_submodule("model.language_model.layers.0.self_attn.q_proj").lora_B["default"]
    assert float(audio_b.weight.abs().sum()) == 0.0
    assert float(proj_b.weight.abs().sum()) == 0.0
    assert float(lm_b.weight.abs().sum()) > 0.0


def test_old_layout_adapter_lands_completely(tiny: Tiny) -> None:
    pm: Any = attach_adapter(_fresh(tiny), tiny.adapter, "default")
    base = pm.get_base_model()
    for name, delta in tiny.deltas.items():
        layer = base.get_submodule(name)
        got = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(got * layer.scaling["default"], delta)
    lora_layers = [n for n, m in base.named_modules() if hasattr(m, "lora_A")]
    assert sorted(lora_layers) == sorted(tiny.deltas)


def test_an_adapter_that_does_not_land_is_refused(
    tiny: Tiny, tiny_cfg: VoxtralConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the mapping the old keys hit no module, as with plain peft.
    monkeypatch.setattr(adapter_mod, "map_adapter_key", lambda key: key)
    with pytest.raises(AdapterError, match="did not land"):
        attach_adapter(_fresh(tiny), tiny.adapter, "default")
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(tiny_cfg, "en")
    msg = str(info.value)
    assert "\n" not in msg
    assert "model.voxtral.adapter" in msg
    assert "did not land" in msg


def test_merged_and_unmerged_equal_weights_applied_directly(
    tiny: Tiny, merged: VoxtralBackend, unmerged: VoxtralBackend
) -> None:
    batch = audio_batch([2.0, 31.0, 4.5], seed=5)
    ref = logits(reference_model(tiny.base, tiny.deltas), merged, batch)
    plain = logits(reference_model(tiny.base, None), merged, batch)
    got_merged = logits(merged.model, merged, batch)
    with unmerged.use_adapter(None):
        got_unmerged = logits(unmerged.model, unmerged, batch)
    d_merged = float((got_merged - ref).abs().max())
    d_unmerged = float((got_unmerged - ref).abs().max())
    d_between = float((got_merged - got_unmerged).abs().max())
    effect = float((ref - plain).abs().max())
    print(
        f"max |merged-ref| {d_merged:.2e}, |unmerged-ref| {d_unmerged:.2e}, "
        f"|merged-unmerged| {d_between:.2e}, LoRA effect {effect:.2e}"
    )
    assert d_merged <= TOL
    assert d_unmerged <= TOL
    assert d_between <= TOL
    assert effect > 1.0  # the adapter changes the output a lot, so equality means something


def test_a_bfloat16_merge_rounds_each_weight_once(tiny: Tiny, tiny_cfg: VoxtralConfig) -> None:
    """docs/voxtral.md: merged "computed in float32, rounded once to bfloat16".
    peft's merge rounds the delta to bfloat16 first and the sum again."""
    from transformers import VoxtralForConditionalGeneration

    cls: Any = VoxtralForConditionalGeneration
    base = dict(cls.from_pretrained(str(tiny.base), dtype=torch.bfloat16).named_modules())
    got = dict(load_voxtral_backend(dataclasses.replace(tiny_cfg, dtype="bfloat16"),
                                    "en").model.named_modules())
    differ = 0
    for name, delta in tiny.deltas.items():
        once = (base[name].weight.float() + delta).to(torch.bfloat16)
        twice = base[name].weight + delta.to(torch.bfloat16)
        differ += not torch.equal(once, twice)
        assert torch.equal(got[name].weight, once), name
    assert differ  # the two roundings differ here, so the test tells them apart


def test_named_adapters_switch_at_run_time(tiny: Tiny, unmerged: VoxtralBackend) -> None:
    batch = audio_batch([3.0, 7.0], seed=6)
    assert set(unmerged.adapter_names) == {"default", "rl", NO_ADAPTER}
    assert unmerged.default_adapter == "default"
    cases = {"rl": tiny.deltas_rl, NO_ADAPTER: None, "default": tiny.deltas}
    for name, deltas in cases.items():
        ref = logits(reference_model(tiny.base, deltas), unmerged, batch)
        with unmerged.use_adapter(name):
            got = logits(unmerged.model, unmerged, batch)
        diff = float((got - ref).abs().max())
        assert diff <= TOL, (name, diff)


def test_new_layout_adapter_loads_merged(tiny: Tiny, tiny_cfg: VoxtralConfig) -> None:
    cfg = dataclasses.replace(tiny_cfg, adapter=str(tiny.adapter_rl))
    backend = load_voxtral_backend(cfg, "en")
    batch = audio_batch([3.0], seed=7)
    ref = logits(reference_model(tiny.base, tiny.deltas_rl), backend, batch)
    assert float((logits(backend.model, backend, batch) - ref).abs().max()) <= TOL


def _truncate_weights(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        cfg_file = folder / "adapter_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **changes}))

    return edit


def _config_not_an_object(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("[]")


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (_truncate_weights, "cannot read"),
        (_config_not_an_object, "not a JSON object"),
        (_edit_config(r=8), "size mismatch"),  # the tensors have rank 4
        (_edit_config(target_modules=["c_attn"]), "c_attn"),  # a GPT-2 style adapter
    ],
    ids=["truncated-weights", "config-not-an-object", "other-rank", "other-modules"],
)
def test_a_broken_or_foreign_adapter_is_one_line(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, spoil: Callable[[Path], None], says: str
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, folder)
    spoil(folder)
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, adapter=str(folder)), "en")
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert "model.voxtral.adapter" in msg
    assert says in msg


@pytest.mark.parametrize("extra", [False, True], ids=["adapter", "extra-adapter"])
@pytest.mark.parametrize("spoil", [_truncate_weights, _config_not_an_object],
                         ids=["truncated-weights", "config-not-an-object"])
def test_an_unreadable_adapter_stops_the_start_before_the_base_loads(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    spoil: Callable[[Path], None], extra: bool,
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, folder)
    spoil(folder)
    loads: list[object] = []
    real = load_mod._from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(load_mod, "_from_pretrained", spy)
    cfg = dataclasses.replace(tiny_cfg, merge_lora=False) if extra else (
        dataclasses.replace(tiny_cfg, adapter=str(folder)))
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(cfg, "en", **({"extra_adapters": {"calm": str(folder)}}
                                           if extra else {}))
    assert loads == []
    assert ("model.voxtral.adapters.calm" if extra else "set model.voxtral.adapter ") in str(
        info.value)
    assert "cannot read" in str(info.value)


@pytest.mark.parametrize("init", [True, False])
def test_an_adapter_missing_a_layers_tensors_adds_nothing_there_or_is_refused(
    tiny: Tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture, init: bool
) -> None:
    """A file that lacks the tensors of a layer its config targets: with peft's
    default start (lora_B zero) that layer adds nothing, and a warning says
    so; with init_lora_weights = false its LoRA would start random, and the
    model would differ from any trained one (it loaded with a warning)."""
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    gone = next(k for k in tensors if "lora_A" in k).rsplit(".lora_A", 1)[0]
    save_file({k: v for k, v in tensors.items() if not k.startswith(gone + ".")}, str(weights))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["init_lora_weights"] = init
    config_file.write_text(json.dumps(config))
    if not init:
        with pytest.raises(AdapterError, match="init_lora_weights = False") as info:
            attach_adapter(_fresh(tiny), folder, "default")
        assert "\n" not in str(info.value)
        return
    pm: Any = attach_adapter(_fresh(tiny), folder, "default")
    assert "their layers stay without adaptation" in caplog.text
    layer = pm.get_base_model().get_submodule(map_adapter_key(gone).removeprefix(
        adapter_mod.PEFT_PREFIX))
    assert not layer.lora_B["default"].weight.any()


def test_an_adapter_missing_a_layers_lora_a_only_is_refused(
    tiny: Tiny, tmp_path: Path
) -> None:
    """A file that holds a layer's lora_B but not its lora_A: peft starts
    lora_A at random (only lora_B starts at zero), so the layer added
    B @ random A to the model, a change nobody trained, with only the
    warning that the layer "stays without adaptation"."""
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    gone = next(k for k in sorted(tensors) if "lora_A" in k)
    save_file({k: v for k, v in tensors.items() if k != gone}, str(weights))
    with pytest.raises(AdapterError) as info:
        attach_adapter(_fresh(tiny), folder, "default")
    msg = str(info.value)
    assert "\n" not in msg
    layer = map_adapter_key(gone).removeprefix(adapter_mod.PEFT_PREFIX).rsplit(".lora_A", 1)[0]
    assert msg == (
        f"adapter {str(folder)!r}: 1 layer(s) have lora_B but no lora_A in the file (e.g. "
        f"{layer}), which peft would start at random; the file does not match its "
        "adapter_config.json")


def test_an_adapter_file_without_tensors_is_refused_before_the_base_loads(
    tiny: Tiny, tiny_cfg: VoxtralConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter_model.safetensors holding no tensors (a save that wrote
    none) loaded: every LoRA layer stayed at zero, the engine ran plain
    Voxtral and called it voxtral+lora, with one warning among the start's
    log lines."""
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    shutil.copytree(tiny.adapter, folder)
    weights = folder / "adapter_model.safetensors"
    save_file({}, str(weights))
    loads: list[object] = []
    monkeypatch.setattr(load_mod, "_from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(BackendUnavailable) as info:
        load_voxtral_backend(dataclasses.replace(tiny_cfg, adapter=str(folder)), "en")
    assert loads == []
    assert str(info.value) == (
        f"cannot use LoRA adapter {str(folder)!r} on this base model ({weights} holds no "
        "tensors); set model.voxtral.adapter to a complete adapter trained on this base")
