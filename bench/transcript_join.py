"""What joining a transcript's finals costs (:func:`~evoxtral_stream.text.tags.join_texts`,
which ``subtitles --text``, eval and the realtime items use), beside the
reference: the join as first written (`c06caf9` with `c86c2d0`), whose seam
read the whole run of tag-only finals before it as one growing string.

The finals: one Chinese sentence, then N tag-only finals (``[music]``: a
long stretch of music, each segment's final only a tag), then another
sentence. Both joins give the same text (checked).

Usage: ``python bench/transcript_join.py [--runs 500,2000,4000] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from evoxtral_stream.text.tags import join_texts, seam, tokenize


def reference_join(texts: Iterable[str]) -> str:
    """The join before the bound: each seam after a tag-only final read the
    last text with words and every tag-only final since, as one string."""
    out: list[str] = []
    before: str | None = None
    for text in texts:
        if not text:
            continue
        out.append(text if before is None else seam(before, text) + text)
        if before is None or any(not t.is_tag for t in tokenize(text)):
            before = text
        else:
            before = f"{before} {text}"
    return "".join(out)


@dataclass(frozen=True)
class Row:
    tag_only_finals: int
    reference_s: float
    join_texts_s: float

    @property
    def speedup(self) -> float:
        return self.reference_s / self.join_texts_s if self.join_texts_s else float("inf")


def finals(n: int) -> list[str]:
    return ["你好。", *(["[music]"] * n), "世界。"]


def measure(n: int) -> Row:
    texts = finals(n)
    t0 = time.perf_counter()
    want = reference_join(texts)
    t1 = time.perf_counter()
    got = join_texts(texts)
    t2 = time.perf_counter()
    if got != want:
        raise AssertionError(f"the joins differ at {n} tag-only finals")
    return Row(n, t1 - t0, t2 - t1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="500,2000,4000",
                   help="tag-only finals per run, comma-separated")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = [measure(int(n)) for n in args.runs.split(",")]
    print("| tag-only finals | reference | join_texts | reference / join_texts |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.tag_only_finals:,} | {r.reference_s:.3f} s | {r.join_texts_s:.4f} s "
              f"| {r.speedup:,.0f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
