"""The server's TLS certificate is renewed under it: new handshakes get the
new one, open connections go on, and bad renewed files leave the old one in
service. Certificates are made here with openssl; the server is real."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from evoxtral_stream.config import load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server import certs as certs_module
from evoxtral_stream.server.app import CaptionServer
from evoxtral_stream.server.auth import load_server_certificate
from evoxtral_stream.server.certs import (
    CertWatcher,
    FileStamp,
    Fingerprint,
    ServerCertificate,
    fingerprint,
)
from tests.fakes import ScriptedBackend
from tests.helpers.pki import CA_KEY_USAGE

pytestmark = pytest.mark.timeout(60)

Pair = tuple[Path, Path]  # (certificate, private key), PEM
POLL_S = 0.2
CERTS_LOG = "evoxtral_stream.server.certs"


@dataclass(frozen=True)
class Pki:
    """A CA the clients trust and three server certificates for 127.0.0.1 it signed."""

    ca: Path
    alpha: Pair    # CN alpha
    renewed: Pair  # CN alpha-renewed, alpha's key reused (certbot --reuse-key)
    bravo: Pair    # CN bravo, a key of its own
    encrypted_key: Path  # bravo's key, under a passphrase


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("reload-pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    run("req", "-x509", *ec, "-days", "2", "-subj", "/CN=reload-ca", "-addext",
        CA_KEY_USAGE, "-keyout", str(ca_key), "-out", str(ca))
    ext = folder / "leaf.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n"
                   "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
                   "extendedKeyUsage=serverAuth\n")

    def leaf(name: str, key: Path | None = None) -> Pair:
        cert, csr = folder / f"{name}.pem", folder / f"{name}.csr"
        if key is None:
            key = folder / f"{name}.key"
            run("req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", str(key),
                "-out", str(csr))
        else:
            run("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return cert, key

    alpha = leaf("alpha")
    bravo = leaf("bravo")
    encrypted = folder / "encrypted.key"
    run("pkey", "-in", str(bravo[1]), "-aes256", "-passout", "pass:secret",
        "-out", str(encrypted))
    return Pki(ca=ca, alpha=alpha, renewed=leaf("alpha-renewed", alpha[1]), bravo=bravo,
               encrypted_key=encrypted)


def replace(dst: Path, data: bytes) -> None:
    """Write ``dst`` the way renewal tools do: a new file beside it, renamed over it."""
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


def live_files(folder: Path, pair: Pair) -> Pair:
    """Copies of ``pair`` that a test may renew: (cert, key) in ``folder``."""
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(pair[0].read_bytes())
    key.write_bytes(pair[1].read_bytes())
    return cert, key


def common_name(peer: Mapping[str, Any] | None) -> str:
    """The subject CN of a certificate as ``SSLSocket.getpeercert()`` gives it."""
    assert peer is not None, "no peer certificate"
    return next(str(value) for rdn in peer["subject"] for name, value in rdn
                if name == "commonName")


def handshake_cn(server_ctx: ssl.SSLContext, ca: Path) -> str:
    """The CN a client trusting ``ca`` is served by ``server_ctx``, over memory
    BIOs: a real TLS handshake without a socket."""
    client_ctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (client, server):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return common_name(client.getpeercert())
    raise AssertionError("the handshake did not finish")


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CERTS_LOG and r.levelno == level]


# --- the pure core --------------------------------------------------------------------


def stamp(inode: int, size: int = 100, mtime_ns: int = 1) -> FileStamp:
    return FileStamp(1, inode, size, mtime_ns)


A: Fingerprint = (stamp(1), stamp(2))
B: Fingerprint = (stamp(3), stamp(2))     # the certificate replaced
AB: Fingerprint = (stamp(3), stamp(4))    # both replaced
GONE: Fingerprint = (None, stamp(2))      # mid symlink swap, say


def test_watcher_asks_for_a_load_only_when_the_files_differ_from_those_loaded() -> None:
    w = CertWatcher(A)
    assert not w.due(A)
    assert w.due(B) and w.due(GONE)
    assert not w.due((stamp(1, mtime_ns=1), stamp(2)))
    assert w.due((stamp(1, mtime_ns=2), stamp(2))), "rewritten in place"
    assert w.due((stamp(1, size=99), stamp(2)))
    w.loaded(B)
    assert (w.current, w.due(B), w.due(A)) == (B, False, True)


def test_watcher_retries_a_bad_state_at_every_check_and_calls_it_news_once() -> None:
    w = CertWatcher(A)
    assert w.due(B) and w.failed(B, "KEY_VALUES_MISMATCH")
    for _ in range(3):
        assert w.due(B), "retried while bad"
        assert not w.failed(B, "KEY_VALUES_MISMATCH"), "logged once"
    assert w.failed(B, "no such file"), "another reason is news"
    assert w.failed(GONE, "no such file"), "other files are news"
    w.loaded(AB)
    assert w.current == AB and not w.due(AB)
    assert w.failed(B, "KEY_VALUES_MISMATCH"), "a bad state after a success is news again"


def test_watcher_forgets_a_bad_state_once_the_files_are_back_to_those_loaded() -> None:
    w = CertWatcher(A)
    assert w.failed(B, "bad")
    assert not w.due(A)
    assert w.failed(B, "bad"), "the same bad renewal again, after an undo, is news"


def test_fingerprint_sees_renames_in_place_writes_and_symlink_swaps(tmp_path: Path) -> None:
    f = tmp_path / "cert.pem"
    f.write_text("one")
    first = fingerprint([str(f)])
    assert first == fingerprint([str(f)])
    replace(f, b"one")
    renamed = fingerprint([str(f)])
    assert renamed != first, "same bytes, another inode"
    # Past the file system's timestamp granularity, as renewals weeks apart are.
    time.sleep(0.05)
    f.write_text("one")
    assert fingerprint([str(f)]) != renamed, "rewritten in place: another mtime"

    # Kubernetes mounts a secret as cert.pem -> ..data/cert.pem, ..data -> a
    # folder per version, and renews by pointing ..data at a new folder.
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "tls.crt").write_text("same")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "tls.crt").symlink_to("..data/tls.crt")
    before = fingerprint([str(tmp_path / "tls.crt")])
    (tmp_path / "..data.new").symlink_to("v2")
    os.replace(tmp_path / "..data.new", tmp_path / "..data")
    assert fingerprint([str(tmp_path / "tls.crt")]) != before

    assert fingerprint([str(tmp_path / "none.pem"), str(f)])[0] is None


# --- the server's context, without a network ---------------------------------------------


@pytest.mark.parametrize("how", ["rename", "in_place", "symlink"])
def test_a_renewal_is_loaded_into_the_same_context(pki: Pki, tmp_path: Path, how: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    if how == "symlink":
        for version, pair in (("v1", pki.alpha), ("v2", pki.bravo)):
            (tmp_path / version).mkdir()
            live_files(tmp_path / version, pair)
        (tmp_path / "..data").symlink_to("v1")
        for name in ("server.pem", "server.key"):
            (tmp_path / name).symlink_to(f"..data/{name}")
        cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    else:
        cert, key = live_files(tmp_path, pki.alpha)
    served = ServerCertificate.open(str(cert), str(key))
    assert served is not None
    ctx = served.context
    assert handshake_cn(ctx, pki.ca) == "alpha"
    assert served.poll() == "unchanged"

    if how == "symlink":
        (tmp_path / "..data.new").symlink_to("v2")
        os.replace(tmp_path / "..data.new", tmp_path / "..data")
    elif how == "rename":
        replace(key, pki.bravo[1].read_bytes())
        replace(cert, pki.bravo[0].read_bytes())
    else:
        time.sleep(0.05)  # see test_fingerprint_sees_renames_in_place_writes_and_symlink_swaps
        key.write_bytes(pki.bravo[1].read_bytes())
        cert.write_bytes(pki.bravo[0].read_bytes())
    assert served.poll() == "reloaded"
    assert served.context is ctx
    assert handshake_cn(ctx, pki.ca) == "bravo"
    assert served.poll() == "unchanged"
    assert records(caplog, logging.INFO) == [
        f"server TLS certificate reloaded from {cert} and {key}"]
    assert records(caplog, logging.ERROR) == []


def test_files_changing_during_a_reload_never_leave_the_context_without_its_key(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files are read once, into a context of their own: a second
    renewal landing right after that read cannot reach the context in
    service, and shows at the next poll."""
    cert, key = live_files(tmp_path, pki.alpha)
    served = ServerCertificate.open(str(cert), str(key))
    assert served is not None
    replace(key, pki.bravo[1].read_bytes())
    replace(cert, pki.bravo[0].read_bytes())
    loads: list[str] = []

    def then_alpha_key_lands(ctx: ssl.SSLContext, c: str, k: str, **kw: Any) -> None:
        load_server_certificate(ctx, c, k, **kw)
        if not loads:  # right after the read: the live files stop matching
            replace(key, pki.alpha[1].read_bytes())
        loads.append(c)

    monkeypatch.setattr(certs_module, "load_server_certificate", then_alpha_key_lands)
    assert served.poll() == "reloaded"
    assert loads == [str(cert)]
    assert handshake_cn(served.context, pki.ca) == "bravo"
    # The mismatched files on disk now fail to load, and bravo stays served.
    assert served.poll() == "failed"
    assert handshake_cn(served.context, pki.ca) == "bravo"


