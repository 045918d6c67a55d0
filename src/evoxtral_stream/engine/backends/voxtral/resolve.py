"""Find the Voxtral base model and LoRA adapters on disk, or download them.

A reference (``model.voxtral.base`` / ``model.voxtral.adapter``) is either a
local folder or a Hugging Face hub id (``owner/name``). Resolution never loads
a model and never touches the network unless a download is asked for and the
hub is not in offline mode; every failure is a :class:`BackendUnavailable`
whose message is one line naming what is missing and the key to set.

This module imports neither torch nor transformers, so the engine can ask
:func:`voxtral_available` cheaply when choosing ``backend = "auto"``.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from evoxtral_stream.config import VoxtralConfig
from evoxtral_stream.engine.backends.base import BackendUnavailable, one_line
from evoxtral_stream.extras import extra_hint

__all__ = [
    "ADAPTER_FILES",
    "BASE_FILES",
    "Kind",
    "Resolved",
    "find_local",
    "hub_offline",
    "is_hub_id",
    "missing_files",
    "resolve",
    "voxtral_available",
]

log = logging.getLogger(__name__)

BASE_FILES = ("config.json", "tekken.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# What a download of the base fetches: the transformers-format weights and the
# tokenizer, not the duplicate Mistral-format `consolidated.safetensors`.
_BASE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tekken.json",
    "preprocessor_config.json",
    "processor_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "evoxtral_merge.json",  # an export-merged folder put on the hub: what it merged
]
_ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"1", "true", "yes", "on"}


class Kind(enum.Enum):
    """What a reference names; the value is the config key that sets it."""

    BASE = "model.voxtral.base"
    ADAPTER = "model.voxtral.adapter"


@dataclass(frozen=True)
class Resolved:
    """A complete local copy of ``ref``; ``source`` is folder, cache or download."""

    ref: str
    path: Path
    source: str


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def is_hub_id(ref: str) -> bool:
    """True when ``ref`` looks like ``owner/name`` and is not an existing path."""
    if ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists():
        return False
    return bool(_HUB_ID.match(ref))


def _weight_files(folder: Path) -> list[str]:
    """Names of weight files that ``folder`` should hold but does not."""
    if (folder / "model.safetensors").is_file():
        return []
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return ["model.safetensors (or model.safetensors.index.json and its shards)"]
    try:
        shards = set(json.loads(index.read_text("utf-8"))["weight_map"].values())
        if not all(isinstance(s, str) and s for s in shards):
            raise ValueError("weight_map holds something other than file names")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return [f"a readable {index.name}"]
    return sorted(s for s in shards if not (folder / s).is_file())


def missing_files(folder: Path, kind: Kind) -> list[str]:
    """Files that ``folder`` lacks to serve as a ``kind``; empty when complete."""
    names = BASE_FILES if kind is Kind.BASE else ADAPTER_FILES
    missing = [n for n in names if not (folder / n).is_file()]
    if kind is Kind.BASE:
        missing += _weight_files(folder)
    return missing


def _cache_entry(repo_id: str, kind: Kind) -> tuple[Path, list[str]] | None:
    """The hub-cache snapshot folder of ``repo_id`` and the files it lacks
    (empty when complete), or None when it is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    probe = BASE_FILES[0] if kind is Kind.BASE else ADAPTER_FILES[0]
    try:
        hit = try_to_load_from_cache(repo_id, probe)
    except Exception:  # an invalid id or cache layout is just "not cached"
        return None
    if not isinstance(hit, str):
        return None
    folder = Path(hit).parent
    return folder, missing_files(folder, kind)


def _cached_snapshot(repo_id: str, kind: Kind) -> Path | None:
    """The hub-cache snapshot folder of ``repo_id`` if it is complete, else None."""
    entry = _cache_entry(repo_id, kind)
    return entry[0] if entry is not None and not entry[1] else None


def find_local(ref: str, kind: Kind) -> Resolved | None:
    """A complete local copy of ``ref`` (folder or hub cache), or None."""
    if not ref:
        return None
    if not is_hub_id(ref):
        folder = Path(ref).expanduser()
        try:
            if folder.is_dir() and not missing_files(folder, kind):
                return Resolved(ref, folder.resolve(), "folder")
        except OSError:  # a name too long, a folder that cannot be searched
            pass  # not usable here; resolve() says why
        return None
    snap = _cached_snapshot(ref, kind)
    return Resolved(ref, snap, "cache") if snap is not None else None


def _label(kind: Kind) -> str:
    return "Voxtral base model" if kind is Kind.BASE else "LoRA adapter"


def _hint(kind: Kind, folder: str = "", *, hub: bool = False, key: str | None = None) -> str:
    """What to set: a local folder (``folder`` qualifies it), a hub id when
    ``hub``, and for ``model.voxtral.adapter`` "" (plain Voxtral), always
    last. ``key`` names another key that set the reference (an extra
    adapter, which cannot be "")."""
    places = [f"a local folder{folder}", *(["a hub id"] if hub else [])]
    if kind is Kind.ADAPTER and key is None:
        places.append('"" for plain Voxtral')
    return f"set {key or kind.value} to " + ", or to ".join(places)


