"""A route's receiver as a capture calls it: one that raises costs the
others nothing.

Used by the microphone's routes, a live pipe's and a file's channels as
they are played together (``run.play_together``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from evoxtral_stream.events import Int16Array

if TYPE_CHECKING:
    from evoxtral_stream.audio.microphone import AudioCallback, ChannelRoute

__all__ = ["REPORT_EVERY_S", "RouteReceiver"]

logger = logging.getLogger(__name__)

#: Warnings at most this often, in seconds (a capture's drops and
#: overflows, a receiver's failures): a device that overflows on every other
#: block, or a loop late as often, would log a line per drain. What comes
#: meanwhile is in the next line (or the one at stop, or when the device is
#: lost); the counters carry the exact numbers.
REPORT_EVERY_S = 10.0


class RouteReceiver:
    """A route's receiver as a capture calls it (on the loop). A receiver
    that raises (its stream closed under the capture, a bug) is logged and
    counted, never raised into the capture: the routes after it still get
    the block, and the blocks after it still go out. The block counts as
    delivered all the same, so the route's timeline stays the other
    routes', and a receiver that takes audio again resumes where they are.

    The first failure of a run of them is logged with its traceback, and
    the run's end with its length, at most every :data:`REPORT_EVERY_S`
    per route: a run that starts sooner is logged once that is due, if it
    lasts; the failures of runs not logged are counted in the next line, or
    in the one :meth:`report_rest` logs (at stop, when the device is lost,
    at the pipe's end), which also says the length of a logged run still
    going. :attr:`failures` counts them all."""

    def __init__(self, on_audio: AudioCallback, name: str) -> None:
        self.on_audio = on_audio
        self.name = name
        self.failures = 0
        self._run = 0                # failures since the last block it took
        self._run_logged = False
        self._run_said = 0           # of a logged run, the length report_rest said
        self._reported = 0           # failures a logged line accounts for
        self._logged_at = -math.inf  # time.monotonic()

    @classmethod
    def for_routes(cls, routes: Sequence[ChannelRoute]) -> list[RouteReceiver]:
        """One per route, named by its place and channels in the log."""
        def channels(route: ChannelRoute) -> str:
            if not route.channels:
                return ""
            word = "channel" if len(route.channels) == 1 else "channels"
            return f" ({word} {', '.join(map(str, route.channels))})"
        return [cls(r.on_audio, f"audio route {i} of {len(routes)}{channels(r)}")
                for i, r in enumerate(routes, 1)]

    def __call__(self, samples: Int16Array) -> None:
        try:
            self.on_audio(samples)
        except Exception:
            self.failures += 1
            self._run += 1
            now = time.monotonic()
            if self._run_logged:
                self._reported += 1  # the run's end line counts it
            elif now - self._logged_at >= REPORT_EVERY_S:
                self._run_logged, self._logged_at = True, now
                earlier = self.failures - 1 - self._reported
                self._reported = self.failures
                logger.error(
                    "%s failed to take a block of audio%s; its stream misses the blocks "
                    "it refuses, the other routes get theirs", self.name,
                    f" ({earlier} earlier failure(s) not logged)" if earlier else "",
                    exc_info=True)
            return
        if self._run:
            if self._run_logged:
                logger.info("%s takes audio again after %d failed block(s)",
                            self.name, self._run)
            self._run, self._run_logged, self._run_said = 0, False, 0

    def report_rest(self) -> None:
        """Log the failures no line has counted yet, now."""
        if self._run_logged and self._run > self._run_said:
            # A logged run still going: its end line, which would count it,
            # has not come (and may never).
            self._run_said = self._run
            logger.warning("%s has failed %d block(s) in a row so far (%d in all)",
                           self.name, self._run, self.failures)
        if self.failures > self._reported:
            logger.warning("%s failed %d more block(s) (%d in all)", self.name,
                           self.failures - self._reported, self.failures)
            self._reported = self.failures
