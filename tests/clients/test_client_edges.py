"""The clients' resume edges, against real servers: a saved state across an
epoch change, ``--exit-on-end`` when a stream id is used again while the
client was away, and a config answered with something not of the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from mic_client import FileFeed, run
from tts_bridge import BridgeConfig, BridgeError, SavedState, TtsBridge, write_state
from viewer import LiveWriter, watch
from websockets.asyncio.server import ServerConnection, serve

from evoxtral_stream.engine.engine import Engine, Stream
from evoxtral_stream.events import CaptionEvent, StreamEnded
from evoxtral_stream.server.app import CaptionServer
from tests.clients.conftest import publish_finals, scripted_server
from tests.clients.test_tts_bridge import GatedSynth, _config
from tests.fakes import ScriptedBackend


async def _run_for(bridge: TtsBridge, seconds: float) -> None:
    task = asyncio.ensure_future(bridge.run())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), seconds)
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


async def _until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _final(stream: str, segment: int, seq: int, text: str) -> CaptionEvent:
    return CaptionEvent(stream=stream, segment=segment, seq=seq, final=True, text=text,
                        plain_text=text, stable=text, unstable="", tags=(),
                        start=float(segment), end=segment + 0.5, latency=0.1)


async def _drop_subscribers(server: CaptionServer) -> None:
    """Close every /v1/captions connection server-side (1001 going away), as a
    network failure or proxy restart would, keeping the server's history."""
    assert server._server is not None
    for conn in list(server._server.connections):
        if conn.request is not None and conn.request.path.startswith("/v1/captions"):
            await conn.close(1001, "going away")


# --- 1. --state drops the other streams' resume points ------------------------------


async def test_state_first_run_with_since_but_no_epoch_keeps_every_stream(
        tmp_path: Path) -> None:
    """README: '--state FILE makes restarts lossless ... give --since only for
    the first run'. First run: --since a:1,b:1 (no --epoch) --state FILE; it
    handles one final and stops (as a crash would). The second run, from the
    state file, must still speak the other three finals said after a:1, b:1."""
    cfg = _config()
    state = tmp_path / "bridge.json"
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        publish_finals(server, "a", ["a1", "a2", "a3"], ended=False)
        publish_finals(server, "b", ["b1", "b2", "b3"], ended=False)
        url = f"ws://127.0.0.1:{server.port}"
        first = GatedSynth()
        first.gate.set()
        await asyncio.wait_for(TtsBridge(BridgeConfig(
            out=tmp_path / "out", url=url, streams=("a", "b"),
            since=(("a", 1), ("b", 1)), max_captions=1, state=state), first).run(), 20)
        second = GatedSynth()
        second.gate.set()
        await _run_for(TtsBridge(BridgeConfig(
            out=tmp_path / "out", url=url, streams=("a", "b"), state=state), second), 3)
    spoken = sorted(first.names + second.names)
    assert spoken == ["a-00001.txt", "a-00002.txt", "b-00001.txt", "b-00002.txt"], \
        (first.names, second.names, state.read_text())


async def test_state_across_a_server_restart_keeps_streams_not_yet_heard_again(
        tmp_path: Path) -> None:
    """The server restarts without its journal (new epoch) while the bridge is
    down; a and b both say a final. The restarted bridge handles a's and stops
    (a crash). Its next start must still speak b's: protocol.md says to keep
    0 as the resume point of a stream after a new epoch, not none."""
    port = _free_port()
    cfg = _config(**{"server.port": port})
    state = tmp_path / "bridge.json"
    url = f"ws://127.0.0.1:{port}"

    def bridge(n: int | None, since: tuple[tuple[str, int], ...] = ()
               ) -> tuple[TtsBridge, GatedSynth]:
        synth = GatedSynth()
        synth.gate.set()
        return TtsBridge(BridgeConfig(out=tmp_path / "out", url=url, streams=("a", "b"),
                                      since=since, max_captions=n, state=state), synth), synth

    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        publish_finals(server, "a", ["old a"], ended=False)
        publish_finals(server, "b", ["old b"], ended=False)
        b1, s1 = bridge(2, since=(("a", 0), ("b", 0)))
        await asyncio.wait_for(b1.run(), 20)
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        publish_finals(server, "a", ["new a"], ended=False)
        publish_finals(server, "b", ["new b"], ended=False)
        b2, s2 = bridge(1)
        await asyncio.wait_for(b2.run(), 20)
        b3, s3 = bridge(None)
        await _run_for(b3, 3)
    assert sorted(s2.names + s3.names) == ["a+2-00000.txt", "b+2-00000.txt"], \
        (s1.names, s2.names, s3.names)


