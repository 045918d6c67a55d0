"""``serve``: a live source captioned and served over WebSocket (and MQTT)
until Ctrl-C or SIGTERM; SIGHUP reloads ``[auth]``; systemd hears how it
goes. What serving refuses is checked before the model loads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..audio.filereader import AudioFile, FileMix, open_audio_file, open_pipe_file
from ..audio.microphone import ChannelRoute, usable_input_device
from ..audio.pipe import NotLiveAudio, PipeCapture, PipeEnd, is_live_pipe
from ..config import Config, ConfigError
from ..console import CaptionPrinter
from ..data import sample_path
from ..engine.backends import load_backend
from ..engine.engine import Engine, Stream
from ..events import SAMPLE_RATE, Int16Array
from ..extras import extra_hint
from ..server.app import CaptionServer, check_listen
from ..systemd import Notifier, Snapshot, monotonic_usec, supervise
from .exits import _exit_leaving_threads, _ignore_late_stops, _native_threads_left
from .messages import UserError, _notice, log
from .parser import _load_config
from .streams import (
    STDIN_PATH,
    _audio_paths,
    _channel_mixes,
    _channel_stream_ids,
    _check_channel_stream_ids,
    _file_stream_id,
)


class _HeldHangups:
    """SIGHUP while ``serve`` cannot reload: loading the model (a minute for
    Voxtral), or shutting down. Its default action ends the process, so a
    ``systemctl reload`` then would kill the server; it is recorded instead,
    and one that came while loading is applied once serving."""

    def __init__(self) -> None:
        self.pending = False

    def install(self) -> None:
        # Not on Windows, nor where Python allows no handler (a thread other
        # than the main one: main() called by an embedding program or a test).
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.pending = True


def _cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    hangups = _HeldHangups()
    hangups.install()
    # Before loading the model, so an unsafe bind fails in a moment.
    _check_serving(cfg)
    check_listen(cfg.server.host, cfg.server.port)
    source: str = args.source
    file_audio: dict[int, Int16Array | FileMix] | None = None
    opened: AudioFile | None = None  # decoded as it is fed
    pipe: PipeCapture | None = None
    if source == "mic":
        # Also before the model: no microphone is one line at once, not after a
        # minute of loading Voxtral. The capture resolves audio.device again as
        # it starts (and at each reopen of a device lost later).
        usable_input_device(cfg.audio.device, cfg.audio.channels)
        _check_channel_stream_ids(cfg, args.stream or "mic")
    elif source != "none":
        path = sample_path() if source == "sample" else _audio_paths([source])[0]
        live = source != "sample" and is_live_pipe(path)
        source = _file_stream_id(path)
        _check_channel_stream_ids(cfg, args.stream or source)
        # Also before the model: a file without the channels asked for; a
        # pipe's WAV header (its writer may take a moment to send it).
        mixes = _channel_mixes(cfg)
        if live:
            pipe = PipeCapture(path, block_ms=cfg.audio.block_ms,
                               max_pending_blocks=cfg.audio.max_pending_blocks,
                               mixes=list(mixes.values()),
                               fd=0 if path == STDIN_PATH else None)
            log.debug("waiting for the WAV header on %s", pipe.name)
            try:
                fmt = pipe.read_header()
                log.info("%s: WAV, %d Hz, %d channel(s), %s, read live", pipe.name, fmt.rate,
                         fmt.channels, fmt.encoding.value)
            except NotLiveAudio as e:
                # Another format (FLAC, OGG, ...): libsndfile reads it only
                # whole, so it is played once the pipe has ended, as a file.
                log.debug("%s", e)
                log.info("%s carries no PCM WAV, the audio read live: it is read to its end, "
                         "then played at real-time pace (for live captions, send PCM WAV: "
                         "`ffmpeg ... -f wav -`)", pipe.name)
                assert pipe.fd is not None
                opened = open_pipe_file(path, e.head, pipe.fd, list(mixes.values()))
                pipe = None
        else:
            opened = open_audio_file(path, list(mixes.values()))
        if opened is not None:
            file_audio = {ch: FileMix(opened, i) for i, ch in enumerate(mixes)}
    notifier = Notifier.from_environ()
    try:
        if notifier is not None:
            notifier.send(notifier.notices.status("loading the model"))
        backend = load_backend(cfg.model)
        code = asyncio.run(_serve(args, cfg, backend, source, file_audio, hangups, notifier,
                                  pipe))
    finally:
        if notifier is not None:
            notifier.close()
        if opened is not None:
            opened.close()
    if _native_threads_left():
        _exit_leaving_threads(code)
    return code


async def _serve(args: argparse.Namespace, cfg: Config, backend: Any, source: str,
                 file_audio: dict[int, Int16Array | FileMix] | None,
                 hangups: _HeldHangups | None = None,
                 notifier: Notifier | None = None,
                 pipe: PipeCapture | None = None) -> int:
    """Serve until stopped: ``source`` is ``mic``, ``none`` or a file's
    stream name, whose audio ``file_audio`` holds by channel as
    :func:`_channel_mixes` keys it (a file's mixes decoded as they are
    fed), or ``pipe`` reads live (its header read)."""
    from ..audio.microphone import MicrophoneCapture
    from ..run import play_together

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # If the model thread dies, the worker reloads the model with this.
    reload = functools.partial(load_backend, cfg.model)
    stream_id = args.stream or source
    printer = None if args.no_print else _printer(args, cfg, source, stream_id,
                                                  own=file_audio is not None or pipe is not None)
    async with _flushed_at_the_end(printer), \
            Engine(cfg, backend, backend_factory=reload) as engine, \
            CaptionServer(engine, cfg.server) as server, \
            contextlib.AsyncExitStack() as stack:
        await _start_mqtt(stack, cfg, engine, server)
        running = [cfg]
        reloads: set[asyncio.Task[None]] = set()
        scheme = "wss" if cfg.server.tls_cert else "ws"
        url = _base_url(scheme, cfg.server.host, server.port)

        def snapshot() -> Snapshot:
            return _service_snapshot(engine, url)

        if notifier is not None:
            supervisor = asyncio.ensure_future(supervise(notifier, snapshot))
            stack.callback(supervisor.cancel)

        # One reload at a time: each compares the file with what the one
        # before it applied (running), and one still closing the clients its
        # tokens revoke must not record its older [auth] after a later one.
        # At most one waits behind it (bounded): it reads the file once its
        # turn comes, so later SIGHUPs until then are folded into it.
        in_turn = asyncio.Lock()
        waiting: list[asyncio.Task[None]] = []

        async def reload_in_turn() -> None:
            async with in_turn:
                waiting.clear()
                await _reload(args, running, server, notifier, snapshot)

        def on_sighup() -> None:
            if waiting:
                log.info("reload: SIGHUP folded into the reload waiting for its turn")
                return
            task = asyncio.ensure_future(reload_in_turn())
            waiting.append(task)
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        def hold_sighup() -> None:
            loop.remove_signal_handler(signal.SIGHUP)  # restores the default action
            if hangups is not None:
                hangups.install()

        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            stack.callback(hold_sighup)
            if hangups is not None and hangups.pending:
                on_sighup()  # one that came while the model loaded
        if printer is not None:
            engine.add_listener(printer)
        _notice(cfg, f"serving captions on {url}/v1/captions (Ctrl-C to stop)")
        feeder: asyncio.Task[Any] | None = None
        mic: MicrophoneCapture | None = None
        # A file's or pipe's streams: finite audio, whose failures (read or
        # decode) make the exit status 1, as transcribe's do. A microphone
        # lost and back again does not: a day's serving is not failed by it.
        played: list[Stream] = []
        if source == "mic":
            streams = {ch: engine.open_stream(name, source="mic")
                       for ch, name in _channel_stream_ids(cfg, stream_id).items()}

            def mic_lost(message: str) -> None:
                # End the open segments now: their finals must not wait for
                # the device to come back.
                for stream in streams.values():
                    if not stream.closed:
                        stream.cut()
                        stream.report_error("audio_input_lost", message)

            mixes = _channel_mixes(cfg)
            routes = [ChannelRoute(s.push, mixes[ch]) for ch, s in streams.items()]
            mic = MicrophoneCapture.from_config(cfg.audio, routes, on_stall=mic_lost)
            mic.start(loop)
            stack.callback(mic.stop)  # however this block is left, before the engine closes
        elif file_audio is not None:
            names = _channel_stream_ids(cfg, stream_id)
            feeds = [(engine.open_stream(names[ch], source="file"), samples)
                     for ch, samples in file_audio.items()]
            played += [stream for stream, _ in feeds]
            chunk = cfg.audio.file_chunk_ms * SAMPLE_RATE // 1000
            # One clock for every channel's stream; the feeder ends once
            # every one of them has its last final.
            feeder = asyncio.ensure_future(play_together(feeds, chunk))
            if args.exit_at_end:
                feeder.add_done_callback(lambda _: stop.set())
        elif pipe is not None:
            names = _channel_stream_ids(cfg, stream_id)
            piped = [engine.open_stream(names[ch], source="pipe") for ch in names]
            played += piped

            async def pipe_ended(end: PipeEnd) -> None:
                if end.error is not None:
                    log.error("%s; its open captions are finished", end.error)
                    for stream in piped:
                        stream.report_error("audio_input_lost", str(end.error))
                elif end.unfinished_bytes:
                    log.warning("%s ended inside a frame: its last %d byte(s) are dropped",
                                pipe.name, end.unfinished_bytes)
                else:
                    log.info("%s ended after %.1f s of audio", pipe.name,
                             pipe.frames_read / pipe.format.rate if pipe.format else 0.0)
                await asyncio.gather(*(stream.close() for stream in piped))

            def on_pipe_ahead(ahead_s: float) -> None:
                # A file sent whole (cat talk.wav |): its requests wait in the
                # model's queue by design from here, as a transcribed file's
                # do, which says nothing about keeping up with live audio.
                for stream in piped:
                    stream.paced = False
                log.info("%s sends audio faster than it plays (%.1f s ahead of the clock): "
                         "it is captioned as fast as the model goes, its wait for the model "
                         "not counted as lag (to caption it live, pace the writer: "
                         "`ffmpeg -re`)", pipe.name, ahead_s)

            def on_pipe_end(end: PipeEnd) -> None:
                nonlocal feeder
                feeder = asyncio.ensure_future(pipe_ended(end))
                if args.exit_at_end:
                    feeder.add_done_callback(lambda _: stop.set())

            pipe.start(loop, [ChannelRoute(s.push, m) for s, m in
                              zip(piped, _channel_mixes(cfg).values(), strict=True)],
                       on_pipe_end, on_pipe_ahead)
            stack.callback(pipe.stop)  # however this block is left, before the engine closes
        await stop.wait()
        # From here a SIGHUP is ignored (docs/config.md): a reload now would
        # close subscribers still owed the drained finals (token_revoked).
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(
                signal.SIGHUP, log.info, "reload: SIGHUP ignored while shutting down")
        if notifier is not None:
            notifier.send(notifier.notices.stopping("stopping: finishing open captions"))
        if mic is not None:
            mic.stop()
        if pipe is not None:
            pipe.stop()
        if feeder is not None and not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        # A second Ctrl-C (or SIGTERM) stops at once: finals still owed are
        # closed with their last partials instead of waited for.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, engine.give_up)
        if engine.streams:
            _notice(cfg, "stopping: finishing open captions "
                         "(press Ctrl-C again to stop at once)")
        # Flush open segments as finals while subscribers are still connected;
        # only then does the server close them (1001, going away).
        drained = await engine.drain()
    _ignore_late_stops(loop)
    # Exit status 1: some final had to be closed early or was lost, or the
    # file or pipe played could not all be read or decoded (each logged).
    return 0 if drained and not any(stream.errors for stream in played) else 1


def _printer(args: argparse.Namespace, cfg: Config, source: str, stream_id: str, *,
             own: bool) -> CaptionPrinter:
    """The printer of serve's captions on stdout; ``own``: a file's or a
    pipe's audio is played. Off a terminal its lines are queued for a thread
    of their own: stdout is a side output here, and a reader that stops
    reading it (journald, docker) must not stop the server."""
    # Channels split into streams, or only clients' streams: each line says
    # whose it is. Else the source's lines are unnamed and those of streams
    # clients send name theirs.
    own = own or source == "mic"
    several = own and len(_channel_stream_ids(cfg, stream_id)) > 1
    everyone = several or args.source == "none"
    return CaptionPrinter(show_stream=everyone, own=None if everyone else stream_id,
                          queued=True)


@contextlib.asynccontextmanager
async def _flushed_at_the_end(printer: CaptionPrinter | None) -> AsyncIterator[None]:
    """Wait, as the block ends, for the lines ``printer`` queued to be
    written, at most a bounded while: a reader that is stuck does not
    hang the exit."""
    try:
        yield
    finally:
        if printer is not None:
            await asyncio.to_thread(printer.flush)


async def _reload(args: argparse.Namespace, running: list[Config], server: CaptionServer,
                  notifier: Notifier | None = None,
                  snapshot: Callable[[], Snapshot] | None = None) -> None:
    """SIGHUP: read the configuration again (the same file and flags) and apply
    its [auth] section; other changes wait for a restart (logged). A bad
    configuration changes nothing. systemd hears of the reload's start and
    end either way."""
    if notifier is not None:
        notifier.send(notifier.notices.reloading(monotonic_usec()))
    try:
        await _apply_reload(args, running, server)
    finally:
        if notifier is not None and snapshot is not None:
            notifier.send(notifier.notices.reloaded(snapshot()))


async def _apply_reload(args: argparse.Namespace, running: list[Config],
                        server: CaptionServer) -> None:
    current = running[0]
    try:
        new = _load_config(args)
        if new.auth != current.auth:
            closed = await server.reload_auth(new.auth)
            log.info("reload: [auth] applied: %d token(s); %d connection(s) whose token is no "
                     "longer accepted were closed", len(new.auth.tokens), closed)
        else:
            log.info("reload: [auth] unchanged")
    except ConfigError as e:
        log.error("reload: %s; the running configuration is kept", e)
        return
    running[0] = dataclasses.replace(current, auth=new.auth)
    later = [f.name for f in dataclasses.fields(Config)
             if f.name != "auth" and getattr(new, f.name) != getattr(current, f.name)]
    if later:
        log.warning("reload: [%s] changed; only [auth] is applied at a reload, the rest "
                    "at a restart", "], [".join(later))


def _service_snapshot(engine: Engine, url: str) -> Snapshot:
    """The engine as systemd's status line and watchdog see it."""
    why = engine.unhealthy_reason
    if why is not None:
        status = f"{why} (see the log); serving on {url}"
    elif engine.ready:
        n = len(engine.streams)
        status = f"serving on {url}: {n} stream{'s' if n != 1 else ''} open"
    else:
        status = f"preparing the model (warm-up or reload); listening on {url}"
    return Snapshot(engine.ready, why, status)


