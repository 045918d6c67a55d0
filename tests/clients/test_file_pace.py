"""--file's pacing: FilePace on its own (a clock of numbers), and FileFeed
sending through stand-in connections that stall or withhold their
acknowledgements. The real server behind a stalled link: test_mic_client.py."""

from __future__ import annotations

import asyncio
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mic_client import ACK_STEP, FileFeed, FilePace, Progress, past_bound, path_feed

from evoxtral_stream.audio.sources import AudioInputError
from evoxtral_stream.events import SAMPLE_RATE, Int16Array
from tests.helpers.audio import HAVE_SOX

CHUNK = SAMPLE_RATE // 10  # FileFeed's 100 ms messages
S = SAMPLE_RATE            # one second of samples


def sendable_now(pace: FilePace, position: int, now: float, end: int) -> int:
    """Where a sender at ``position`` gets to at ``now`` without waiting
    (chunk by chunk, no acknowledgements): the burst it may send. A chunk
    due at ``now`` exactly goes too (whatever the floating point says)."""
    while position < end and pace.wait_s(position, now) < 1e-9:
        position += CHUNK
    return position


def test_on_schedule_each_chunk_waits_for_its_time() -> None:
    pace = FilePace(2.0)
    pace.start(0, 100.0)
    assert pace.wait_s(0, 100.0) == 0
    assert pace.wait_s(CHUNK, 100.0) == pytest.approx(0.1)
    assert pace.wait_s(CHUNK, 100.04) == pytest.approx(0.06)
    assert pace.wait_s(3 * S, 100.5) == pytest.approx(2.5)
    assert pace.delayed == 0


def test_up_to_the_bound_behind_it_catches_up_on_the_same_schedule() -> None:
    pace = FilePace(2.0)
    pace.start(0, 0.0)
    # 1.95 s late: everything due by now goes at once, then real time again.
    assert sendable_now(pace, S, 2.95, 60 * S) == 3 * S
    assert pace.wait_s(3 * S, 2.95) == pytest.approx(0.05)
    assert pace.delayed == 0


def test_a_stall_moves_the_rest_of_the_file_later_instead_of_a_burst() -> None:
    """1 s sent, then a 9 s stall: the old schedule had 9 s due at once; the
    pace lets the bound's 2 s go (and the chunk due just then) and moves the
    rest 7 s later."""
    pace = FilePace(2.0)
    pace.start(0, 0.0)
    assert sendable_now(pace, S, 10.0, 60 * S) == 3 * S + CHUNK
    assert pace.delayed == pytest.approx(7.0)
    assert pace.wait_s(3 * S + CHUNK, 10.0) == pytest.approx(0.1)
    assert pace.wait_s(4 * S, 10.5) == pytest.approx(0.5)  # real time again
    # A second stall adds to it.
    assert sendable_now(pace, 4 * S, 20.0, 60 * S) == 6 * S + CHUNK
    assert pace.delayed == pytest.approx(7.0 + 7.0)


def test_audio_sent_and_not_acknowledged_counts_as_behind() -> None:
    """3 s sent, 1 s of it acknowledged, and the stall ends at 10 s: the
    server's audio is 9 s behind. With 2 s held up in the sockets (and on
    their way to the server at once), no more goes now."""
    pace = FilePace(2.0)
    pace.start(0, 0.0)
    assert pace.wait_s(3 * S, 10.0, unacknowledged=2 * S) == pytest.approx(0, abs=1e-9)
    assert pace.delayed == pytest.approx(7.0)
    assert pace.wait_s(3 * S + CHUNK, 10.0, unacknowledged=2 * S + CHUNK) \
        == pytest.approx(0.1)
    # Counting from the audio sent, it would have let 2 s more go.
    other = FilePace(2.0)
    other.start(0, 0.0)
    assert sendable_now(other, 3 * S, 10.0, 60 * S) == 5 * S + CHUNK


def test_a_new_connection_starts_its_schedule_where_the_file_is() -> None:
    pace = FilePace(2.0)
    pace.start(0, 0.0)
    pace.wait_s(S, 10.0)                 # a stall, then the connection is lost
    delayed = pace.delayed
    pace.start(5 * S, 50.0)              # reconnected at 50 s: no backlog from the wait
    assert sendable_now(pace, 5 * S, 50.0, 60 * S) == 5 * S + CHUNK
    assert pace.wait_s(6 * S, 50.0) == pytest.approx(1.0)
    assert pace.delayed == delayed


