"""Load LoRA adapters onto Voxtral exactly, whatever transformers saved them.

The Evoxtral adapters were saved with transformers 4.5x, where the modules
were ``language_model.model.*``, ``audio_tower.*`` and
``multi_modal_projector.*``. From transformers 5.10 they live under
``model.language_model.*``, ``model.audio_tower.*`` and
``model.multi_modal_projector.*``; peft's own conversion then maps the
language-model keys but drops the audio-tower and projector LoRA with only a
"missing adapter keys" warning. Here every key is mapped explicitly, and after
loading each tensor is looked up on the model and compared by value: an
adapter that does not land completely is refused.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from evoxtral_stream.engine.backends.base import one_line

__all__ = [
    "OLD_TO_NEW_PREFIXES",
    "PEFT_PREFIX",
    "AdapterError",
    "SavedAdapter",
    "attach_adapter",
    "map_adapter_key",
    "merge_lora",
    "read_adapter",
    "verify_adapter",
]

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."

# transformers 4.5x module path -> transformers >= 5.10 module path.
OLD_TO_NEW_PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("audio_tower.", "model.audio_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


class AdapterError(RuntimeError):
    """An adapter cannot be loaded exactly; the message is one line for people."""


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter folder read into memory: its LoRA config and key-mapped CPU tensors.

    Read before the base model loads, so that an unreadable adapter stops a
    start at once instead of after the minute the base weights take.
    """

    folder: Path
    config: Any
    tensors: Mapping[str, torch.Tensor]


def map_adapter_key(key: str) -> str:
    """Map a saved adapter key onto the current module layout.

    Keys are ``base_model.model.<module path>.<lora param>``; old-layout
    module paths are rewritten, current ones are returned unchanged.
    """
    body = key.removeprefix(PEFT_PREFIX)
    for old, new in OLD_TO_NEW_PREFIXES:
        if body.startswith(old):
            body = new + body[len(old) :]
            break
    return PEFT_PREFIX + body


def read_adapter(folder: Path) -> SavedAdapter:
    """The LoRA config and the key-mapped tensors (on CPU) of an adapter folder."""
    from peft import LoraConfig, PeftType
    from safetensors.torch import load_file

    config_file = folder / "adapter_config.json"
    try:
        raw = json.loads(config_file.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {config_file}: {one_line(e)}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"cannot read {config_file}: it is not a JSON object")
    if raw.get("peft_type") != PeftType.LORA.value:
        raise AdapterError(
            f"adapter {str(folder)!r} is a {raw.get('peft_type')!r} adapter; only LORA is supported"
        )
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except Exception as e:  # peft raises whatever the config's fields make it raise
        raise AdapterError(f"cannot read {config_file}: {one_line(e)}") from None
    config.inference_mode = True
    weights = folder / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # SafetensorError (a truncated file) is no OSError
        raise AdapterError(f"cannot read {weights}: {one_line(e)}") from None
    if not tensors:
        # Every LoRA layer would stay at peft's zero start: plain Voxtral,
        # running under the adapter's name.
        raise AdapterError(f"{weights} holds no tensors")
    mapped: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"adapter {str(folder)!r} has an unexpected key {key!r}")
        mapped[map_adapter_key(key)] = value
    return SavedAdapter(folder, config, mapped)