def _base_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port``, an IPv6 literal in brackets (RFC 3986): the URL
    the status line shows must be one a client can open."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _check_serving(cfg: Config) -> None:
    """What serving refuses from the configuration alone, before the model
    loads (``serve``, ``transcribe --serve``; ``config`` checks it too): a
    non-loopback bind without tokens, TLS files that do not load, MQTT
    without aiomqtt."""
    from ..server.auth import check_bind, tls_context

    check_bind(cfg.server.host, cfg.auth.tokens, cfg.server.allow_anonymous)
    # Loaded as the server loads them at its start, which reads them again:
    # the context made here is dropped.
    tls_context(cfg.server.tls_cert, cfg.server.tls_key)
    _check_mqtt_extra(cfg)


def _check_mqtt_extra(cfg: Config) -> None:
    """Refuse ``mqtt.enabled`` without aiomqtt before the model loads, in one line."""
    if not cfg.mqtt.enabled:
        return
    try:
        import aiomqtt  # noqa: F401
    except ImportError:
        raise UserError(f"MQTT needs aiomqtt: {extra_hint('mqtt')}, "
                        "or set mqtt.enabled=false") from None


async def _start_mqtt(stack: contextlib.AsyncExitStack, cfg: Config, engine: Engine,
                      server: CaptionServer) -> None:
    """Publish captions to MQTT too when ``mqtt.enabled``; never blocks the engine.
    The publisher's counters join the server's ``/metrics``."""
    if not cfg.mqtt.enabled:
        return
    from ..server.mqtt import MqttPublisher

    publisher = await stack.enter_async_context(MqttPublisher(cfg.mqtt))
    engine.add_listener(publisher)
    stack.callback(engine.remove_listener, publisher)
    server.metrics.watch_mqtt(publisher.stats)
    stack.callback(server.metrics.watch_mqtt, None)
    scheme = "mqtts" if cfg.mqtt.tls else "mqtt"
    _notice(cfg, f"publishing captions to {scheme}://{cfg.mqtt.host}:{cfg.mqtt.port}/"
                 f"{cfg.mqtt.prefix}/")