async def test_state_of_more_streams_than_this_run_subscribes_to_resumes_those_it_does(
        tmp_path: Path) -> None:
    """A state file written by a run over a and b, and a run with --stream a
    only: it used to send since=b:N beside ?stream=a, which the server refuses
    (bad_query) at every start, until the file was moved away. b's resume
    point is kept for a later run that takes b again."""
    cfg = _config()
    state = tmp_path / "bridge.json"
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        write_state(state, SavedState(engine.epoch, {"a": 1, "b": 1}, {}))
        publish_finals(server, "a", ["a1", "a2"], ended=False)
        publish_finals(server, "b", ["b1", "b2"], ended=False)
        for stream in ("a", "b"):
            synth = GatedSynth()
            synth.gate.set()
            await asyncio.wait_for(TtsBridge(BridgeConfig(
                out=tmp_path / "out", url=f"ws://127.0.0.1:{server.port}", streams=(stream,),
                max_captions=1, state=state), synth).run(), 20)
            assert synth.names == [f"{stream}-00001.txt"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- 2. --exit-on-end: a stream reused while away is taken as still ended ------------


async def _reuse_while_away(engine: Engine, server: CaptionServer,
                            seen_first: Callable[[], object]) -> Stream:
    """a: final (seg 0, seq 1) and its end; the subscriber drops; a's id is
    used again meanwhile (its new run's final seg 0, seq 2); the subscriber
    resumes (since=a:1: the replay holds a's new final, no stream.started, no
    stream.ended, as protocol.md says); then b ends."""
    first_run = engine.open_stream("a", "ingest")              # a real stream.started
    server.broadcaster.publish(_final("a", 0, 1, "a one"))
    await first_run.close()                                      # a real stream.ended
    await _until(seen_first, "the first final")
    await _drop_subscribers(server)
    await _until(lambda: server.broadcaster.subscribers == 0, "the drop")
    second_run = engine.open_stream("a", "ingest")  # the id used again; nobody subscribed now
    server.broadcaster.publish(_final("a", 0, 2, "a again"))   # retained for the resume
    await _until(lambda: server.broadcaster.subscribers == 1, "the resume")
    await asyncio.sleep(0.3)  # the replay is read
    server.broadcaster.publish(StreamEnded("b", 1.0, 0, 0))
    return second_run


async def test_bridge_exit_on_end_does_not_stop_while_a_reused_stream_is_live(
        tmp_path: Path) -> None:
    cfg = _config()
    synth = GatedSynth()
    synth.gate.set()
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        bridge = TtsBridge(BridgeConfig(out=tmp_path, url=f"ws://127.0.0.1:{server.port}",
                                        streams=("a", "b"), exit_on_end=True,
                                        reconnect_min_s=0.5), synth)
        task = asyncio.ensure_future(bridge.run())
        await _until(lambda: server.broadcaster.subscribers == 1, "subscribed")
        second_run = await _reuse_while_away(engine, server, lambda: synth.names)
        await asyncio.sleep(0.5)
        assert not task.done(), f"stopped while a is live again: spoke {synth.names}"
        server.broadcaster.publish(_final("a", 1, 3, "a three"))
        await second_run.close()
        await asyncio.wait_for(task, 10)
    assert synth.names == ["a-00000.txt", "a+2-00000.txt", "a+2-00001.txt"]


async def test_viewer_exit_on_end_does_not_stop_while_a_reused_stream_is_live() -> None:
    cfg = _config()
    out, err = io.StringIO(), io.StringIO()
    writer = LiveWriter(out, err, color=False, live=False, show_stream=True)
    async with Engine(cfg, ScriptedBackend()) as engine, \
            CaptionServer(engine, cfg.server) as server:
        task = asyncio.ensure_future(watch(f"ws://127.0.0.1:{server.port}", ["a", "b"], {},
                                           writer, exit_on_end=True, max_retry_s=0.5))
        await _until(lambda: server.broadcaster.subscribers == 1, "subscribed")
        second_run = await _reuse_while_away(engine, server, lambda: "a one" in out.getvalue())
        await asyncio.sleep(0.5)
        assert not task.done(), f"stopped while a is live again:\n{out.getvalue()}{err.getvalue()}"
        server.broadcaster.publish(_final("a", 1, 3, "a three"))
        await second_run.close()
        assert await asyncio.wait_for(task, 10) == 0
    assert "a three" in out.getvalue()


# --- 3. mic_client: a first message that is not JSON is a traceback ------------------


async def test_mic_client_says_why_when_the_server_answers_config_with_non_json(
        tmp_path: Path) -> None:
    """A server (or a proxy in front of it) answers the config with a text
    that is not a JSON object. The module doc promises exit status 1 with a
    line saying why, as for any refusal; the client dies with a traceback."""
    import sys

    import numpy as np
    import soundfile as sf

    from tests.clients.conftest import CLIENTS

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.int16), 16000, subtype="PCM_16")

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send("<html>502 Bad Gateway</html>")
        await ws.close(1011)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENTS / "mic_client.py"), "--url", f"ws://127.0.0.1:{port}",
            "--file", str(wav), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "Traceback" not in err.decode(), err.decode()


