"""Evaluation manifests: JSON lines of ``{"audio": path, "text": tagged reference}``.

Blank lines are skipped; ``tagged_text`` is accepted for ``text`` (the field
name of the Evoxtral scripts), which must not be empty or blank once read as
a caption is (:func:`~.tags.normalize`, which drops control and invisible
format characters: eval scores it so). A relative
audio path is relative to the manifest's folder. Errors are
:class:`ManifestError` with one line naming the file, the line and what to
fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tags import normalize

__all__ = ["ManifestEntry", "ManifestError", "parse_manifest", "read_manifest"]


class ManifestError(ValueError):
    """A manifest cannot be used; the message is for people."""


@dataclass(frozen=True)
class ManifestEntry:
    """One evaluation sample: its audio file, tagged reference and line."""

    audio: Path
    text: str
    line: int


def parse_manifest(text: str, *, base_dir: Path | None = None,
                   source: str = "manifest") -> list[ManifestEntry]:
    """Parse manifest text (pure: files are not opened or checked).

    ``base_dir`` anchors relative audio paths; ``source`` names the manifest
    in messages.
    """
    out: list[ManifestEntry] = []
    # "\n" only: str.splitlines also splits at U+2028, U+0085 and others,
    # which JSON strings may hold raw (json.dumps(..., ensure_ascii=False)).
    for n, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{source} line {n}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deep"
            raise ManifestError(f"{where}: not valid JSON ({why}); each line must be "
                                '{"audio": ..., "text": ...}') from None
        if not isinstance(obj, dict):
            raise ManifestError(f'{where}: expected an object {{"audio": ..., "text": ...}}')
        audio = obj.get("audio")
        ref = obj.get("text", obj.get("tagged_text"))
        if not isinstance(audio, str) or not audio:
            raise ManifestError(f'{where}: "audio" must be a non-empty path string')
        if not isinstance(ref, str):
            raise ManifestError(f'{where}: "text" must be the tagged reference string')
        if not normalize(ref):
            # Nothing to score against: every prediction would get WER 0
            # and perfect tag scores. Most likely a transcript gone missing.
            raise ManifestError(f'{where}: "text" is empty, so nothing could be scored '
                                "(WER is undefined); give the reference, or drop the line")
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError as e:
            # JSON can escape one (\ud800); no text holds it, nor a report.
            raise ManifestError(f'{where}: "text" holds {ref[e.start]!r}, half of a '
                                "UTF-16 surrogate pair, which is not text") from None
        path = Path(audio)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        out.append(ManifestEntry(path, ref, n))
    if not out:
        raise ManifestError(f"{source} has no entries; add one JSON line per audio file")
    return out


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Read and parse a manifest file."""
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a BOM.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from None
    return parse_manifest(text, base_dir=path.parent, source=str(path))
