"""The protocol's JSON Schema, read from docs/protocol.md so the doc stays true."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema

__all__ = ["ROOT", "protocol_schema", "validate_message"]

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def protocol_schema() -> dict[str, Any]:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## JSON Schema", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.S)
    assert block is not None, "docs/protocol.md has no JSON Schema block"
    schema: dict[str, Any] = json.loads(block.group(1))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    # Made once: jsonschema.validate checks the schema against the
    # metaschema at every call (about 20 of its 30 ms here), which the fuzz
    # tests paid for every message their clients read, on the event loop
    # the server and engine share with them.
    return jsonschema.Draft202012Validator(protocol_schema())


def validate_message(message: str | dict[str, Any]) -> dict[str, Any]:
    """Parse (if needed) and validate one server message; return it.

    Beyond the schema (which lets clients ignore fields added later), every
    field must be one the doc names, so a field the server adds is documented.
    """
    obj: dict[str, Any] = json.loads(message) if isinstance(message, str) else message
    # The error jsonschema.validate would raise: the best match of them all.
    error = jsonschema.exceptions.best_match(_validator().iter_errors(obj))
    if error is not None:
        raise error
    defs = protocol_schema()["$defs"]
    undocumented = set(obj) - set(defs[obj["type"]]["properties"])
    for tag in obj.get("tags", []) if obj["type"] == "caption" else []:
        undocumented |= {f"tags[].{k}" for k in set(tag) - set(defs["tag"]["properties"])}
    assert not undocumented, f"{obj['type']} fields not in docs/protocol.md: {undocumented}"
    return obj
