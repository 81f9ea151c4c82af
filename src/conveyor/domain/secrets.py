"""Project secrets (SPEC §11): what a secret's name and value may be, whether a step has every
secret it names, and redaction of their values from whatever the step gives back.

Pure: encrypting, storing and loading values belong to the engine (engine/secrets.py,
engine/cipher.py). Templates name a secret only as `secrets.NAME`, and only in the config of
`http` and `task` steps (domain/expressions.py refuses any other use), so the secrets a step
needs are known from its definition (`StepSpec.secrets`): only those are loaded for an attempt,
handed to its executor, and redacted from what comes back.

Redaction replaces every occurrence of a value in every string (and JSON key) of a step's
input, output and error by MASK before anything is stored, also in the spellings a value takes
in transit: JSON-escaped (a body quoting it), escaped as an error message quotes it, and
percent-encoded (a URL). Other derived forms (a value in base64 inside a Basic header, a hash, a
part of a value) are not recognised (README).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, quote_plus

from conveyor.domain.errors import FieldViolation, invalid
from conveyor.domain.limits import Limits

MASK = "***"
# A name is what `secrets.NAME` can select in CEL: an identifier, not one of CEL's reserved words.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_RESERVED = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
    "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
})
# The server's key (CONVEYOR_SECRET_KEY): this many random bytes, in URL-safe base64.
KEY_BYTES = 32
# Why an attempt fails before it starts (not retried: the next attempt would find the same).
SECRET_NOT_FOUND = "SECRET_NOT_FOUND"
SECRET_UNREADABLE = "SECRET_UNREADABLE"


def key_bytes(text: str) -> bytes:
    """The server's key spelled `text`; ValueError (never quoting it) unless it is KEY_BYTES
    bytes in URL-safe base64."""
    stripped = text.strip()
    try:
        key = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"CONVEYOR_SECRET_KEY must be {KEY_BYTES} random bytes in URL-safe base64, as "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))' prints")
    return key


@dataclass(frozen=True)
class Secret:
    """A secret as it is listed: never its value."""

    project_id: str
    name: str
    created_at: datetime
    updated_at: datetime


def check_name(name: str) -> str:
    """`name` if it may name a secret; INVALID_ARGUMENT INVALID_SECRET_NAME otherwise."""
    if not _NAME.fullmatch(name) or name in _RESERVED:
        rule = "a letter or '_', then up to 63 letters, digits or '_' (not a CEL reserved word)"
        raise invalid(f"a secret's name must be {rule}", [FieldViolation("name", f"must be {rule}")],
                      reason="INVALID_SECRET_NAME")
    return name


def check_value(value: str, limits: Limits) -> str:
    """`value` if it may be stored; INVALID_ARGUMENT INVALID_SECRET_VALUE otherwise. The error
    never quotes the value."""
    problem = ""
    if not value:
        problem = "must not be empty"
    elif "\x00" in value:
        problem = "must not contain NUL characters"
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            problem = "must be valid Unicode (no lone surrogates)"
        else:
            if size > limits.max_secret_bytes:
                problem = f"is {size} bytes; at most {limits.max_secret_bytes} are allowed"
    if problem:
        raise invalid(f"a secret's value {problem}", [FieldViolation("value", problem)],
                      reason="INVALID_SECRET_VALUE")
    return value


def missing(names: Iterable[str], found: Mapping[str, str | None], project: str) -> tuple[str, str] | None:
    """(reason, message) when a step cannot have every secret it names: one not set in its
    project, or one this server's key cannot decrypt (None in `found`); None when it can."""
    for name in sorted(names):
        if name not in found:
            return SECRET_NOT_FOUND, f"{SECRET_NOT_FOUND}: secret {name!r} is not set in project {project!r}"
        if found[name] is None:
            return SECRET_UNREADABLE, (f"{SECRET_UNREADABLE}: secret {name!r} cannot be decrypted with this "
                                       f"server's key (CONVEYOR_SECRET_KEY); set it again")
    return None


def _spellings(value: str) -> set[str]:
    """The value as it may appear in text the step gives back: as is, JSON-escaped, quoted by an
    error message (Python's repr), percent-encoded."""
    return {value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1], repr(value)[1:-1],
            quote(value, safe=""), quote_plus(value, safe="")} - {""}


class Redactor:
    """Replaces given secret values by MASK in text and in JSON documents."""

    def __init__(self, values: Iterable[str]) -> None:
        spellings = set().union(*(_spellings(v) for v in values if v))
        # Longest first: a value that contains another is masked whole.
        self._pattern = (re.compile("|".join(map(re.escape, sorted(spellings, key=len, reverse=True))))
                         if spellings else None)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def __call__(self, value: Any) -> Any:
        """`value` (a JSON-like document) with every string and key redacted."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(v) for v in value]
        return value


def redactor(names: Iterable[str], found: Mapping[str, str | None]) -> Redactor:
    """The redactor of the values of `names` that `found` holds."""
    return Redactor(v for n in names if (v := found.get(n)))
