"""Names that break naive quoting, escaping, URL encoding or URN building: one list for the pure tests
(`tests/unit/test_hostile_names.py`) and the end-to-end test on a real MLflow server
(`tests/integration/test_hostile_names_end_to_end.py`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Names MLflow accepts for registered models (no `/` or `:`), experiments and dataset inputs.
HOSTILE = [
    "O'Brien", 'say "hi"', "both ' and \"", "back\\slash", "trail\\", "\\", "\\'", "'\\", "dq\"\\", "a\\nb",
    "end\\\\", "\\x41", "\\N{BULLET}", "\\u0041", "line\nbreak", "cr\rlf", "tab\tx", "nul\x00x", "\x0bvt",
    "\u2028sep", "a,b(c)", "(", ")", ",", "x␟y", "semi;colon", "50% off_", "100%", "_", "ünï 模型", "emoji 🚀",
    "''", '""', "' OR '1'='1", "name IN ('x')", ") OR (", "--comment", "/* c */", "a%2Cb", "urn:li:corpuser:x",
    " padded ", "x" * 250, "🚀" * 250, "é" * 600,
]

# Those the end-to-end test creates on a real server as experiment, run, dataset and model names: one of
# each hazard (quotes of both kinds, backslashes also trailing, URN-reserved characters, SQL's LIKE
# characters, unicode, MLflow's longest name), so that the run stays short.
END_TO_END = [
    "O'Brien", 'say "hi"', "both ' and \"", "back\\slash", "trail\\", "\\'", "dq\"\\", "a\\nb",
    "a,b(c)", "semi;colon", "50% off_", "ünï 模型", "emoji 🚀", "x" * 250,
]
assert set(END_TO_END) <= set(HOSTILE), set(END_TO_END) - set(HOSTILE)


def urns_in(value: Any) -> Iterator[str]:
    """Every URN anywhere in a JSON-like value (an aspect as a dict, a change event's state)."""
    if isinstance(value, str):
        if value.startswith("urn:li:"):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from urns_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from urns_in(v)