async def test_bridge_says_what_came_when_the_hello_is_not_json(tmp_path: Path) -> None:
    """A proxy's page instead of the hello used to end the bridge with
    "Expecting value: line 1 column 1 (char 0)", which says nothing of what
    came; the line now shows it."""
    async def handler(ws: ServerConnection) -> None:
        await ws.send("<html>502 Bad Gateway</html>")
        await ws.close(1011)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        bridge = TtsBridge(BridgeConfig(out=tmp_path, url=f"ws://127.0.0.1:{port}",
                                        reconnect=False), GatedSynth())
        with pytest.raises(BridgeError, match="expected a hello from the server, got "
                                              "<html>502 Bad Gateway"):
            await asyncio.wait_for(bridge.run(), 20)


# --- 4. deeply nested JSON from the server ---------------------------------------------

#: Valid JSON that Python's decoder cannot take: it raises RecursionError,
#: which is no ValueError.
DEEP = "[" * 100_000 + "]" * 100_000


def _scripted_hello(streams: list[str]) -> str:
    return json.dumps({"type": "hello", "v": 1, "server": "other", "streams": streams})


def _scripted_final(stream: str, segment: int, seq: int, text: str) -> str:
    return json.dumps({"type": "caption", "stream": stream, "segment": segment, "seq": seq,
                       "final": True, "text": text, "stable": text, "unstable": "",
                       "start": float(segment), "end": segment + 0.5})


