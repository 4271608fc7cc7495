"""Keeping secrets out of what people and other systems see.

- `without_credentials(uri)`: a URI without its `user:password@` part (events are public, logs are
  read by many; credentials are neither).
- `redact(text)`: every `scheme://user:password@` in a text without its credentials, and every secret
  value the configuration holds (passwords, tokens, SASL and TLS key passwords, basic-auth user info)
  replaced by `***`. The command's log formatter and its error lines pass everything through it, so
  a secret that reaches a message by any path (a library's error text, a traceback) is not shown.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"]+)@")
# Configuration keys whose values are secrets, wherever they appear (librdkafka's, the registry
# client's, the connector's own).
SECRET_KEYS = ("password", "secret", "token", "basic.auth.user.info", "sasl.jaas.config", "ssl.key.pem",
               "sasl.oauthbearer.client.secret", "ssl.keystore.password", "ssl.key.password")
_SHORTEST_SECRET = 4  # shorter values would mask ordinary words

_secrets: set[str] = set()
_lock = threading.Lock()


def without_credentials(uri: str) -> str:
    """The URI without a `user:password@` part. A value that is not a URI with credentials comes back as it is."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_secret_key(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in SECRET_KEYS)


def remember_secrets(values: Iterable[str | None]) -> None:
    """Values that `redact` masks from now on, in this process."""
    with _lock:
        for value in values:
            if value and len(value) >= _SHORTEST_SECRET:
                _secrets.add(value)
                if ":" in value:  # user:password (basic.auth.user.info): the password alone too
                    password = value.split(":", 1)[1]
                    if len(password) >= _SHORTEST_SECRET:
                        _secrets.add(password)


def secret_values(data: Any) -> list[str]:
    """The values under secret keys in a nested configuration (dicts, lists, pydantic SecretStr)."""
    found: list[str] = []

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
        elif value is not None and is_secret_key(key):
            found.append(value.get_secret_value() if hasattr(value, "get_secret_value") else str(value))
        elif isinstance(value, str) and _URI_CREDENTIALS.search(value):
            userinfo = _URI_CREDENTIALS.search(value).group("userinfo")  # type: ignore[union-attr]
            found.append(userinfo)

    walk(data)
    return found


def redact(text: str) -> str:
    text = _URI_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, traceback and all) passes through `redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
