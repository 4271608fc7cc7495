"""How the command's log lines look: text for people (the default), or one JSON object per line for
log pipelines (`--log-format json`). Both pass through `connector.redaction.redact`."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from connector.redaction import RedactingFormatter, redact

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"[, "error"]}: one object per line, secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            line["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else RedactingFormatter(TEXT_FORMAT)
