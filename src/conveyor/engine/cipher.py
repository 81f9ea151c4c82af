"""The server's key and what it seals: project secrets, encrypted at rest (SPEC §11).

AES-256-GCM (the `cryptography` package): each value is sealed with a fresh random 96-bit nonce
and bound to its project and name as associated data, so a sealed value copied into another row
(another project's, another name) does not open. Stored form: a version byte, the nonce, then
the ciphertext with its tag.

The key is 32 random bytes in URL-safe base64 (`CONVEYOR_SECRET_KEY`, or the file the server
generates in its data directory on first start, app.py). A value sealed under another key does
not open: `open` answers None, and the step naming it fails SECRET_UNREADABLE.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conveyor.domain.secrets import KEY_BYTES, key_bytes

_NONCE_BYTES = 12
_VERSION = b"\x01"


def new_key_text() -> str:
    """A fresh key as settings and the key file spell it."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


class Cipher:
    """Seals and opens secret values under one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the secret key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_text(cls, text: str) -> Cipher:
        """The cipher of a key in URL-safe base64; ValueError (never quoting it) otherwise."""
        return cls(key_bytes(text))

    @classmethod
    def ephemeral(cls) -> Cipher:
        """A cipher under a key that lives as long as this object: for an engine built without
        settings' key (tests); a served engine always has one (app.py)."""
        return cls(os.urandom(KEY_BYTES))

    def seal(self, project: str, name: str, value: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, value.encode(), _bound(project, name))

    def open(self, project: str, name: str, sealed: bytes) -> str | None:
        """The value, or None when it was not sealed under this key for this project and name."""
        if len(sealed) <= 1 + _NONCE_BYTES or sealed[:1] != _VERSION:
            return None
        nonce, body = sealed[1:1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, _bound(project, name)).decode()
        except (InvalidTag, UnicodeDecodeError):
            return None


def _bound(project: str, name: str) -> bytes:
    # NUL cannot occur in either (both are checked identifiers), so the pair is unambiguous.
    return f"{project}\x00{name}".encode()
