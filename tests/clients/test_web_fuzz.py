"""The page against a seeded random caption server, in headless Chromium.

tests/helpers/page_fuzz.py draws a timeline of several streams' events
(partials that grow, revise and shrink, finals with tags and unicode, RTL
and emoji text, odd stream ids, decode failures, streams that end and open
again) with connection drops, replays cut short and server restarts (a new
epoch) among them, and plays it to the page as ``/v1/captions`` does (the
real Broadcaster answers each reconnect's since=/epoch=). Then what the page
shows is held against what docs/protocol.md and clients/README.md say it
must show, from the messages it was sent: each final once, in order, the
notes where they came, the latest partial of each open segment (marked
after a failed decode), tag chips
by kind, ended marks, the resume points of each reconnect, no markup taken
as HTML, and no JS error.

The seeds are fixed, so CI runs the same timelines every time; FUZZ_SEEDS=N
and FUZZ_SEED0=K run N seeds from K by hand.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.server import serve

from tests.clients.conftest import Browser, Page
from tests.clients.test_web import STATUS, page_files
from tests.helpers.fuzz import fuzz_seeds
from tests.helpers.page_fuzz import FuzzServer, draw_script

pytestmark = [pytest.mark.timeout(180)]

SEEDS = fuzz_seeds(3)

#: What the page shows: per stream, its lines in #finals (a final's text and
#: tag chips, or a note's text); each partial line; the picker's entries.
SNAPSHOT = """(() => {
  const lines = {};
  for (const l of document.querySelectorAll('#finals .line')) {
    (lines[l.dataset.stream] ||= []).push(l.classList.contains('note')
      ? ['note', l.textContent]
      : ['final', l.querySelector('.text').textContent,
         [...l.querySelectorAll('.tag')].map((c) => [c.textContent, c.dataset.kind])]);
  }
  const partials = [...document.querySelectorAll('#partials .line')].map((l) => {
    const text = l.querySelector('.text');
    return [l.dataset.stream, +l.dataset.segment, text.textContent,
            [...text.children].filter((c) => c.classList.contains('unstable'))
              .map((c) => c.textContent).join(''),
            l.classList.contains('failed') && l.querySelector('.flag') !== null];
  });
  const picker = Object.fromEntries([...document.querySelectorAll('#picker option')]
    .filter((o) => o.value).map((o) => [o.value, o.textContent]));
  return {lines, partials, picker, pwned: window.__pwned === 1,
          markup: document.querySelectorAll('main img, main b, main script, header img').length};
})()"""


def expected_view(server: FuzzServer) -> dict[str, Any]:
    exp = server.expected
    lines: dict[str, list[Any]] = {}
    for name, entries in exp.lines.items():
        lines[name] = [[kind, what, [list(c) for c in exp.chips[what]]] if kind == "final"
                       else [kind, what] for kind, what in entries]
    picker = {name: f"{name} (ended)" if ended else name
              for name, ended in server.end_state().items()}
    return {"lines": lines, "partials": [list(p) for p in exp.partial_lines()],
            "picker": picker, "pwned": False, "markup": 0}


def problems(seen: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """How ``seen`` (the page) differs from ``want``; notes match by the words they hold."""
    out = []
    for name in sorted(set(seen["lines"]) | set(want["lines"])):
        got, exp = seen["lines"].get(name, []), want["lines"].get(name, [])
        ok = len(got) == len(exp) and all(
            g[0] == e[0] and (all(w in g[1] for w in e[1]) if e[0] == "note" else g == e)
            for g, e in zip(got, exp, strict=True))
        if not ok:
            out.append(f"stream {name!r} lines:\n  page: {got}\n  want: {exp}")
    for key in ("partials", "picker", "pwned", "markup"):
        got_v = sorted(seen[key]) if key == "partials" else seen[key]
        if got_v != want[key]:
            out.append(f"{key}:\n  page: {got_v}\n  want: {want[key]}")
    return out


async def run_seed(page: Page, seed: int) -> list[str]:
    """Play seed's timeline to the page; the problems found (empty: none)."""
    history, script = draw_script(seed)
    fuzz = FuzzServer(seed, history)
    async with serve(fuzz.handler, "127.0.0.1", 0, process_request=page_files) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        page.errors.clear()
        await page.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
        await page.wait_for(f"location.port === '{port}' && document.readyState === "
                            f"'complete' && window.evoxtral && {STATUS} === 'live'")
        await fuzz.play(script)
        want = expected_view(fuzz)
        found: list[str] = []
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            seen = await page.evaluate(SNAPSHOT)
            found = problems(seen, want)
            if not found or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        for i, c in enumerate(fuzz.connects):
            if (c.since, c.epoch) != (c.owed_since, c.owed_epoch):
                found.append(f"connect {i + 1}: since={c.since} epoch={c.epoch}, "
                             f"want since={c.owed_since} epoch={c.owed_epoch}")
        found += [f"page error: {e}" for e in page.errors]
    return [f"seed {seed} (history {history}, {len(fuzz.connects)} connects): {p}"
            for p in found]


async def test_the_page_shows_what_a_random_caption_timeline_says(browser: Browser) -> None:
    """One tab for every seed: each loads the page anew from its own server."""
    found: list[str] = []
    page = await Page.open(browser, "about:blank#")
    try:
        for seed in SEEDS:
            found += await run_seed(page, seed)
    finally:
        await page.close()
    assert not found, "\n".join(found)