def test_the_audio_not_acknowledged_stays_within_the_bound() -> None:
    pace = FilePace(1.0)
    assert pace.acknowledged_before(0, CHUNK) == 0
    assert pace.acknowledged_before(S - CHUNK, CHUNK) == 0
    assert pace.acknowledged_before(S, CHUNK) == CHUNK
    assert pace.acknowledged_before(5 * S, 700) == 4 * S + 700
    assert past_bound(S + 1, 1.0) == 1 and past_bound(S, 1.0) == 0


def test_the_bound_leaves_room_for_an_acknowledgement() -> None:
    """The server acknowledges each half second: a smaller bound would wait
    for ever for the acknowledgement of audio it may not send."""
    FilePace(0.5)
    with pytest.raises(ValueError, match=r"at least 0\.5 s"):
        FilePace(0.4)


# --- FileFeed through stand-in connections --------------------------------------------


def numbered_chunks(n: int) -> Int16Array:
    """``n`` 100 ms chunks, chunk i filled with i."""
    return np.repeat(np.arange(n), CHUNK).astype(np.int16)


class Link:
    """Stands in for the connection: records each chunk's number and when it
    went; while ``flowing`` is clear, ``send`` waits, as on a stalled link
    whose socket buffers are full."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.sent: list[tuple[float, int]] = []

    async def send(self, data: bytes) -> None:
        await self.flowing.wait()
        self.sent.append((time.monotonic(), int(np.frombuffer(data, "<i2")[0])))

    def chunks(self) -> list[int]:
        return [n for _, n in self.sent]


async def test_after_a_stalled_socket_the_file_bursts_no_more_than_the_bound() -> None:
    """No acknowledgements: the socket stalls for 2 s. When it moves, the
    feed sends what was due by then only up to its bound (0.5 s), not the
    2 s it fell behind, and nothing is skipped."""
    feed = FileFeed(numbered_chunks(60), max_behind_s=0.5)
    link, stop = Link(), asyncio.Event()
    sending = asyncio.ensure_future(feed.send(link, stop))  # type: ignore[arg-type]
    await asyncio.sleep(0.35)
    link.flowing.clear()
    await asyncio.sleep(2.0)
    link.flowing.set()
    before = len(link.sent)
    # What went at once is what the feed sends on waking, before it next
    # waits for the clock: a chunk that is due goes without a sleep, and the
    # flowing link takes it without yielding. Its wake-up was queued by
    # set(), before this task's own, so one turn of the loop sees the whole
    # burst, however late a loaded machine runs it (counting what was sent
    # within 50 ms of the resume did not).
    await asyncio.sleep(0)
    at_once = link.chunks()[before:]
    await asyncio.sleep(0.35)
    stop.set()
    await asyncio.wait_for(sending, 5)
    # The chunk the stall held, and 0.5 s behind: up to 6 more.
    assert 4 <= len(at_once) <= 7, at_once
    assert link.chunks() == list(range(len(link.sent)))
    # The schedule moved later by how far behind it the audio after the held
    # chunk was at the resume, less the bound: from chunk 0's send (the
    # schedule's start, in the same step) to the held chunk's (the resume, in
    # the step of the next chunk's wait), less the audio up to there. About
    # 1.3-1.4 s for a stall of 2 s, more where the loop woke late.
    (start, _), (woke, held) = link.sent[0], link.sent[before]
    behind = woke - start - (held + 1) * CHUNK / SAMPLE_RATE
    assert feed.pace.delayed == pytest.approx(behind - 0.5, abs=0.05), (behind, feed.pace.delayed)
    assert feed.pace.delayed > 1.3, feed.pace.delayed


class WatchedProgress(Progress):
    """A real :class:`Progress` that says when the feed waits on it (the
    feed asks it only when it may send no more until the server
    acknowledges more): ``waits`` holds the frames each wait was for, and
    ``waiting`` is set at each."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[int] = []
        self.waiting = asyncio.Event()

    async def reach(self, frames: int) -> None:
        self.waits.append(frames)
        self.waiting.set()
        await super().reach(frames)