async def test_the_viewer_and_the_bridge_skip_deeply_nested_json(tmp_path: Path) -> None:
    """A message nested 100,000 deep (another server, a proxy) ended the
    viewer and the TTS bridge with a RecursionError traceback, as the hello
    or after it: they skip it as they skip a message that is not JSON."""
    script = [_scripted_hello(["talk"]), DEEP, _scripted_final("talk", 0, 1, "one"),
              json.dumps({"type": "stream.ended", "stream": "talk"})]

    async with scripted_server(script) as url:
        out, err = io.StringIO(), io.StringIO()
        writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
        assert await asyncio.wait_for(watch(url, ["talk"], {}, writer, exit_on_end=True),
                                      20) == 0
        assert out.getvalue() == "[0:00.0 → 0:00.5] one\n"
        assert "! not JSON: '[[[[" in err.getvalue()
        synth = GatedSynth()
        synth.gate.set()
        await asyncio.wait_for(TtsBridge(BridgeConfig(
            out=tmp_path, url=url, streams=("talk",), exit_on_end=True), synth).run(), 20)
        assert synth.names == ["talk-00000.txt"]

    async def deep_hello(ws: ServerConnection) -> None:
        await ws.send(DEEP)
        await ws.wait_closed()

    async with serve(deep_hello, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        with pytest.raises(BridgeError, match=r"expected a hello from the server, got \[\[\["):
            await asyncio.wait_for(TtsBridge(BridgeConfig(
                out=tmp_path, url=url, reconnect=False), GatedSynth()).run(), 20)


def test_a_deeply_nested_state_file_is_damaged_not_a_traceback(tmp_path: Path) -> None:
    """The same in a --state file: a RecursionError traceback at the start,
    where the docs promise one line and exit status 2 for a damaged one."""
    state = tmp_path / "bridge.json"
    state.write_text(DEEP)
    with pytest.raises(BridgeError, match="is damaged"):
        TtsBridge(BridgeConfig(out=tmp_path, state=state), GatedSynth())


async def test_the_mic_client_skips_deeply_nested_json() -> None:
    """The same message among the captions of an ingest connection ended
    mic_client with a RecursionError traceback; as its answer to the config
    too. It is skipped, or (as the answer) said and the connection closed."""
    async def handler(ws: ServerConnection) -> None:
        await ws.recv()  # config
        assert ws.request is not None
        if "deep-first" in ws.request.path:
            await ws.send(DEEP)
            await ws.wait_closed()
            return
        await ws.send(json.dumps({"type": "ingest.ready", "stream": "desk",
                                  "sample_rate": 16000, "channels": 1, "format": "pcm16"}))
        await ws.send(DEEP)
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "end":
                await ws.send(json.dumps({"type": "ingest.summary", "stream": "desk",
                                          "duration": 0.1}))
                await ws.close(1000)

    async with serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        out, err = io.StringIO(), io.StringIO()
        writer = LiveWriter(out, err, color=False, live=False, show_stream=False)
        feed = FileFeed(np.zeros(1600, np.int16))
        assert await asyncio.wait_for(run(url, "desk", feed, writer), 20) == 0
        assert "! not JSON: '[[[[" in err.getvalue()
        assert "desk: 0.1 s of audio" in err.getvalue()
        assert await asyncio.wait_for(run(url, "deep-first", FileFeed(np.zeros(1600, np.int16)),
                                          writer), 20) == 1
        assert "answered the config with '[[[[" in err.getvalue()


# --- 5. ids and epochs no URL can carry ---------------------------------------------------


def _resume_server(paths: list[str], epoch: object) -> Callable[[ServerConnection],
                                                                 Awaitable[None]]:
    """First connection: a hello of ``epoch``, a final of a stream whose id
    holds a lone surrogate and one of talk, then the link drops. Next: both
    streams end."""
    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        if len(paths) == 1:
            await ws.send(json.dumps({"type": "hello", "v": 1, "epoch": epoch,
                                      "streams": ["\ud800", "talk"]}))
            await ws.send(_scripted_final("\ud800", 0, 1, "odd"))
            await ws.send(_scripted_final("talk", 0, 1, "one"))
            await ws.close(1001, "going away")
            return
        await ws.send(_scripted_hello([]))
        for stream in ("\ud800", "talk"):
            await ws.send(json.dumps({"type": "stream.ended", "stream": stream}))
        await ws.wait_closed()
    return handler


@pytest.mark.parametrize("epoch", ["e\udcff", "not one!", 7])
async def test_a_reconnect_leaves_out_what_no_url_can_carry(tmp_path: Path,
                                                           epoch: object) -> None:
    """JSON carries lone surrogates; a URL cannot (it is percent-encoded
    UTF-8). A stream id holding one ended the viewer and the TTS bridge
    with a UnicodeEncodeError traceback at the reconnect, building since=;
    so did such an epoch. The stream gets live captions only; an epoch not
    of the protocol's form (1 to 64 of A-Z a-z 0-9 _ -), which a server of
    this protocol would refuse (bad_query, close 1008), is not sent back."""
    for client in ("viewer", "bridge"):
        paths: list[str] = []
        async with serve(_resume_server(paths, epoch), "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
            if client == "viewer":
                out, err = io.StringIO(), io.StringIO()
                writer = LiveWriter(out, err, color=False, live=False, show_stream=True)
                assert await asyncio.wait_for(watch(url, [], {}, writer, exit_on_end=True,
                                                    max_retry_s=0.1), 20) == 0
            else:
                synth = GatedSynth()
                synth.gate.set()
                await asyncio.wait_for(TtsBridge(BridgeConfig(
                    out=tmp_path, url=url, exit_on_end=True, reconnect_min_s=0.1,
                    state=tmp_path / "state.json"), synth).run(), 20)
                assert synth.names == ["%ED%A0%80-00000.txt", "talk-00000.txt"]
        assert paths == ["/v1/captions", "/v1/captions?since=talk:1"], client


@pytest.mark.parametrize("streams", [5, None, True, {"a": 1}])
async def test_the_bridge_takes_a_hello_whose_streams_are_no_list(tmp_path: Path,
                                                                 streams: object) -> None:
    """A hello whose ``streams`` was a number or null (another server) ended
    the bridge with a TypeError traceback before its first final."""
    script = [json.dumps({"type": "hello", "v": 1, "streams": streams}),
              _scripted_final("talk", 0, 1, "one"),
              json.dumps({"type": "stream.ended", "stream": "talk"})]

    synth = GatedSynth()
    synth.gate.set()
    async with scripted_server(script) as url:
        await asyncio.wait_for(TtsBridge(BridgeConfig(
            out=tmp_path, url=url, streams=("talk",), exit_on_end=True), synth).run(), 20)
    assert synth.names == ["talk-00000.txt"]


@pytest.mark.parametrize("named", ["\ud800", None, 7])
async def test_the_mic_client_reconnects_when_its_stream_id_is_no_url(named: object) -> None:
    """The ingest.ready of another server named the stream with a lone
    surrogate (JSON carries them): the reconnect after a lost connection
    ended mic_client with a UnicodeEncodeError traceback, building
    ?stream=. One with no stream id, or a number, reconnected as "None" or
    "7". It reconnects under the id it asked for."""
    paths: list[str] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        paths.append(ws.request.path)
        await ws.recv()  # config
        await ws.send(json.dumps({"type": "ingest.ready", "stream": named}))
        if len(paths) == 1:
            await ws.close(1001)
            return
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "end":
                await ws.send(json.dumps({"type": "ingest.summary", "stream": "desk"}))
                await ws.close(1000)

    async with serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        writer = LiveWriter(io.StringIO(), io.StringIO(), color=False, live=False,
                            show_stream=False)
        assert await asyncio.wait_for(run(url, "desk", FileFeed(np.zeros(1600, np.int16)),
                                          writer, backoff_s=(0.01, 0.02)), 20) == 0
    assert paths == ["/v1/ingest?stream=desk"] * 2


# --- a token that no HTTP header carries ------------------------------------------------


async def _run_client(script: str, port: int, tmp_path: Path, *args: str,
                      env_token: str | None = None) -> tuple[int, str]:
    """``script`` (a client in clients/) against ``port``; its exit status and
    stdout and stderr together."""
    import sys

    from tests.clients.conftest import CLIENTS, client_env

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / script), "--url", f"ws://127.0.0.1:{port}",
        *_quiet_args(script, tmp_path),
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=client_env(env_token))
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _hang_up_server() -> tuple[asyncio.Server, list[int]]:
    """A TCP server on a free port that closes every connection at once; the
    list counts them."""
    accepted: list[int] = []

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    return await asyncio.start_server(hang_up, "127.0.0.1", 0), accepted


