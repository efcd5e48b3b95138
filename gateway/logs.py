"""Structured logs: one JSON object per line, {"event": name, **fields}, for every part of prapa.

The gateway's modules log through `log_event` (Python logging, one logger per module, so
journald and the tests see one record per event); the CLI's printers (prapa site, the
virtual board) write `json_line(...)` to their stream.

Logs never carry keys or secrets: callers pass none (a device key, a broker password,
a TLS private key). As a last guard, a field named key, password, secret, token or psk,
or ending in _key, _password, _secret or _token, is written as "***" whatever its value.
"""

import json
import time

MASK = "***"
SECRET_NAMES = frozenset({"key", "password", "secret", "token", "psk"})
_SECRET_SUFFIXES = tuple("_" + name for name in SECRET_NAMES)

__all__ = ["MASK", "json_line", "log_event"]


def _secret(name):
    name = name.lower()
    return name in SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def json_line(event, *, stamp=False, **fields):
    """The event as one line of JSON (no newline): {"event": event, **fields}, secrets masked.

    stamp: lead with "ts", the Unix time in seconds to the millisecond (for printers: a logging
    handler adds its own time). Values JSON cannot hold are written as their str()."""
    record = {"ts": round(time.time(), 3)} if stamp else {}
    record["event"] = event
    record.update((name, MASK if _secret(name) else value) for name, value in fields.items())
    return json.dumps(record, default=str)


def log_event(logger, level, event, exc_info=False, **fields):
    """Log one event on `logger` at `level` as one JSON object (see json_line).

    A module binds its own: `_log = functools.partial(log_event, logging.getLogger(__name__))`."""
    if logger.isEnabledFor(level):     # the record names the caller's file and line, not this one
        logger.log(level, json_line(event, **fields), exc_info=exc_info or None, stacklevel=2)
