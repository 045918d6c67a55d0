"""TLS: wss and https on the server's one port, with a certificate made here, and
the one-line errors for unusable files at start (renewals: test_cert_reload.py)."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidHandshake, InvalidMessage

from evoxtral_stream.config import ConfigError, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.server.app import CaptionServer
from tests.fakes import ScriptedBackend
from tests.helpers.pki import self_signed


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert, key) PEM paths; beside them,
    ``encrypted.key`` is the key under a passphrase."""
    return self_signed(tmp_path_factory.mktemp("tls"))


async def test_wss_and_https_work_and_plain_ws_fails(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": str(cert),
                                 "server.tls_key": str(key)}, env={})
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine, \
            CaptionServer(engine, cfg.server) as server:
        async with connect(f"wss://127.0.0.1:{server.port}/v1/captions", ssl=client_ctx) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "hello"

        def healthz() -> bytes:
            with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz",
                                        context=client_ctx, timeout=5) as r:
                return bytes(r.read())
        assert await asyncio.to_thread(healthz) == b"ok\n"
        with pytest.raises((InvalidHandshake, InvalidMessage, OSError, EOFError)):
            async with connect(f"ws://127.0.0.1:{server.port}/v1/captions",
                               open_timeout=5):
                pass
        # Without the test CA the certificate is not trusted.
        with pytest.raises(ssl.SSLCertVerificationError):
            async with connect(f"wss://127.0.0.1:{server.port}/v1/captions",
                               ssl=ssl.create_default_context(), open_timeout=5):
                pass


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Keys that are not :func:`certificate`'s: (another RSA key, an EC key)."""
    folder = tmp_path_factory.mktemp("other")
    _, other_key = self_signed(folder)
    ec_key = folder / "ec.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(ec_key)],
                   check=True, capture_output=True, timeout=60)
    return other_key, ec_key


@pytest.mark.parametrize(("which", "message"), [
    ("missing", "server.tls_cert '{none}' is not a file"),
    ("swapped", "(server.tls_cert holds no complete PEM certificate)"),
    ("only_cert", "server.tls_cert and server.tls_key must be set together"),
    # A renewal caught half written: the message says which file.
    ("truncated", "(server.tls_cert holds no complete PEM certificate)"),
    # A chain (certbot's fullchain.pem) cut off in its second certificate:
    # OpenSSL said only BAD_END_LINE.
    ("chain_cut", "(server.tls_cert holds a PEM certificate cut off before its END line)"),
    # Not a prompt on the terminal, which would hang a service.
    ("encrypted", "server.tls_key '{encrypted}' is encrypted; give an unencrypted key"),
    # OpenSSL's reason codes alone said little: now in words, code kept.
    ("other_key", "(the private key is not the certificate's: KEY_VALUES_MISMATCH)"),
    ("ec_key", "(the private key is not the certificate's, another type of key: "
               "NO_CERTIFICATE_ASSIGNED)"),
])
async def test_bad_tls_files_stop_the_start(certificate: tuple[Path, Path], tmp_path: Path,
                                            other_keys: tuple[Path, Path], which: str,
                                            message: str) -> None:
    cert, key = certificate
    truncated, encrypted = tmp_path / "truncated.pem", key.parent / "encrypted.key"
    truncated.write_bytes(cert.read_bytes()[:300])
    chain_cut = tmp_path / "chain_cut.pem"
    chain_cut.write_bytes(cert.read_bytes() + cert.read_bytes()[:300])
    other_key, ec_key = other_keys
    paths = {"missing": (str(tmp_path / "none.pem"), str(key)),
             "swapped": (str(key), str(cert)),
             "only_cert": (str(cert), ""),
             "truncated": (str(truncated), str(key)),
             "chain_cut": (str(chain_cut), str(key)),
             "encrypted": (str(cert), str(encrypted)),
             "other_key": (str(cert), str(other_key)),
             "ec_key": (str(cert), str(ec_key))}[which]
    cfg = load_config(overrides={"server.port": 0, "server.tls_cert": paths[0],
                                 "server.tls_key": paths[1]}, env={})
    async with Engine(cfg, ScriptedBackend(lambda a: "")) as engine:
        server = CaptionServer(engine, cfg.server)
        with pytest.raises(ConfigError, match="tls") as info:
            await server.start()
        assert "\n" not in str(info.value)
        assert message.format(none=tmp_path / "none.pem", encrypted=encrypted) in str(info.value)