CLIENT_SCRIPTS = ["viewer.py", "mic_client.py", "tts_bridge.py"]


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
@pytest.mark.parametrize(("args", "env_token", "secret"), [
    (["--token", "snow\u2603man"], None, "snow\u2603man"),  # no Latin-1: websockets refused it
    ([], "s\u00e9cret", "s\u00e9cret"),  # Latin-1: sent, but hash-token never made its hash
    (["--token", "tab\tinside"], None, "inside"),
], ids=["option-not-latin1", "env-latin1", "option-control"])
async def test_a_token_no_header_carries_is_refused_before_connecting_unechoed(
        tmp_path: Path, script: str, args: list[str], env_token: str | None,
        secret: str) -> None:
    """A token that is not printable ASCII (the rule of ``hash-token``) used
    to be sent, or refused by websockets with "cannot connect ...: invalid
    Authorization header: Bearer TOKEN (is the server running?)": the secret
    on stderr, and the server blamed. Each client refuses it up front, as a
    bad argument (status 2), without quoting it and without connecting."""
    server, accepted = await _hang_up_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        code, out = await _run_client(script, port, tmp_path, *args, env_token=env_token)
    assert code == 2, out
    assert secret not in out, out
    assert ("error: argument --token: the token (--token, else $EVOXTRAL_TOKEN) must be "
            "printable ASCII: it travels in an HTTP header\n") in out, out
    assert not accepted


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
async def test_a_failed_connection_does_not_print_a_token_of_the_url(
        tmp_path: Path, script: str) -> None:
    """The bridge keeps the query of ``--url`` (the server takes ``?token=``)
    and its "cannot subscribe to URL: ..." line printed it; no client's
    error line quotes a token."""
    server, accepted = await _hang_up_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        code, out = await _run_client(
            script, port, tmp_path, "--url",
            f"ws://127.0.0.1:{port}/v1/captions?token=url-secret-1")
    assert code == 1, out
    assert "url-secret-1" not in out, out
    assert accepted


# --- the query of --url ---------------------------------------------------------------


async def _run_script(script: str, tmp_path: Path, *args: str,
                      timeout: float = 30.0) -> tuple[int, str]:
    """``script`` (a client in clients/) with ``args`` only, ``$EVOXTRAL_TOKEN``
    unset, killed after ``timeout``; its exit status and output (-1 when killed)."""
    import sys

    from tests.clients.conftest import CLIENTS, client_env

    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CLIENTS / script), *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=client_env(None), cwd=tmp_path)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def _silence_wav(tmp_path: Path) -> Path:
    import soundfile as sf

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    return wav


def _quiet_args(script: str, tmp_path: Path) -> list[str]:
    """What ``script`` needs besides its URL to run here, sending nothing
    anywhere else: the mic client a second of silence from a file; the
    bridge ElevenLabs with a key that is never used (no final comes, and
    unlike espeak-ng nothing has to be installed); neither reconnecting."""
    if script == "mic_client.py":
        return ["--file", str(_silence_wav(tmp_path)), "--no-reconnect"]
    if script == "tts_bridge.py":
        return ["--out", str(tmp_path / "out"), "--mode", "elevenlabs", "--voice", "v",
                "--api-key", "k", "--no-reconnect"]
    return []


