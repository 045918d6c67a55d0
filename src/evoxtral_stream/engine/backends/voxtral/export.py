"""``evoxtral-stream export-merged OUTDIR``: the base with the LoRA merged in.

Engines without LoRA support for the audio tower and projector (vLLM and
others) can serve the result like any Voxtral checkpoint: transformers-format
safetensors (written in the layout transformers reads back on every version),
config, generation config, ``tekken.json`` and the feature-extractor config.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from evoxtral_stream.config import VoxtralConfig

from .errors import ExportError
from .load import load_model
from .merge_note import NOTE, adapter_digest, read_note

__all__ = ["ExportError", "export_merged"]

log = logging.getLogger(__name__)

# Files of the base checkpoint that the merged folder needs besides weights.
# generation_config.json too, over the one saved with the model: the engine
# cut that down to greedy decoding, while an engine serving the export takes
# its defaults from the base's own.
_COPIED = ("tekken.json", "preprocessor_config.json", "processor_config.json",
           "generation_config.json")


def export_merged(cfg: VoxtralConfig, outdir: Path, *, max_shard_size: str = "5GB") -> None:
    """Merge ``cfg.adapter`` into ``cfg.base`` and save the result in ``outdir``.

    ``outdir`` must not exist or be empty. The weights keep the dtype of the
    base checkpoint unless ``model.voxtral.dtype`` names one. Raises
    :class:`BackendUnavailable` for missing weights and :class:`ExportError`
    for an unusable ``outdir``.
    """
    outdir = Path(outdir)
    try:
        taken = outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir()))
    except OSError as e:  # a name too long, a folder on the way that cannot be searched
        raise ExportError(f"cannot write {outdir}: {e.strerror or e}") from None
    if taken:
        raise ExportError(f"{outdir} exists and is not an empty folder; choose a new OUTDIR")
    if not cfg.adapter:
        log.warning("model.voxtral.adapter is empty: exporting the base model unchanged")
    if cfg.adapters:
        # serve's config: a stream may choose them there, but one folder
        # holds one set of weights.
        log.warning("model.voxtral.adapters %s not exported: only model.voxtral.adapter is "
                    "merged", ", ".join(cfg.adapters))
    # Made before the model loads (minutes for the full size), so a place
    # that cannot be written is refused at once; removed if the export fails.
    # The files go to a folder beside it, renamed to it once all are written:
    # a write that fails partway (a full disk) leaves no half checkpoint that
    # would load, nor a folder the next try refuses as not empty.
    # The real folder: a symlink to an empty folder cannot be removed and
    # renamed over as one.
    # os.path.realpath, not Path.resolve: before Python 3.13 that raises
    # RuntimeError on a symlink loop, which realpath leaves as a link.
    shown, outdir = outdir, Path(os.path.realpath(outdir))
    if outdir.is_symlink():
        raise ExportError(f"cannot write {shown}: {os.strerror(errno.ELOOP)}")
    if outdir == Path.cwd().resolve() or outdir.parent == outdir:
        # Replaced by the finished folder, it would leave the shell that ran
        # this in a folder that is gone.
        raise ExportError(f"{shown} is the current folder; name a new OUTDIR (or run this "
                          "from its parent)")
    # OUTDIR and the folders above it that mkdir makes, the deepest first.
    made = list(itertools.takewhile(lambda p: not os.path.lexists(p),
                                    (outdir, *outdir.parents)))
    stage = outdir.with_name(f".{outdir.name}.part")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            shutil.rmtree(stage)  # left by an export that was killed
        stage.mkdir()
    except OSError as e:
        _remove_empty(made)
        raise ExportError(f"cannot write {shown}: {e.strerror or e}") from None
    try:
        _write_merged(cfg, stage, max_shard_size)
        # The rename may reach the disk before the files it publishes: after
        # a power loss OUTDIR would hold empty or short weights that load.
        for path in (*stage.iterdir(), stage):
            _fsync(path)
        outdir.rmdir()
        os.replace(stage, outdir)
        _fsync(outdir.parent)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {shown}: {e.strerror or e}") from None
        raise
    log.info("merged model written to %s", shown)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders``, the deepest first, each only if empty (one that
    cannot be removed keeps those above it too)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _write_merged(cfg: VoxtralConfig, outdir: Path, max_shard_size: str) -> None:
    # Nothing is compiled here: serve's compile cache folder is neither made
    # (by whoever exports) nor needed to be writable.
    loaded = load_model(dataclasses.replace(cfg, compile_cache_dir=""), "auto", merge=True,
                        dtype="auto" if cfg.dtype == "auto" else None)
    model: Any = loaded.model
    model.save_pretrained(str(outdir), max_shard_size=max_shard_size)
    for name in _COPIED:
        src = loaded.base.path / name
        if src.is_file():
            shutil.copyfile(src, outdir / name)
    merged_in: dict[str, object] = {"adapter": cfg.adapter, "merged": bool(cfg.adapter)}
    if loaded.adapter is not None:
        # What a load of this folder compares its adapters with (merge_note).
        merged_in["adapter_sha256"] = adapter_digest(loaded.adapter.path)
    elif (inherited := read_note(loaded.base.path)) is not None:
        # A base that is an export itself, exported again as it is (another
        # dtype, another shard size): its adapter is still merged in, and
        # the note says so, or the next load would merge it a second time.
        merged_in = {"adapter": inherited.adapter, "merged": True}
        if inherited.sha256:
            merged_in["adapter_sha256"] = inherited.sha256
    note = {
        "base": cfg.base,
        **merged_in,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "versions": _versions(),
    }
    (outdir / NOTE).write_text(json.dumps(note, indent=2) + "\n", "utf-8")
    # safetensors writes the weights through a private (0600) temporary file:
    # give them the mode the umask gives a new file, as the note just got, so
    # the service user that serves the checkpoint can read what an admin wrote.
    mode = (outdir / NOTE).stat().st_mode & 0o777
    for path in outdir.iterdir():
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("torch", "transformers", "peft", "mistral-common", "evoxtral-stream"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
