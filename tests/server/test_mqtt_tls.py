"""The MQTT publisher over TLS, against a real mosquitto with certificates made here:
trust, client certificates, renewed files picked up at a reconnect, config errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

try:
    import aiomqtt
except ImportError:  # the mqtt extra is optional
    pytest.skip("aiomqtt not installed (pip install -e '.[mqtt]')",
                allow_module_level=True)

from evoxtral_stream.config import ConfigError, load_config
from evoxtral_stream.engine.engine import Engine
from evoxtral_stream.events import CaptionEvent, EngineEvent, StreamStarted
from evoxtral_stream.run import feed_samples
from evoxtral_stream.server.mqtt import MqttPublisher
from evoxtral_stream.server.mqtt_connect import _tls_hint
from evoxtral_stream.server.protocol import encode_event
from tests.fakes import ScriptedBackend
from tests.helpers.audio import buzz, noise, to_int16
from tests.helpers.http import Relay
from tests.helpers.pki import CA_KEY_USAGE
from tests.server.conftest import MosquittoBroker, free_port, mosquitto_binary
from tests.server.test_mqtt import (
    Subscriber,
    body,
    caption,
    eventually,
    mqtt_overrides,
    payload,
    topic,
    words_so_far,
)

pytestmark = pytest.mark.timeout(90)

Pair = tuple[Path, Path]  # (certificate, private key), PEM


@dataclass(frozen=True)
class Pki:
    """Certificates made for the tests; only ``ca`` is trusted by the engine."""

    folder: Path
    ca: Path
    other_ca: Path    # a CA nothing here is signed by but ``impostor``
    server: Pair      # signed by ca, names 127.0.0.1
    impostor: Pair    # names 127.0.0.1, signed by another CA
    wrong_name: Pair  # signed by ca, names elsewhere.invalid only
    client: Pair      # a client certificate signed by ca
    encrypted_key: Path  # the client's key, encrypted with a passphrase


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("mqtt-pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")

    def make_ca(name: str) -> Pair:
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        run("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={name}",
            "-addext", CA_KEY_USAGE, "-keyout", str(key), "-out", str(cert))
        return cert, key

    def make_leaf(name: str, signer: Pair, san: str) -> Pair:
        cert, key, csr = (folder / f"{name}.pem", folder / f"{name}.key",
                          folder / f"{name}.csr")
        ext = folder / f"{name}.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       f"subjectAltName={san}\n"
                       "authorityKeyIdentifier=keyid\n"
                       "subjectKeyIdentifier=hash\n"
                       "keyUsage=critical,digitalSignature\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n")
        run("req", "-new", *ec, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(signer[0]), "-CAkey", str(signer[1]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))
        return cert, key

    ca = make_ca("test-ca")
    other = make_ca("other-ca")
    client = make_leaf("client", ca, "DNS:client.invalid")
    encrypted = folder / "encrypted.key"
    run("pkey", "-in", str(client[1]), "-aes256", "-passout", "pass:secret",
        "-out", str(encrypted))
    return Pki(folder=folder, ca=ca[0], other_ca=other[0],
               server=make_leaf("server", ca, "IP:127.0.0.1"),
               impostor=make_leaf("impostor", other, "IP:127.0.0.1"),
               wrong_name=make_leaf("wrong-name", ca, "DNS:elsewhere.invalid"),
               client=client, encrypted_key=encrypted)


class TlsBroker(MosquittoBroker):
    """mosquitto with TLS listeners only, one per server certificate.

    ``ports``: ``good`` (the right certificate), ``impostor``, ``wrong_name``,
    and ``mtls`` (the right certificate, and a client certificate required).
    ``port`` is ``good``.
    """

    def __init__(self, binary: str, workdir: Path, pki: Pki) -> None:
        super().__init__(binary, workdir)
        self.ports = {"good": self.port, "impostor": free_port(), "wrong_name": free_port(),
                      "mtls": free_port()}
        listeners = [("good", pki.server, False), ("impostor", pki.impostor, False),
                     ("wrong_name", pki.wrong_name, False), ("mtls", pki.server, True)]
        lines = [
            # Started as root, mosquitto would switch to the "mosquitto" user,
            # which cannot read the keys in pytest's private folders.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
        ]
        for name, (cert, key), require in listeners:
            lines += [f"listener {self.ports[name]} 127.0.0.1", f"cafile {pki.ca}",
                      f"certfile {cert}", f"keyfile {key}"]
            if require:
                lines.append("require_certificate true")
        self.conf.write_text("\n".join(lines) + "\n")


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[TlsBroker]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    b = TlsBroker(binary, tmp_path, pki)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def client_context(pki: Pki, cert: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@contextlib.asynccontextmanager
async def tls_subscriber(port: int, pki: Pki, *topics: str) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"sub-{secrets.token_hex(4)}",
                              protocol=aiomqtt.ProtocolVersion.V5,
                              tls_context=client_context(pki)) as client:
        for t in topics:
            await client.subscribe(t, qos=1)
        yield Subscriber(client)


def tls_overrides(port: int, prefix: str, pki: Pki, **over: object) -> dict[str, object]:
    return mqtt_overrides(port, prefix, **{"tls": True, "ca_file": str(pki.ca), **over})


def tls_publisher(port: int, prefix: str, pki: Pki, **over: object) -> MqttPublisher:
    return MqttPublisher(load_config(overrides=tls_overrides(port, prefix, pki, **over),
                                     env={}).mqtt)


# --- the happy paths -------------------------------------------------------------------


async def test_captions_arrive_over_tls_and_plain_mqtt_is_refused(broker: TlsBroker,
                                                                 pki: Pki) -> None:
    async with tls_subscriber(broker.port, pki, "t/#") as sub, \
            tls_publisher(broker.port, "t", pki) as pub:
        await asyncio.wait_for(pub.wait_connected(), 10)
        pub(StreamStarted("s", "test"))
        final = caption("s", 0, 1, True, "over tls")
        pub(final)
        got = await sub.until(lambda got: any(topic(m) == "t/s/final" for m in got),
                              "a final over TLS", within=10)
        st = pub.stats()
        assert (st.connects, st.connect_failures, st.protocol) == (1, 0, "5")
    assert [payload(m) for m in got if topic(m) == "t/s/final"] == [encode_event(final).encode()]
    assert [body(m)["type"] for m in got if topic(m) == "t/s/status"] == ["stream.started"]

    # The same listener refuses a plain connection: the success above was TLS.
    plain = MqttPublisher(load_config(overrides=mqtt_overrides(broker.port, "p", timeout_s=1.0),
                                      env={}).mqtt)
    async with plain:
        await eventually(lambda: plain.stats().connect_failures >= 1, "a refusal", within=10)
        assert plain.stats().connects == 0


@pytest.mark.parametrize("with_cert", [True, False])
async def test_client_certificate_when_the_broker_requires_one(
    broker: TlsBroker, pki: Pki, caplog: pytest.LogCaptureFixture, with_cert: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="evoxtral_stream.server.mqtt")
    over: dict[str, object] = {"timeout_s": 1.0}
    if with_cert:
        over |= {"cert_file": str(pki.client[0]), "key_file": str(pki.client[1])}
    async with tls_subscriber(broker.port, pki, "c/#") as sub, \
            tls_publisher(broker.ports["mtls"], "c", pki, **over) as pub:
        pub(caption("s", 0, 1, True, "with a client certificate"))
        if with_cert:
            await sub.until(lambda got: any(topic(m) == "c/s/final" for m in got),
                            "a final from the authenticated client", within=10)
            assert pub.stats().connects == 1
        else:
            await eventually(lambda: pub.stats().connect_failures >= 2,
                             "refusals without a client certificate", within=15)
            st = pub.stats()
            assert (st.connects, st.queued, st.connected) == (0, 1, False)
            # Under TLS 1.3 the broker refuses after the handshake, so the
            # publisher sees a timeout; paho's logger (a child of the
            # publisher's) says why. Under TLS 1.2 the handshake itself fails.
            assert any(r.levelno >= logging.ERROR
                       and ("CERTIFICATE_REQUIRED" in r.getMessage()
                            or "TLS handshake" in r.getMessage())
                       for r in caplog.records), [r.getMessage() for r in caplog.records]


# --- a broker whose certificate is not trusted --------------------------------------------


@pytest.mark.parametrize(("listener", "reason"), [
    ("impostor", "certificate verify failed: unable to get local issuer certificate"),
    ("wrong_name", "mismatch, certificate is not valid for '127.0.0.1'"),
])
async def test_untrusted_broker_is_logged_retried_and_the_finals_go_out_once_fixed(
    broker: TlsBroker, pki: Pki, caplog: pytest.LogCaptureFixture, listener: str,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="evoxtral_stream.server.mqtt")
    audio = to_int16(np.concatenate([noise(0.5), buzz(2.0), noise(1.2, seed=1), buzz(1.5),
                                     noise(1.2, seed=2)]))
    emitted: list[EngineEvent] = []
    worst = 0.0
    async with Relay(broker.ports[listener]) as relay:
        cfg = load_config(overrides={"server.port": 0, **tls_overrides(relay.port, "u", pki)},
                          env={})
        pub = MqttPublisher(cfg.mqtt)

        def timed(event: EngineEvent) -> None:
            nonlocal worst
            t0 = time.perf_counter()
            pub(event)
            worst = max(worst, time.perf_counter() - t0)

        async with pub:
            async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
                engine.add_listener(emitted.append)
                engine.add_listener(timed)
                stream = engine.open_stream("talk", source="test")
                await feed_samples(stream, audio, 1600, realtime=False)
            finals = [e for e in emitted if isinstance(e, CaptionEvent) and e.final]
            assert len(finals) == 2, "the engine went on while the handshake failed"
            assert worst < 0.2, f"a listener call took {worst * 1000:.1f} ms"

            await eventually(lambda: pub.stats().connect_failures >= 3, "retries", within=15)
            st = pub.stats()
            assert (st.connects, st.connected, st.published) == (0, False, 0)
            assert st.last_error is not None and reason in st.last_error
            # started, two finals, ended: the partials were superseded by their finals.
            assert (st.queued, st.unpublished) == (4, 0)
            errors = [r.getMessage() for r in caplog.records
                      if r.name == "evoxtral_stream.server.mqtt" and r.levelno >= logging.ERROR]
            assert len(errors) == 1, f"one error per outage, got {errors}"
            assert f"TLS handshake with 127.0.0.1:{relay.port} failed" in errors[0]
            assert reason in errors[0]
            assert str(pki.ca) in errors[0], "the message names the CA file it trusted"

            # The broker presents the right certificate from now on.
            async with tls_subscriber(broker.port, pki, "u/#") as sub:
                relay.target = broker.port
                got = await sub.until(
                    lambda got: any(topic(m) == "u/talk/status"
                                    and body(m)["type"] == "stream.ended" for m in got),
                    "the events queued while the handshake failed", within=15)
                # Counted at the broker's acknowledgement, which may come
                # after the subscriber has the message.
                await eventually(lambda: pub.stats().published == 4, "the four acknowledged")
            st = pub.stats()
            assert (st.connects, st.published, st.queued, st.unpublished) == (1, 4, 0, 0)
    assert [payload(m) for m in got if topic(m) == "u/talk/final"] == [
        encode_event(e).encode() for e in finals]
    assert any("MQTT connected" in r.getMessage() and "TLS" in r.getMessage()
               for r in caplog.records)


# --- renewed TLS files, used at the next reconnect ----------------------------------------


def renew(dst: Path, src: Path) -> None:
    """Replace ``dst`` with a copy of ``src`` the way renewal tools do (a rename)."""
    tmp = dst.with_name(dst.name + ".new")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


def mqtt_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "evoxtral_stream.server.mqtt" and r.levelno == level]


async def test_a_renewed_client_certificate_is_used_at_the_next_reconnect(
    broker: TlsBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="evoxtral_stream.server.mqtt")
    # The broker wants a client certificate from pki.ca; this one is from another CA.
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    renew(cert, pki.impostor[0])
    renew(key, pki.impostor[1])
    audio = to_int16(np.concatenate([noise(0.5), buzz(2.0), noise(1.2, seed=1), buzz(1.5),
                                     noise(1.2, seed=2)]))
    emitted: list[EngineEvent] = []
    cfg = load_config(overrides={"server.port": 0, **tls_overrides(
        broker.ports["mtls"], "r", pki, timeout_s=1.0, cert_file=str(cert),
        key_file=str(key))}, env={})
    async with tls_subscriber(broker.port, pki, "r/#") as sub, MqttPublisher(cfg.mqtt) as pub:
        async with Engine(cfg, ScriptedBackend(words_so_far)) as engine:
            engine.add_listener(emitted.append)
            engine.add_listener(pub)
            stream = engine.open_stream("talk", source="test")
            await feed_samples(stream, audio, 1600, realtime=False)
        finals = [e for e in emitted if isinstance(e, CaptionEvent) and e.final]
        assert len(finals) == 2
        await eventually(lambda: pub.stats().connect_failures >= 2, "refusals", within=15)
        assert pub.stats().connects == 0

        # Half renewed: the certificate from pki.ca has landed, its key not yet.
        # The pair does not load: one error, and the old context is used.
        renew(cert, pki.client[0])
        failures = pub.stats().connect_failures
        await eventually(lambda: any("cannot be used" in m
                                     for m in mqtt_log(caplog, logging.ERROR)),
                         "the bad renewal reported", within=15)
        await eventually(lambda: pub.stats().connect_failures >= failures + 3,
                         "more attempts with the old certificate", within=15)
        bad = [m for m in mqtt_log(caplog, logging.ERROR) if "cannot be used" in m]
        assert len(bad) == 1, bad
        assert "KEY_VALUES_MISMATCH" in bad[0] and str(cert) in bad[0] and str(key) in bad[0]
        assert pub.stats().connects == 0

        renew(key, pki.client[1])
        got = await sub.until(lambda got: any(topic(m) == "r/talk/status"
                                              and body(m)["type"] == "stream.ended"
                                              for m in got),
                              "the events queued while refused", within=15)
        # The subscriber may see the last one before its acknowledgement is counted.
        await eventually(lambda: pub.stats().published == 4, "the last PUBACK", within=5)
        st = pub.stats()
        assert (st.connects, st.published, st.queued, st.unpublished) == (1, 4, 0, 0)
    assert [payload(m) for m in got if topic(m) == "r/talk/final"] == [
        encode_event(e).encode() for e in finals]
    assert mqtt_log(caplog, logging.INFO).count(
        f"MQTT TLS files reloaded ({pki.ca}, {cert}, {key}); used from this connection on") == 1


async def test_a_rotated_ca_file_is_used_at_the_next_reconnect(
    broker: TlsBroker, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="evoxtral_stream.server.mqtt")
    ca = tmp_path / "ca.pem"
    renew(ca, pki.other_ca)  # the broker's certificate is not signed by this one
    pub = tls_publisher(broker.port, "a", pki, ca_file=str(ca))
    async with tls_subscriber(broker.port, pki, "a/#") as sub, pub:
        pub(caption("s", 0, 1, True, "after the CA rotated"))
        await eventually(lambda: pub.stats().connect_failures >= 2, "untrusted", within=15)
        renew(ca, pki.ca)
        await sub.until(lambda got: any(topic(m) == "a/s/final" for m in got),
                        "the final, trusted now", within=15)
        assert pub.stats().connects == 1
    infos = mqtt_log(caplog, logging.INFO)
    assert f"MQTT TLS files reloaded ({ca}); used from this connection on" in infos


async def test_unchanged_or_unusable_tls_files_keep_the_context(pki: Pki, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    caplog.set_level(logging.INFO, logger="evoxtral_stream.server.mqtt")
    ca = tmp_path / "ca.pem"
    renew(ca, pki.ca)
    pub = tls_publisher(free_port(), "k", pki, ca_file=str(ca))
    first = pub._tls
    pub._refresh_tls()
    assert pub._tls is first, "nothing changed: nothing rebuilt"
    ca.write_text("-----BEGIN CERTIFICATE-----\ncut short")
    for _ in range(3):
        pub._refresh_tls()
        assert pub._tls is first
    errors = mqtt_log(caplog, logging.ERROR)
    assert len(errors) == 1 and f"mqtt.ca_file {str(ca)!r}" in errors[0], errors
    ca.unlink()
    pub._refresh_tls()
    assert pub._tls is first and len(mqtt_log(caplog, logging.ERROR)) == 2, "a new bad state"
    renew(ca, pki.ca)
    pub._refresh_tls()
    assert pub._tls is not first and pub._tls is not None
    assert len(mqtt_log(caplog, logging.INFO)) == 1


# --- configuration errors ---------------------------------------------------------------


def _files(pki: Pki) -> dict[str, str]:
    folder = pki.folder
    (folder / "garbage.pem").write_text("not a certificate\n")
    # A CA bundle, and a client certificate's chain, caught half written.
    ca = pki.ca.read_bytes()
    (folder / "ca_cut.pem").write_bytes(ca + ca[:len(ca) - 100])
    (folder / "chain_cut.pem").write_bytes(pki.client[0].read_bytes() + ca[:len(ca) - 100])
    return {"ca": str(pki.ca), "cert": str(pki.client[0]), "key": str(pki.client[1]),
            "ca_cut": str(folder / "ca_cut.pem"), "chain_cut": str(folder / "chain_cut.pem"),
            "other_key": str(pki.server[1]), "garbage": str(folder / "garbage.pem"),
            "missing": str(folder / "none.pem"), "folder": str(folder),
            "encrypted": str(pki.encrypted_key)}


@pytest.mark.parametrize(("over", "message"), [
    ({"cert_file": "cert"}, "mqtt.cert_file and mqtt.key_file must be set together"),
    ({"key_file": "key"}, "mqtt.cert_file and mqtt.key_file must be set together"),
    ({"tls": False, "ca_file": "ca"}, "mqtt.ca_file, mqtt.cert_file and mqtt.key_file need "
                                      "mqtt.tls = true"),
    ({"tls": False, "cert_file": "cert", "key_file": "key"}, "need mqtt.tls = true"),
    ({"ca_file": "missing"}, "mqtt.ca_file '{missing}' is not a file"),
    ({"ca_file": "folder"}, "mqtt.ca_file '{folder}' is not a file"),
    ({"cert_file": "cert", "key_file": "missing"}, "mqtt.key_file '{missing}' is not a file"),
    ({"ca_file": "garbage"}, "mqtt.ca_file '{garbage}' holds no PEM CA certificate"),
    ({"ca_file": "key"}, "mqtt.ca_file '{key}' holds no PEM CA certificate"),
    ({"ca_file": "ca_cut"}, "mqtt.ca_file '{ca_cut}' cannot be loaded (mqtt.ca_file holds a "
                            "PEM certificate cut off before its END line)"),
    ({"cert_file": "chain_cut", "key_file": "key"},
     "are not a PEM certificate and its private key (mqtt.cert_file holds a PEM certificate "
     "cut off before its END line)"),
    ({"cert_file": "garbage", "key_file": "key"},
     "mqtt.cert_file '{garbage}' and mqtt.key_file '{key}' are not a PEM certificate and its "
     "private key"),
    ({"cert_file": "key", "key_file": "cert"}, "are not a PEM certificate and its private key"),
    ({"cert_file": "cert", "key_file": "other_key"},
     "are not a PEM certificate and its private key (the private key is not the "
     "certificate's: KEY_VALUES_MISMATCH)"),
    ({"cert_file": "cert", "key_file": "encrypted"},
     "mqtt.key_file '{encrypted}' is encrypted; give an unencrypted key"),
])
def test_bad_tls_settings_are_one_line_config_errors(pki: Pki, over: dict[str, object],
                                                     message: str) -> None:
    files = _files(pki)
    values = {f"mqtt.{k}": files.get(v, v) if isinstance(v, str) else v
              for k, v in over.items()}
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"mqtt.enabled": True, "mqtt.tls": True, **values}, env={})
    text = str(err.value)
    assert message.format(**files) in text
    assert "\n" not in text


def test_tls_files_are_read_only_when_the_publisher_is_used(pki: Pki) -> None:
    missing = {"mqtt.tls": True, "mqtt.ca_file": str(pki.folder / "none.pem")}
    cfg = load_config(overrides=missing, env={}).mqtt  # mqtt.enabled is false: not read
    with pytest.raises(ConfigError, match=r"^mqtt\.ca_file '.*none\.pem' is not a file$"):
        MqttPublisher(cfg)
    ok = load_config(overrides={"mqtt.enabled": True, "mqtt.tls": True}, env={}).mqtt
    assert MqttPublisher(ok)._tls is not None, "no ca_file: the system store"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_tls_file_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    locked = tmp_path / "ca.pem"
    locked.write_bytes(pki.ca.read_bytes())
    locked.chmod(0)
    with pytest.raises(ConfigError, match=r"^mqtt\.ca_file '.*' cannot be read: "):
        load_config(overrides={"mqtt.enabled": True, "mqtt.tls": True,
                               "mqtt.ca_file": str(locked)}, env={})


def test_serve_stops_before_serving_on_a_bad_tls_file(pki: Pki) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "evoxtral_stream", "serve", "--source", "none",
         "--port", str(port), "--set", "mqtt.enabled=true", "--set", "mqtt.tls=true",
         "--set", f"mqtt.ca_file={pki.folder / 'none.pem'}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evoxtral-stream: error:")]
    assert len(lines) == 1, proc.stderr
    assert "mqtt.ca_file" in lines[0] and "is not a file" in lines[0]
    assert "Traceback" not in proc.stderr
    assert "serving" not in proc.stderr.lower(), proc.stderr


def test_a_strict_verification_failure_says_what_to_reissue() -> None:
    # What Python 3.13's VERIFY_X509_STRICT reports for a CA made without key
    # usage (as tests/helpers/pki.py explains); older Pythons never raise it.
    err = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: CA cert does not "
           "include key usage extension (_ssl.c:1020)")
    cfg = load_config(overrides=mqtt_overrides(8883, "t", tls=True), env={}).mqtt
    assert "keyUsage keyCertSign" in _tls_hint(cfg, err)
    plain = ssl.SSLCertVerificationError(1, "certificate verify failed: unable to get local "
                                            "issuer certificate")
    assert "must be signed by a CA in the system CA store" in _tls_hint(cfg, plain)