def _model_key(key: str, name: str, state: Mapping[str, torch.Tensor]) -> str | None:
    """Where the saved ``key`` lives in a peft model's state dict, if anywhere."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].startswith("lora_"):
            head, tail = parts[: i + 1], parts[i + 1 :]
            for cand in ([*head, name, *tail], [*head, name, "weight"]):
                joined = ".".join(cand)
                if joined in state:
                    return joined
            return None
    return None


def verify_adapter(
    peft_model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str
) -> tuple[int, list[str]]:
    """Check that every tensor of ``tensors`` sits, equal in value, in the model.

    Returns (tensors checked, the state-dict keys of adapter parameters of
    ``name`` that no tensor set). Raises :class:`AdapterError` naming the
    first keys that did not land.
    """
    state = peft_model.state_dict()
    unlanded: list[str] = []
    seen: set[str] = set()
    for key, value in tensors.items():
        where = _model_key(key, name, state)
        if where is None:
            unlanded.append(key)
            continue
        target = state[where]
        if target.shape != value.shape or not torch.equal(
            target, value.to(target.device, target.dtype)
        ):
            unlanded.append(key)
            continue
        seen.add(where)
    if unlanded:
        shown = ", ".join(k.removeprefix(PEFT_PREFIX) for k in unlanded[:3])
        raise AdapterError(
            f"{len(unlanded)} of {len(tensors)} adapter tensors did not land on a module "
            f"(e.g. {shown})"
        )
    tag = f".{name}."
    own = [k for k in state if ".lora_" in k and (tag in k or k.endswith(f".{name}"))]
    return len(tensors), [k for k in own if k not in seen]


# peft starts these at random and their partners (lora_B, lora_embedding_B) at zero.
_RANDOM_START = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}


def _random_with_trained_partner(unset: list[str]) -> list[str]:
    """Layers of the keys in ``unset`` whose random-started half (lora_A) has
    no tensor while its zero-started partner (lora_B) got one: such a layer
    adds B @ (random A) to the model, a change nobody trained."""
    missing = set(unset)
    layers = []
    for key in unset:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part in _RANDOM_START:
                partner = ".".join([*parts[:i], _RANDOM_START[part], *parts[i + 1 :]])
                if partner not in missing:
                    layers.append(".".join(parts[:i]).removeprefix(PEFT_PREFIX))
                break
    return layers


def attach_adapter(model: nn.Module, adapter: Path | SavedAdapter, name: str) -> nn.Module:
    """Add ``adapter`` (a folder, or one already read) to ``model`` as ``name``; verify it.

    ``model`` is a transformers model (a peft model is then created) or a
    peft model (the adapter is added to it). Returns the peft model.
    """
    from peft import PeftModel, set_peft_model_state_dict

    saved = adapter if isinstance(adapter, SavedAdapter) else read_adapter(adapter)
    config, tensors, folder = saved.config, saved.tensors, saved.folder
    try:
        with warnings.catch_warnings():
            # peft asks transformers a deprecated question while wrapping; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if isinstance(model, PeftModel):
                model.add_adapter(name, config)
                peft_model: Any = model
            else:
                # A plain PeftModel (not the task-specific subclass): generation goes
                # through the wrapped transformers model, so no task head is needed.
                peft_model = PeftModel(model, config, adapter_name=name)
        # Target modules the base lacks: NoMatchingPeftModuleError (a ValueError);
        # tensors of another shape than the config's rank: a RuntimeError.
        set_peft_model_state_dict(peft_model, dict(tensors), adapter_name=name)
    except (ValueError, RuntimeError) as e:
        raise AdapterError(one_line(e)) from None
    checked, unset_keys = verify_adapter(peft_model, tensors, name)
    n_params = sum(t.numel() for t in tensors.values())
    half = _random_with_trained_partner(unset_keys)
    if half:
        raise AdapterError(
            f"adapter {str(folder)!r}: {len(half)} layer(s) have lora_B but no lora_A in the "
            f"file (e.g. {half[0]}), which peft would start at random; the file does not "
            "match its adapter_config.json")
    unset = len(unset_keys)
    if unset:
        # peft starts lora_B at zero only with these: a layer left so adds
        # nothing. Any other start (random B, or a base weight changed, as
        # PiSSA does) would run a model nobody trained.
        if config.init_lora_weights not in (True, "gaussian"):
            raise AdapterError(
                f"adapter {str(folder)!r}: {unset} LoRA parameters of its target modules have "
                f"no tensor in the file, and init_lora_weights = "
                f"{config.init_lora_weights!r} would leave them at a start that changes the "
                "model; the file does not match its adapter_config.json")
        log.warning(
            "adapter %s: %d LoRA parameters have no tensor in %s: their layers stay "
            "without adaptation",
            name,
            unset,
            folder,
        )
    log.info(
        "adapter %s: all %d tensors (%d parameters) from %s landed on the model",
        name,
        checked,
        n_params,
        folder,
    )
    return cast(nn.Module, peft_model)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """The base model of ``peft_model`` with its active LoRA merged in.

    Each weight is ``W + B @ A * scaling`` computed in float32 and rounded
    once to the weight's dtype: peft's own merge rounds the delta to that
    dtype (bfloat16) before adding it, and the sum again. Layers that peft
    merges otherwise (fan-in-fan-out, LoRA biases, DoRA and other variants)
    are left to it. Raises :class:`AdapterError` for non-finite weights.
    """
    from peft.tuners.lora import Linear as LoraLinear

    with torch.no_grad():
        for where, module in peft_model.named_modules():
            if not isinstance(module, LoraLinear):
                continue
            lora: Any = module  # peft's layers are loosely typed
            names = [n for n in lora.active_adapters if n in lora.lora_A]
            if not names or lora.merged or lora.fan_in_fan_out or any(
                lora.lora_variant.get(n) is not None or lora.lora_bias.get(n, False)
                for n in names
            ):
                continue
            weight: torch.Tensor = lora.get_base_layer().weight
            total = weight.float()
            for n in names:
                a, b = lora.lora_A[n].weight.float(), lora.lora_B[n].weight.float()
                total += (b @ a) * lora.scaling[n]
            if not torch.isfinite(total).all():
                raise AdapterError(f"merging the adapter into {where} gives non-finite weights")
            weight.data = total.to(weight.dtype)
            lora.merged_adapters.extend(names)
        with warnings.catch_warnings():
            # peft's merge finds those layers merged already: nothing left to do there.
            warnings.filterwarnings("ignore", message="All adapters are already merged")
            merged = cast(Any, peft_model).merge_and_unload(progressbar=False, safe_merge=True)
    return cast(nn.Module, merged)
