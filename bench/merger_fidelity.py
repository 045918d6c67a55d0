"""Merger fidelity on scripted replays of the Evoxtral scripts.

Every script's tagged text is replayed through the merger as a live model
would deliver it (``evoxtral_stream.text.replay``: growing noisy partials,
forced splits with overlap and re-emitted tags, stale and late hypotheses,
segments finishing out of order), with several random schedules per script.
The table counts replays whose final captions equal the reference exactly,
stable tokens ever retracted, tags lost or duplicated, and ordering faults.

    .venv/bin/python bench/merger_fidelity.py ../shared/data/evoxtral_scripts.json
    .venv/bin/python bench/merger_fidelity.py SCRIPTS --schedules 10 --stress --json out.json

The ``stress`` row (``--stress``) uses harsher schedules than a live engine
produces (up to 8 segments, overlaps of up to 6 tokens, noise on most
partials); it shows where the merger's documented limits start to bite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evoxtral_stream.text.merger import Merger
from evoxtral_stream.text.replay import (
    ReplayConfig,
    check_replay,
    make_replay,
    run_replay,
)

__all__ = ["STRESS", "Tally", "main", "run"]

STRESS = ReplayConfig(
    max_segments=8, max_overlap_tokens=6, p_overlap=0.9, p_reemit=0.9, max_step=3,
    p_unstable=0.7, p_revision=0.4, p_late_tag=0.5, p_stale=0.3, p_late_partial=0.3,
    p_interleave=0.4, p_final_early=0.2,
)


@dataclass
class Tally:
    """Totals over the replays of one configuration."""

    name: str
    replays: int = 0
    identical: int = 0
    retracted: int = 0
    tags_lost: int = 0
    tags_duplicated: int = 0
    seq_faults: int = 0
    final_faults: int = 0
    split_faults: int = 0
    forced_seams: int = 0
    overlap_seams: int = 0
    reemitted_tags: int = 0
    hypotheses: int = 0
    events: int = 0
    final_tokens: int = 0
    stable_before_final: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "config": self.name,
            "replays": self.replays,
            "identical": self.identical,
            "identical_pct": 100.0 * self.identical / max(1, self.replays),
            "retracted_stable_tokens": self.retracted,
            "tags_lost": self.tags_lost,
            "tags_duplicated": self.tags_duplicated,
            "seq_faults": self.seq_faults,
            "final_faults": self.final_faults,
            "stable_unstable_split_faults": self.split_faults,
            "forced_seams": self.forced_seams,
            "overlap_seams": self.overlap_seams,
            "reemitted_tags": self.reemitted_tags,
            "hypotheses": self.hypotheses,
            "events": self.events,
            "stable_before_final_pct": 100.0 * self.stable_before_final
            / max(1, self.final_tokens),
            "seconds": self.seconds,
            "failures": self.failures[:20],
        }


def run(scripts: Sequence[str], name: str, config: ReplayConfig, schedules: int,
        seed: int, final_replaces_stable: bool = False) -> Tally:
    tally = Tally(name)
    t0 = time.perf_counter()
    for i, text in enumerate(scripts):
        for j in range(schedules):
            rng = random.Random(f"{seed}:{i}:{j}")
            replay = make_replay(text, rng, config, stream=f"s{i}")
            first = replay.segments[0] if replay.segments else 0
            events = run_replay(replay, Merger(
                f"s{i}", first_segment=first, final_replaces_stable=final_replaces_stable))
            check = check_replay(replay, events)
            tally.replays += 1
            tally.identical += check.identical
            tally.retracted += check.retracted
            tally.tags_lost += check.tags_lost
            tally.tags_duplicated += check.tags_duplicated
            tally.seq_faults += not check.seq_ok
            tally.final_faults += not check.finals_ok
            tally.split_faults += not check.split_ok
            tally.forced_seams += replay.forced_seams
            tally.overlap_seams += replay.overlap_seams
            tally.reemitted_tags += replay.reemitted_tags
            tally.hypotheses += len(replay.hypotheses)
            tally.events += check.events
            tally.final_tokens += check.final_tokens
            tally.stable_before_final += check.stable_before_final
            if not check.ok:
                tally.failures.append({"script": str(i), "schedule": str(j),
                                       "reference": text, "got": check.final_text})
    tally.seconds = time.perf_counter() - t0
    return tally


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / max(1, whole):.1f}%"


def _table(tallies: Sequence[Tally]) -> str:
    cols: list[tuple[str, Callable[[Tally], str]]] = [
        ("config", lambda t: t.name),
        ("replays", lambda t: str(t.replays)),
        ("identical", lambda t: f"{100.0 * t.identical / max(1, t.replays):.2f}%"),
        ("retracted", lambda t: str(t.retracted)),
        ("tags lost", lambda t: str(t.tags_lost)),
        ("tags dup", lambda t: str(t.tags_duplicated)),
        ("seq/final faults", lambda t: f"{t.seq_faults}/{t.final_faults + t.split_faults}"),
        ("forced seams", lambda t: str(t.forced_seams)),
        ("overlaps", lambda t: str(t.overlap_seams)),
        ("re-emitted tags", lambda t: str(t.reemitted_tags)),
        ("hyps", lambda t: str(t.hypotheses)),
        ("events", lambda t: str(t.events)),
        ("stable early", lambda t: _pct(t.stable_before_final, t.final_tokens)),
        ("time", lambda t: f"{t.seconds:.1f}s"),
    ]
    rows = [[c[0] for c in cols]] + [[c[1](t) for c in cols] for t in tallies]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) if k else cell.ljust(w)
                       for k, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("scripts", type=Path, help="evoxtral_scripts.json (a list of objects "
                    "with tagged_text)")
    ap.add_argument("--schedules", type=int, default=5, help="random schedules per script")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stress", action="store_true", help="also run the harsher schedules")
    ap.add_argument("--json", type=Path, help="write the numbers (and failures) here")
    ap.add_argument("--final-replaces-stable", action="store_true",
                    help="the engine's default (stream.final_replaces_stable): the final is "
                         "the final hypothesis, not the stable text plus the rest")
    args = ap.parse_args(argv)
    try:
        data = json.loads(args.scripts.read_text(encoding="utf-8"))
        scripts = [str(item["tagged_text"]) for item in data]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot read scripts from {args.scripts}: {e}", file=sys.stderr)
        return 2
    replaces = args.final_replaces_stable
    tallies = [run(scripts, "default", ReplayConfig(), args.schedules, args.seed, replaces)]
    if args.stress:
        tallies.append(run(scripts, "stress", STRESS, args.schedules, args.seed, replaces))
    print(f"Merger fidelity: {len(scripts)} scripts x {args.schedules} schedules "
          f"(seed {args.seed})")
    print(_table(tallies))
    print("identical: final captions joined == reference; retracted: stable tokens later "
          "missing; stable early: final tokens already stable in a partial")
    for t in tallies:
        for f in t.failures[:3]:
            print(f"\n[{t.name}] script {f['script']} schedule {f['schedule']}\n"
                  f"  want: {f['reference']}\n  got:  {f['got']}")
    if args.json:
        args.json.write_text(json.dumps([t.as_dict() for t in tallies], indent=2) + "\n",
                             encoding="utf-8")
    ok = all(t.identical == t.replays and t.retracted == 0 for t in tallies[:1])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
