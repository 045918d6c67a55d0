"""Plain HTTP GETs against a test server, from async tests."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request


async def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET, error statuses included; runs off the loop."""
    def fetch() -> tuple[int, str]:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode()
    return await asyncio.to_thread(fetch)