def _download(ref: str, kind: Kind, key: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = _BASE_PATTERNS if kind is Kind.BASE else _ADAPTER_PATTERNS
    log.info("downloading %s %s from the Hugging Face hub (first run)", _label(kind), ref)
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as e:  # network, auth and hub errors all end the same way
        raise BackendUnavailable(
            f"could not download {_label(kind)} {ref!r} ({one_line(e)}); check the network "
            f"and `hf auth login`, or {_hint(kind, key=key)}"
        ) from None


def resolve(ref: str, kind: Kind, *, download: bool = True, key: str | None = None) -> Resolved:
    """Return a complete local copy of ``ref``, downloading it when allowed.

    Downloads happen only for hub ids, when ``download`` is true and the hub
    is not offline. Raises :class:`BackendUnavailable` (one line) otherwise,
    naming ``key`` as the setting to change (default: ``kind``'s own key).
    """
    label = _label(kind)
    if not is_hub_id(ref):
        folder = Path(ref).expanduser()
        try:
            # Path.is_dir and is_file raise where the answer is not "none
            # there": a name too long, a folder this user may not search.
            found = folder.is_dir()
            a_file = not found and folder.is_file()
            missing = missing_files(folder, kind) if found else []
        except OSError as e:
            raise BackendUnavailable(
                f"{label} folder {ref!r} cannot be read ({e.strerror or e}); "
                f"{_hint(kind, hub=True, key=key)}"
            ) from None
        if a_file:
            # model.safetensors or adapter_model.safetensors itself, named
            # instead of the folder that holds it beside its config.
            raise BackendUnavailable(
                f"{label} folder {ref!r} is a file, not a folder; "
                f"set {key or kind.value} to the folder that holds it"
            )
        if not found:
            raise BackendUnavailable(
                f"{label} folder {ref!r} does not exist; {_hint(kind, hub=True, key=key)}"
            )
        if missing:
            raise BackendUnavailable(
                f"{label} folder {str(folder)!r} lacks {', '.join(missing)}; "
                f"{_hint(kind, ' that holds them', hub=True, key=key)}"
            )
        return Resolved(ref, folder.resolve(), "folder")
    local = find_local(ref, kind)
    if local is not None:
        return local
    if not download or hub_offline():
        # An entry that lacks files (a download cut short, an `hf download`
        # of some files only) is there: "not in the cache" would send the
        # user looking for the wrong fault.
        entry = _cache_entry(ref, kind)
        why = ("no local folder, not in the Hugging Face cache" if entry is None or not entry[1]
               else f"its Hugging Face cache entry lacks {', '.join(entry[1])}")
        raise BackendUnavailable(
            f"{label} {ref!r} is not available offline ({why}); download it "
            f"(hf download {ref}) or {_hint(kind, key=key)}"
        )
    path = _download(ref, kind, key)
    missing = missing_files(path, kind)
    if missing:
        raise BackendUnavailable(
            f"{label} {ref!r} on the hub lacks {', '.join(missing)}; {_hint(kind, key=key)}"
        )
    return Resolved(ref, path, "download")


def voxtral_available(cfg: VoxtralConfig) -> tuple[bool, str]:
    """Whether ``backend = "auto"`` should pick Voxtral, and why (one line).

    True only when the base, the adapter (if one is set) and each extra
    adapter of ``cfg.adapters`` are complete on disk and a CUDA device is
    usable. Loads no model and uses no network.
    """
    refs = [(cfg.base, Kind.BASE, None), (cfg.adapter, Kind.ADAPTER, None),
            *((ref, Kind.ADAPTER, f"model.voxtral.adapters.{name}")
              for name, ref in cfg.adapters.items())]
    for ref, kind, key in refs:
        if kind is Kind.ADAPTER and not ref and key is None:
            continue
        if find_local(ref, kind) is None:
            where = "local folder" if not is_hub_id(ref) else "Hugging Face cache entry"
            what = _label(kind) if key is None else "extra LoRA adapter"
            return False, f"{what} {ref!r} not found (no complete {where}; {key or kind.value})"
    if cfg.device == "cpu":
        return False, "model.voxtral.device is cpu; Voxtral is chosen automatically only on CUDA"
    try:
        import torch
    except ImportError:
        return False, f"torch is not installed ({extra_hint('voxtral')})"
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False, f"transformers/peft are not installed ({extra_hint('voxtral')})"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    index = int(cfg.device[5:]) if cfg.device.startswith("cuda:") else 0
    if index >= torch.cuda.device_count():
        return False, f"model.voxtral.device is {cfg.device} but there is no such CUDA device"
    name = torch.cuda.get_device_name(index)
    return True, f"Voxtral weights found and CUDA available ({name})"
