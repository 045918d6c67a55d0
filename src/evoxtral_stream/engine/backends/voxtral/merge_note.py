"""``evoxtral_merge.json``: what ``export-merged`` merged into a folder.

The export writes it; loading a base reads it so that the adapter already
merged in is not merged a second time (the default config still names the
Evoxtral LoRA after ``base`` is pointed at an export). Imports neither torch
nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NOTE", "MergeNote", "adapter_digest", "read_note"]

log = logging.getLogger(__name__)

NOTE = "evoxtral_merge.json"
_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class MergeNote:
    """The adapter merged into a folder: ``adapter`` as it was configured at
    the export (a hub id or a folder, as typed), ``sha256`` the digest of its
    ``adapter_model.safetensors`` ("" in notes written before it was kept)."""

    adapter: str
    sha256: str


def adapter_digest(folder: Path) -> str:
    """The sha256 of ``folder``'s adapter weights, hex; raises OSError."""
    digest = hashlib.sha256()
    with (folder / _WEIGHTS).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_note(folder: Path) -> MergeNote | None:
    """The note in ``folder`` if an adapter was merged into it, else None.

    A note that cannot be read is logged and treated as absent: it only
    guards against a mistake, the checkpoint itself is what loads.
    """
    path = folder / NOTE
    try:
        if not path.is_file():
            return None
        note = json.loads(path.read_text("utf-8"))
        if not isinstance(note, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s); not checking which adapter it merged", path, e)
        return None
    adapter, digest = note.get("adapter"), note.get("adapter_sha256", "")
    if note.get("merged") is not True or not isinstance(adapter, str) or not adapter:
        return None
    return MergeNote(adapter, digest if isinstance(digest, str) else "")