async def test_every_client_sends_what_the_query_of_its_url_asks_for(
        tmp_path: Path, guarded: tuple[Engine, CaptionServer]) -> None:
    """A URL copied from docs/protocol.md, ``?token=`` and ``?stream=`` (and
    ``?since=``) in its query, with no --token: viewer.py and mic_client.py
    dropped the query, and so got a 401 ("pass --token") for a token they
    were given; tts_bridge.py dropped all of it but the token. Each now
    takes them as it takes its options."""
    from tests.clients.conftest import INGEST_TOKEN, SUBSCRIBE_TOKEN

    _, server = guarded
    base = f"ws://127.0.0.1:{server.port}"
    publish_finals(server, "talk", ["one."])
    publish_finals(server, "quiet", [])  # the bridge would have to speak a final
    code, out = await _run_script(
        "viewer.py", tmp_path, "--url", f"{base}/v1/captions?stream=talk&since=0&token="
        f"{SUBSCRIBE_TOKEN}", "--exit-on-end", "--no-color")
    assert code == 0, out
    assert "[0:00.0 → 0:00.5] one." in out and SUBSCRIBE_TOKEN not in out, out
    code, out = await _run_script(
        "mic_client.py", tmp_path, "--url", f"{base}/?token={INGEST_TOKEN}&stream=desk",
        "--file", str(_silence_wav(tmp_path)), "--no-reconnect", "--no-color")
    assert code == 0, out
    assert "desk: 1.0 s of audio" in out and INGEST_TOKEN not in out, out
    # No final comes: ElevenLabs with a key that is never used needs nothing installed.
    code, out = await _run_script(
        "tts_bridge.py", tmp_path, "--url", f"{base}/v1/captions?stream=quiet&since=0&token="
        f"{SUBSCRIBE_TOKEN}", "--exit-on-end", "--out", str(tmp_path / "out"),
        "--mode", "elevenlabs", "--voice", "v", "--api-key", "k", "--no-reconnect")
    assert code == 0, out
    assert SUBSCRIBE_TOKEN not in out, out


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
@pytest.mark.parametrize(("query", "args", "message"), [
    ("?stream=a", ["--stream", "b"],
     "--url asks for ?stream='a' and --stream for 'b': name the streams in one place"),
    ("?token=url-secret-1", ["--token", "option-secret-2"],
     "--url carries a ?token= other than --token (or $EVOXTRAL_TOKEN): give one token"),
    ("#token=url-secret-1", ["--token", "option-secret-2"],
     "--url carries a #token= other than --token (or $EVOXTRAL_TOKEN): give one token"),
    ("?token=url-secret-1#token=url-secret-2", [],
     "--url gives different tokens in ?token= and #token="),
], ids=["stream", "token", "fragment-token", "query-and-fragment-token"])
async def test_a_url_query_that_contradicts_an_option_is_a_bad_argument(
        tmp_path: Path, script: str, query: str, args: list[str], message: str) -> None:
    """``?stream=a`` and ``--stream b``: one of them was not meant. The
    clients used to drop the URL's side silently (and connect); each now
    refuses before connecting, quoting no token."""
    server, accepted = await _hang_up_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        more = _quiet_args(script, tmp_path)
        code, out = await _run_script(script, tmp_path, "--url",
                                      f"ws://127.0.0.1:{port}/v1/captions{query}",
                                      *args, *more)
    assert code == 2, out
    assert message in out, out
    assert "secret" not in out, out
    assert not accepted


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
@pytest.mark.parametrize("userinfo", ["ann:pw-secret-3@", "pw-secret-3@"],
                         ids=["user-password", "user-alone"])
async def test_a_url_with_a_user_and_password_is_refused_unechoed(
        tmp_path: Path, script: str, userinfo: str) -> None:
    """``ws://user:pass@host``: websockets sends it as HTTP Basic auth, which
    the server does not take (a token is Bearer, ?token= or a subprotocol),
    and every client printed the password in its "cannot connect to URL"
    line. Each now refuses such a URL before connecting, as a bad argument,
    quoting neither."""
    server, accepted = await _hang_up_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        more = _quiet_args(script, tmp_path)
        code, out = await _run_script(script, tmp_path, "--url",
                                      f"ws://{userinfo}127.0.0.1:{port}/v1/captions", *more)
    assert code == 2, out
    assert ("--url holds a user name (user:password@): the server takes no HTTP Basic "
            "auth; give a token with --token or $EVOXTRAL_TOKEN") in out, out
    assert "secret" not in out, out
    assert not accepted


async def test_the_viewer_redacts_a_password_of_its_url(tmp_path: Path) -> None:
    """What prints a URL redacts its password, for a caller of watch() too."""
    server, _ = await _hang_up_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        err = io.StringIO()
        writer = LiveWriter(io.StringIO(), err, color=False, live=False, show_stream=True)
        assert await watch(f"ws://ann:pw-secret-3@127.0.0.1:{port}", [], {}, writer) == 1
    assert f"cannot connect to ws://ann:***@127.0.0.1:{port}/v1/captions" in err.getvalue()
    assert "secret" not in err.getvalue()


