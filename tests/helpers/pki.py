"""What the tests' throwaway certificate authorities need to be valid everywhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["CA_KEY_USAGE", "self_signed"]

#: ``openssl req -x509 -addext`` value for a test CA. Python 3.13 verifies with
#: ``VERIFY_X509_STRICT``, which refuses a CA certificate without key usage
#: (and a leaf without an authority key identifier: give leaves one too).
CA_KEY_USAGE = "keyUsage=critical,keyCertSign,cRLSign"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made in ``folder``: (cert, key)
    PEM paths; beside them, ``encrypted.key`` is the key under a passphrase.
    Skips the test where openssl is not installed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    subprocess.run([openssl, "pkey", "-in", str(key), "-aes256", "-passout", "pass:secret",
                    "-out", str(folder / "encrypted.key")],
                   check=True, capture_output=True, timeout=60)
    return cert, key
