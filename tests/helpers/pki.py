"""What the tests' throwaway certificate authorities need to be valid everywhere."""

from __future__ import annotations

__all__ = ["CA_KEY_USAGE"]

#: ``openssl req -x509 -addext`` value for a test CA. Python 3.13 verifies with
#: ``VERIFY_X509_STRICT``, which refuses a CA certificate without key usage
#: (and a leaf without an authority key identifier: give leaves one too).
CA_KEY_USAGE = "keyUsage=critical,keyCertSign,cRLSign"