async def test_the_file_waits_for_acknowledgements_and_drops_nothing() -> None:
    """A server that acknowledges, and then does not for a while: the feed
    sends its bound (0.5 s) and waits; each acknowledgement lets as much go
    again. Stopping while it waits ends it; a lost connection while it waits
    loses nothing, and the next one goes on from there.

    What went is read when the feed starts waiting for an acknowledgement,
    not after a fixed sleep: a loaded machine that wakes the feed late for
    its last chunk before the bound (due 0.4 s in) would leave it unsent at
    a test reading at 0.7 s."""
    feed = FileFeed(numbered_chunks(15), max_behind_s=0.5)
    link, stop, acks = Link(), asyncio.Event(), WatchedProgress()
    sending = asyncio.ensure_future(feed.send(link, stop, acks))  # type: ignore[arg-type]
    await asyncio.wait_for(acks.waiting.wait(), 10)
    assert link.chunks() == [0, 1, 2, 3, 4]      # 0.5 s not acknowledged
    assert acks.waits == [CHUNK]                 # chunk 5 waits for chunk 0's
    acks.waiting.clear()
    acks.acknowledge(3 * CHUNK)
    await asyncio.wait_for(acks.waiting.wait(), 10)
    assert link.chunks() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert acks.waits == [CHUNK, 4 * CHUNK]
    sending.cancel()                             # the connection is lost
    await asyncio.gather(sending, return_exceptions=True)
    again, progress = Link(), WatchedProgress()
    sending = asyncio.ensure_future(feed.send(again, stop, progress))  # type: ignore[arg-type]
    await asyncio.wait_for(progress.waiting.wait(), 10)
    assert again.chunks() == [8, 9, 10, 11, 12]  # its own 0.5 s
    stop.set()
    await asyncio.wait_for(sending, 5)
    assert feed.sent == 13 * CHUNK


async def test_a_lost_connection_sends_again_what_was_not_acknowledged() -> None:
    """Acknowledged up to 0.35 s, and 1.3 s sent (the bound, 1 s, past it),
    then lost: the next connection sends the audio again from half a second past the
    acknowledgement (the step the server may have taken), cut mid-chunk
    there, and goes on to the end: no sample twice, none missed. What the
    feed holds to send again stays within its bound (1 s) and a chunk."""
    audio = np.arange(30 * CHUNK).astype(np.int16)  # each sample its place (mod 2**16)
    feed = FileFeed(audio, max_behind_s=1.0)
    link, acks = Samples(), WatchedProgress()
    sending = asyncio.ensure_future(feed.send(link, asyncio.Event(), acks))  # type: ignore[arg-type]
    acks.acknowledge(int(0.35 * S))
    await asyncio.wait_for(acks.waiting.wait(), 10)  # 1.3 s sent: waits for more
    assert len(link.sent) == 13
    assert 0 < feed.held <= 1.0 * S + CHUNK, feed.held / S
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    feed.rewind(acks)
    start = int(0.35 * S) + ACK_STEP
    assert (feed.sent, feed.resent) == (start, 13 * CHUNK - start)
    again = Samples()
    feed.pace = NoWait()
    await asyncio.wait_for(feed.send(again, asyncio.Event()), 10)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.concatenate(link.samples), audio[:13 * CHUNK])
    np.testing.assert_array_equal(np.concatenate(again.samples), audio[start:])
    assert feed.held == 0