# --- the server --url names -------------------------------------------------------------


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
@pytest.mark.parametrize(("url", "why"), [
    ("ws://127.0.0.1:http", ": its port must be a number from 1 to 65535"),
    ("ws://127.0.0.1:65536", ": its port must be a number from 1 to 65535"),
    ("ws://:8765", ": it names no host"),
    ("ftp://127.0.0.1:8765", ""),
], ids=["port-name", "port-too-big", "no-host", "scheme"])
async def test_a_url_that_names_no_server_is_a_bad_argument(
        tmp_path: Path, script: str, url: str, why: str) -> None:
    """A port that is no number, or too big, ended the viewer and the mic
    client with a traceback (urllib's ValueError, status 1); a URL naming no
    host got "cannot connect ... (is the server running?)", and so did any
    of these from tts_bridge.py ("... isn't a valid URI"), another scheme
    too. Each is a bad argument now: one line that says what is wrong,
    status 2, before connecting."""
    code, out = await _run_script(script, tmp_path, "--url", url,
                                  *_quiet_args(script, tmp_path))
    assert code == 2, out
    assert f": not a ws://HOST:PORT URL: {url!r}{why}\n" in out, out
    assert "Traceback" not in out and "server running" not in out, out


#: What each client is given besides --url and --token to finish on its own
#: against :func:`_behind_a_prefix`'s server, what it prints when it did, and
#: the server's path it must ask for.
_FINISHING = {
    "viewer.py": (["--stream", "talk", "--since", "0", "--exit-on-end", "--no-color"],
                  "[0:00.0 → 0:00.5] one.", "/v1/captions"),
    "mic_client.py": (["--stream", "desk", "--no-color"], "desk: 1.0 s of audio",
                      "/v1/ingest"),
    "tts_bridge.py": (["--stream", "quiet", "--since", "0", "--exit-on-end"],
                      "done: 0 written, 0 failed", "/v1/captions"),
}


@pytest.mark.parametrize(("script", "url"), [
    ("viewer.py", "http://{addr}/captions-engine"),
    ("viewer.py", "ws://{addr}/captions-engine/v1/captions?stream=talk"),
    ("mic_client.py", "ws://{addr}/captions-engine/"),
    ("mic_client.py", "{addr}/captions-engine/v1/ingest"),
    ("tts_bridge.py", "{addr}/captions-engine"),
    ("tts_bridge.py", "http://{addr}/captions-engine/v1/captions/?stream=quiet"),
    # The page's own link: the page lives at the prefix's "/".
    ("viewer.py", "http://{addr}/captions-engine/?streams=talk,other&stream=talk#token={token}"),
    ("mic_client.py", "http://{addr}/captions-engine/?mic=desk#token={token}"),
], ids=["viewer-prefix", "viewer-endpoint", "mic-prefix-slash", "mic-bare-endpoint",
        "bridge-bare-prefix", "bridge-http-endpoint", "viewer-page-link", "mic-page-link"])
async def test_a_url_under_a_path_prefix_reaches_the_server_behind_it(
        tmp_path: Path, guarded: tuple[Engine, CaptionServer], script: str,
        url: str) -> None:
    """A server behind a reverse proxy at ``https://host/captions-engine/``:
    the viewer and the mic client dropped the path of ``--url`` and asked the
    proxy for ``/v1/...`` at its root, a 404; tts_bridge.py asked for the
    prefix itself, and took neither a bare ``HOST:PORT`` nor ``http://``.
    Each keeps the path as a prefix now, with or without a slash at its end;
    a URL that names an endpoint under it (``.../v1/captions``) has the
    client's own endpoint in its place, as it had at the root."""
    from tests.clients.conftest import INGEST_TOKEN, SUBSCRIBE_TOKEN
    from tests.helpers.http import PrefixRelay

    _, server = guarded
    publish_finals(server, "talk", ["one."])
    publish_finals(server, "quiet", [])  # the bridge would have to speak a final
    args, done, path = _FINISHING[script]
    token = INGEST_TOKEN if script == "mic_client.py" else SUBSCRIBE_TOKEN
    async with PrefixRelay(server.port, "/captions-engine") as proxy:
        code, out = await _run_script(
            script, tmp_path, "--url", url.format(addr=f"127.0.0.1:{proxy.port}", token=token),
            "--token", token, *_quiet_args(script, tmp_path), *args)
    assert code == 0, out
    assert done in out, out
    assert [t.partition("?")[0] for t in proxy.targets] == [f"/captions-engine{path}"], \
        proxy.targets


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
async def test_a_bad_url_quotes_no_token_of_its_fragment(tmp_path: Path, script: str) -> None:
    """The page's link carries its token in the fragment (``/#token=T``):
    a client that refused such a ``--url`` (a port out of range) quoted it
    whole, the token in clear. It quotes the URL with the token as ``***``."""
    url = "ws://127.0.0.1:65536/#token=frag-secret-1"
    code, out = await _run_script(script, tmp_path, "--url", url,
                                  *_quiet_args(script, tmp_path))
    assert code == 2, out
    assert (": not a ws://HOST:PORT URL: 'ws://127.0.0.1:65536/#token=***': its port must "
            "be a number from 1 to 65535\n") in out, out
    assert "secret" not in out, out


