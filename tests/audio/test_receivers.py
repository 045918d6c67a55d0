"""A route's receiver that raises: logged, counted, never raised into the capture."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from evoxtral_stream.audio.receivers import RouteReceiver

BLOCK = np.zeros(160, dtype=np.int16)


def _refusing(refuse: set[int]) -> tuple[RouteReceiver, list[int]]:
    taken: list[int] = []
    calls = [0]

    def on_audio(samples: np.ndarray) -> None:
        calls[0] += 1
        if calls[0] in refuse:
            raise RuntimeError(f"refused block {calls[0]}")
        taken.append(calls[0])

    return RouteReceiver(on_audio, "audio route 1 of 1"), taken


def test_a_run_of_failures_that_lasts_to_the_end_is_counted_at_the_end(
        caplog: pytest.LogCaptureFixture) -> None:
    """Blocks 3 to 10 of 10 are refused: the first failure is logged with its
    traceback, and the end's report says how many failed in all, though the
    run never ended with a block taken."""
    receiver, taken = _refusing(set(range(3, 11)))
    with caplog.at_level(logging.INFO, logger="evoxtral_stream.audio"):
        for _ in range(10):
            receiver(BLOCK)
        receiver.report_rest()
    assert taken == [1, 2]
    assert receiver.failures == 8
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert caplog.records[0].exc_info and "refused block 3" in str(caplog.records[0].exc_info[1])
    assert "8" in lines[1] and "in all" in lines[1], lines[1]
    receiver.report_rest()  # said once
    assert len(caplog.records) == 2


def test_a_run_that_ends_is_said_once_and_the_end_adds_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    receiver, taken = _refusing({2, 3, 4})
    with caplog.at_level(logging.INFO, logger="evoxtral_stream.audio"):
        for _ in range(6):
            receiver(BLOCK)
        receiver.report_rest()
    assert taken == [1, 5, 6]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "takes audio again after 3 failed block(s)" in lines[1]