class Samples(Link):
    """A :class:`Link` that keeps the samples of each message too."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[Int16Array] = []

    async def send(self, data: bytes) -> None:
        await super().send(data)
        self.samples.append(np.frombuffer(data, "<i2"))


class NoWait(FilePace):
    """The pace without the clock's waits: a long file goes through the feed
    at once (the waits are tested above; real time would take the file's
    length)."""

    def wait_s(self, position: int, now: float, unacknowledged: int = 0) -> float:
        return 0.0


class Acknowledging:
    """Stands in for a server that acknowledges all it takes: counts the
    samples and acknowledges them (``acks``)."""

    def __init__(self) -> None:
        self.acks = Progress()
        self.samples = 0

    async def send(self, data: bytes) -> None:
        self.samples += len(data) // 2
        self.acks.acknowledge(self.samples)


@pytest.mark.skipif(not HAVE_SOX, reason="sox is not installed")
async def test_a_file_is_decoded_as_it_is_sent_in_bounded_memory(tmp_path: Path) -> None:
    """20 minutes of 16 kHz mono (38 MB as sent): --file's feed decodes the
    file as it sends it, and peaks at a few blocks while sending it whole.
    It used to decode the whole file before connecting (an hour's file
    peaked at 326 MB RSS, 43 MB of it the imports)."""
    path = tmp_path / "long.wav"
    await asyncio.to_thread(subprocess.run, ["sox", "-n", "-r", "16000", "-c", "1", "-b", "16",
                                             str(path), "synth", "1200", "whitenoise", "vol",
                                             "0.1"], check=True)
    said: list[str] = []
    server = Acknowledging()
    tracemalloc.start()
    try:
        feed = path_feed(path, (), said.append)
        assert isinstance(feed, FileFeed)
        try:
            feed.pace = NoWait()
            feed.start(said.append)
            await feed.send(server, asyncio.Event(), server.acks)  # type: ignore[arg-type]
        finally:
            feed.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert server.samples == 1200 * S
    assert said == ["streaming 1200.0 s of audio at real-time pace"]
    assert peak < 1200 * S * 2 / 8, f"peak {peak / 1e6:.1f} MB"


async def test_damage_in_a_file_is_said_when_the_feed_reaches_it(tmp_path: Path) -> None:
    """A FLAC (8 s of 48 kHz stereo) cut 70 % in: the client says it is
    damaged once it has sent the audio before the damage, decoding the file
    as it goes; that audio is all sent, and the file's end ends the stream
    as at any file's end (no error). Read whole before connecting, the
    warning came before any audio went, and not on the client's status."""
    x = np.random.default_rng(4).integers(-8000, 8000, (8 * 48000, 2)).astype(np.int16)
    whole = tmp_path / "whole.flac"
    sf.write(whole, x, 48000, format="FLAC")
    cut = tmp_path / "cut.flac"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.7)])
    server = Acknowledging()
    said: list[tuple[int, str]] = []

    def status(text: str) -> None:
        said.append((server.samples, text))

    feed = path_feed(cut, (), status)
    assert isinstance(feed, FileFeed)
    try:
        feed.pace = NoWait()
        feed.start(status)
        await feed.send(server, asyncio.Event(), server.acks)  # type: ignore[arg-type]
    finally:
        feed.close()
    damage = [(at, text) for at, text in said if "damaged" in text]
    assert len(damage) == 1, said
    at, text = damage[0]
    assert text.startswith(f"audio file {cut} is damaged 5."), text
    # The probe read the first 1.4 s; the damage is met past 4 s.
    assert at > 3 * S, at / S
    assert 0.7 * 8 * S - 2 * 4096 < server.samples <= 0.7 * 8 * S
    assert feed.failed is None


async def test_a_file_gone_before_the_feed_starts_is_an_error_before_connecting(
        tmp_path: Path) -> None:
    """The feed opens the file as it starts, before connecting (a file on
    disk is then read to its end whatever becomes of its name): one deleted
    since its probe is an error there, naming why, as one that was never
    there is."""
    path = tmp_path / "talk.wav"
    sf.write(path, np.zeros(S, np.int16), S)
    feed = path_feed(path, (), lambda _: None)
    path.unlink()
    try:
        with pytest.raises(AudioInputError, match=r"cannot read audio file .*talk\.wav past "
                           r"0\.0 s: No such file or directory"):
            feed.start(lambda _: None)
    finally:
        feed.close()
    sf.write(path, np.zeros(3 * S, np.int16), S)
    feed = path_feed(path, (), lambda _: None)
    assert isinstance(feed, FileFeed)
    try:
        feed.start(lambda _: None)
        path.unlink()
        feed.pace = NoWait()
        server = Acknowledging()
        await feed.send(server, asyncio.Event(), server.acks)  # type: ignore[arg-type]
    finally:
        feed.close()
    assert server.samples == 3 * S
    assert feed.failed is None