@pytest.mark.parametrize("script", CLIENT_SCRIPTS)
async def test_every_client_takes_the_token_of_the_pages_link(
        tmp_path: Path, guarded: tuple[Engine, CaptionServer], script: str) -> None:
    """The page's link, ``http://HOST:PORT/#token=TOKEN`` as given to a
    user: the clients dropped the fragment, and so its token, and were
    refused with "the server requires a token (HTTP 401): pass --token".
    The fragment's token counts as a ``?token=`` of the URL: sent in the
    ``Authorization`` header, never printed."""
    from tests.clients.conftest import INGEST_TOKEN, SUBSCRIBE_TOKEN

    _, server = guarded
    publish_finals(server, "talk", ["one."])
    publish_finals(server, "quiet", [])  # the bridge would have to speak a final
    args, done, _ = _FINISHING[script]
    token = INGEST_TOKEN if script == "mic_client.py" else SUBSCRIBE_TOKEN
    code, out = await _run_script(
        script, tmp_path, "--url", f"http://127.0.0.1:{server.port}/#token={token}",
        *_quiet_args(script, tmp_path), *args)
    assert code == 0, out
    assert done in out, out
    assert token not in out, out


#: (client, the page's link less its address, what else it is given, what it
#: prints when done): the page's ``?streams=`` (those it subscribes to),
#: ``?stream=`` (the one it shows) and ``?mic=`` (its microphone's stream).
_PAGE_LINKS = {
    "viewer-streams": ("viewer.py", "/?streams=talk#token={sub}",
                       ["--since", "0", "--exit-on-end", "--no-color"],
                       "[0:00.0 → 0:00.5] one."),
    "viewer-shown": ("viewer.py", "/?streams=talk,other&stream=talk#token={sub}",
                     ["--since", "0", "--exit-on-end", "--no-color"],
                     "[0:00.0 → 0:00.5] one."),
    "mic": ("mic_client.py", "/?streams=talk,desk&mic=desk&stream=talk#token={ing}",
            ["--no-color"], "desk: 1.0 s of audio"),
    "bridge-streams": ("tts_bridge.py", "/?streams=quiet#token={sub}",
                       ["--since", "0", "--exit-on-end"], "done: 0 written, 0 failed"),
}


@pytest.mark.parametrize("case", list(_PAGE_LINKS))
async def test_the_streams_of_the_pages_link_are_those_the_clients_take(
        tmp_path: Path, guarded: tuple[Engine, CaptionServer], case: str) -> None:
    """The page's link names streams as the page reads them: ``?streams=a,b``
    the streams it subscribes to (what a token limited to some streams
    needs), ``?stream=`` the one it shows, ``?mic=`` the one its microphone
    streams as. The clients sent ``streams`` and ``mic`` on to the server,
    which reads neither: the viewer and the bridge subscribed to every
    stream (and so refused ``--since 0`` without ``--stream``), the mic
    client streamed as ``ingest-N``. Each now takes them as the page does."""
    from tests.clients.conftest import INGEST_TOKEN, SUBSCRIBE_TOKEN

    _, server = guarded
    publish_finals(server, "talk", ["one."])
    publish_finals(server, "other", ["two."])
    publish_finals(server, "quiet", [])  # the bridge would have to speak a final
    script, link, args, done = _PAGE_LINKS[case]
    link = link.format(sub=SUBSCRIBE_TOKEN, ing=INGEST_TOKEN)
    code, out = await _run_script(script, tmp_path, "--url",
                                  f"http://127.0.0.1:{server.port}{link}",
                                  *_quiet_args(script, tmp_path), *args)
    assert code == 0, out
    assert done in out, out
    assert "two." not in out and "other" not in out, out


@pytest.mark.parametrize(("script", "page_link"), [
    ("viewer.py", "https://host/?streams=a,b#token=TOKEN"),
    ("mic_client.py", "https://host/?mic=ID#token=TOKEN"),
    ("tts_bridge.py", "https://host/?streams=a,b#token=TOKEN"),
])
async def test_the_help_of_url_says_what_it_takes(tmp_path: Path, script: str,
                                                  page_link: str) -> None:
    """``--help`` said "server address" (the bridge "caption server"): not
    that a bare HOST:PORT, an http(s):// URL, a proxy's path prefix or the
    page's own link would do. It lists them now."""
    code, out = await _run_script(script, tmp_path, "--help")
    assert code == 0, out
    text = " ".join(out.split())  # as argparse wraps it at any width
    start = text.index("--url URL")
    url_help = text[start:text.index(" --stream ", start)]
    for form in ("HOST:PORT", "ws://, wss://, http:// or https:// URL",
                 "its path a prefix the server is reached under", f"the page's link ({page_link})",
                 "#token="):
        assert form in url_help, url_help