@pytest.mark.parametrize(("bad", "reason"), [
    ("half_written", "KEY_VALUES_MISMATCH"),
    ("truncated", "server.tls_cert holds no complete PEM certificate"),
    ("chain_cut", "server.tls_cert holds a PEM certificate cut off before its END line"),
    ("garbage_key", "server.tls_key holds no complete PEM private key"),
    ("encrypted", "is encrypted; give an unencrypted key"),
    ("missing", "is not a file"),
])
def test_bad_renewed_files_keep_the_old_certificate_until_they_are_whole(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str, reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)
    served = ServerCertificate.open(str(cert), str(key))
    assert served is not None
    # Each bad state is one step of a renewal to bravo; ``fix`` completes it.
    if bad == "half_written":  # the certificate has landed, its key not yet
        replace(cert, pki.bravo[0].read_bytes())
        fix = [(key, pki.bravo[1])]
    elif bad == "truncated":
        replace(cert, pki.bravo[0].read_bytes()[:200])
        fix = [(key, pki.bravo[1]), (cert, pki.bravo[0])]
    elif bad == "chain_cut":  # certbot's fullchain.pem, its intermediate half written
        chain = pki.bravo[0].read_bytes() + pki.ca.read_bytes()
        replace(key, pki.bravo[1].read_bytes())
        replace(cert, chain[:len(chain) - 100])
        fix = [(cert, pki.bravo[0])]
    elif bad == "garbage_key":
        replace(cert, pki.bravo[0].read_bytes())
        replace(key, b"not a key\n")
        fix = [(key, pki.bravo[1])]
    elif bad == "encrypted":
        replace(cert, pki.bravo[0].read_bytes())
        replace(key, pki.encrypted_key.read_bytes())
        fix = [(key, pki.bravo[1])]
    else:
        key.unlink()  # a non-atomic swap: removed, then written
        fix = [(cert, pki.bravo[0]), (key, pki.bravo[1])]
    for _ in range(3):
        assert served.poll() == "failed"
        # The live context was not touched: it still completes handshakes.
        assert handshake_cn(served.context, pki.ca) == "alpha"
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1, errors
    assert str(cert) in errors[0] and str(key) in errors[0] and reason in errors[0]
    assert "still serving the previous certificate" in errors[0]
    assert "\n" not in errors[0]

    for path, source in fix:
        replace(path, source.read_bytes())
    assert served.poll() == "reloaded"
    assert handshake_cn(served.context, pki.ca) == "bravo"
    assert len(records(caplog, logging.ERROR)) == 1
    assert len(records(caplog, logging.INFO)) == 1


