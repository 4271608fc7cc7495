"""Expected errors: conditions an operator can act on, reported as one line without a traceback.

Every such error derives from `OperatorError`; the command prints its message and exits 1. Anything
else is a bug and keeps its traceback."""

from __future__ import annotations


class OperatorError(Exception):
    """An expected condition that stops a command: the message says what and, where it can, which field."""


class ConfigError(OperatorError):
    """A configuration that cannot start the connector; the message names the field."""


class CommandFailed(OperatorError):
    """A command could not do its job for a reason outside the connector (an unreachable system, a refusal)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error in one line for a log or a header: its message's first line (its type when it has none)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
