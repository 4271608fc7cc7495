"""Keeping secrets out of what people and other systems see: URIs without their credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def without_credentials(uri: str) -> str:
    """The URI without a `user:password@` part (events are public, logs are read by many; credentials
    are neither). A value that is not a URI with credentials comes back as it is."""
    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