def test_a_renewal_is_loaded_where_no_temporary_folder_can_be_written(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A container with a read-only root file system (Kubernetes'
    readOnlyRootFilesystem, where cert-manager renews the secret) has no
    writable /tmp: the reload made private copies of both files there, so
    every renewal failed and the old certificate was served until it expired.
    And a copy of the private key has no business on disk anyway."""
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)
    served = ServerCertificate.open(str(cert), str(key))
    assert served is not None
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    replace(key, pki.bravo[1].read_bytes())
    replace(cert, pki.bravo[0].read_bytes())
    assert served.poll() == "reloaded", records(caplog, logging.ERROR)
    assert handshake_cn(served.context, pki.ca) == "bravo"


def test_a_renewed_file_that_is_a_fifo_is_refused_without_blocking(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The poll runs on the event loop: opening a named pipe for reading
    blocks until a writer comes, and every connection with it. At the start
    such a file is refused as not a file; at a reload it must be too."""
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)
    served = ServerCertificate.open(str(cert), str(key))
    assert served is not None
    cert.unlink()
    os.mkfifo(cert)
    results: list[str] = []
    poll = threading.Thread(target=lambda: results.append(served.poll()), daemon=True)
    poll.start()
    poll.join(5)
    blocked = poll.is_alive()
    if blocked:
        # Unblock it: a writer lets the reader's open return (at end of file).
        with open(os.open(cert, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        poll.join(5)
    assert not blocked, "the poll blocked on the pipe"
    assert results == ["failed"]
    errors = records(caplog, logging.ERROR)
    assert len(errors) == 1 and f"server.tls_cert {str(cert)!r} is not a file" in errors[0]
    assert handshake_cn(served.context, pki.ca) == "alpha"


# --- a real server ------------------------------------------------------------------------


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


def peer_cn(ws: ClientConnection) -> str:
    peer = ws.transport.get_extra_info("peercert")
    assert isinstance(peer, dict)
    return common_name(peer)


async def served_cn(port: int, pki: Pki) -> str:
    async with connect(f"wss://127.0.0.1:{port}/v1/captions", ssl=client_context(pki),
                       open_timeout=5) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "hello"
        return peer_cn(ws)


async def until_served(port: int, pki: Pki, cn: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    seen = await served_cn(port, pki)
    while seen != cn:
        if time.monotonic() > deadline:
            raise AssertionError(f"still served {seen!r} after {within} s, wanted {cn!r}")
        await asyncio.sleep(0.05)
        seen = await served_cn(port, pki)


async def until_logged(caplog: pytest.LogCaptureFixture, level: int, within: float = 10.0
                       ) -> list[str]:
    deadline = time.monotonic() + within
    while not records(caplog, level):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing logged at {logging.getLevelName(level)}")
        await asyncio.sleep(0.02)
    return records(caplog, level)


async def test_new_connections_get_the_renewed_certificate_and_open_ones_go_on(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": str(cert),
                                 "server.tls_key": str(key)}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine, \
            CaptionServer(engine, cfg.server, tls_poll_s=POLL_S) as server:
        url = f"wss://127.0.0.1:{server.port}/v1/captions"
        async with connect(url, ssl=client_context(pki)) as first:
            assert json.loads(await asyncio.wait_for(first.recv(), 5))["type"] == "hello"
            assert peer_cn(first) == "alpha"

            replace(key, pki.bravo[1].read_bytes())
            replace(cert, pki.bravo[0].read_bytes())
            await until_served(server.port, pki, "bravo")

            # The connection opened before the renewal still works both ways.
            await first.send("hello?")
            answer = json.loads(await asyncio.wait_for(first.recv(), 5))
            assert (answer["type"], answer["code"]) == ("error", "unexpected_message")
            assert peer_cn(first) == "alpha"
    reloaded = records(caplog, logging.INFO)
    assert reloaded and all(m == f"server TLS certificate reloaded from {cert} and {key}"
                            for m in reloaded)


@pytest.mark.parametrize("bad", ["garbage", "half_written"])
async def test_bad_renewed_files_are_logged_once_and_the_old_certificate_served(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str,
) -> None:
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": str(cert),
                                 "server.tls_key": str(key)}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine, \
            CaptionServer(engine, cfg.server, tls_poll_s=POLL_S) as server:
        assert await served_cn(server.port, pki) == "alpha"
        # One file changes at each step, so no poll can see a state in between.
        if bad == "garbage":
            replace(cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
            fixed, cn, reason = (cert, pki.renewed[0]), "alpha-renewed", "no complete PEM"
        else:
            replace(cert, pki.bravo[0].read_bytes())
            fixed, cn, reason = (key, pki.bravo[1]), "bravo", "KEY_VALUES_MISMATCH"
        errors = await until_logged(caplog, logging.ERROR)
        await asyncio.sleep(5 * POLL_S)  # more polls of the same bad files
        assert records(caplog, logging.ERROR) == errors and len(errors) == 1, errors
        assert str(cert) in errors[0] and str(key) in errors[0] and reason in errors[0]
        assert await served_cn(server.port, pki) == "alpha"
        assert records(caplog, logging.INFO) == []

        replace(fixed[0], fixed[1].read_bytes())
        await until_served(server.port, pki, cn)
        assert len(records(caplog, logging.ERROR)) == 1
        assert records(caplog, logging.INFO) == [
            f"server TLS certificate reloaded from {cert} and {key}"]


async def test_the_watch_stops_with_the_server(pki: Pki, tmp_path: Path) -> None:
    cert, key = live_files(tmp_path, pki.alpha)
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": str(cert),
                                 "server.tls_key": str(key)}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine:
        server = CaptionServer(engine, cfg.server, tls_poll_s=POLL_S)
        await server.start()
        assert any(t.get_name() == "tls-reload" for t in asyncio.all_tasks())
        await server.aclose()
        assert not any(t.get_name() == "tls-reload" and not t.done()
                       for t in asyncio.all_tasks())
        # With polling off, or without TLS, there is nothing to watch.
        plain = load_config(overrides={"server.port": 0}, env={})
        for server in (CaptionServer(engine, cfg.server, tls_poll_s=0),
                       CaptionServer(engine, plain.server, tls_poll_s=POLL_S)):
            async with server:
                assert not any(t.get_name() == "tls-reload" for t in asyncio.all_tasks())


@pytest.fixture(scope="module")
def rsa_leaf(pki: Pki) -> tuple[Path, Path]:
    """An RSA certificate, CN charlie-rsa, signed by the test CA."""
    openssl = shutil.which("openssl")
    assert openssl is not None
    folder = pki.ca.parent
    key, csr, cert = folder / "charlie.key", folder / "charlie.csr", folder / "charlie.pem"

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=charlie-rsa",
        "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(pki.ca), "-CAkey",
        str(pki.ca.parent / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile",
        str(folder / "leaf.ext"), "-out", str(cert))
    return cert, key


async def test_a_renewal_to_another_key_type_is_served_to_new_connections(
    pki: Pki, rsa_leaf: tuple[Path, Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """OpenSSL keeps a certificate per key type in a context: a renewal from
    ECDSA to RSA (certbot --key-type) loaded into the live context sat beside
    the old pair, which handshakes still chose, while the log said reloaded."""
    caplog.set_level(logging.INFO, logger=CERTS_LOG)
    cert, key = live_files(tmp_path, pki.alpha)          # ECDSA in service
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": str(cert),
                                 "server.tls_key": str(key)}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine, \
            CaptionServer(engine, cfg.server, tls_poll_s=POLL_S) as server:
        assert await served_cn(server.port, pki) == "alpha"
        replace(key, rsa_leaf[1].read_bytes())           # renewed as RSA
        replace(cert, rsa_leaf[0].read_bytes())
        await until_logged(caplog, logging.INFO)
        assert records(caplog, logging.INFO) == [
            f"server TLS certificate reloaded from {cert} and {key}"]
        await asyncio.sleep(3 * POLL_S)
        # The log says reloaded; a new connection must get the new certificate.
        assert await served_cn(server.port, pki) == "charlie-rsa"
