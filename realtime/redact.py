"""Credentials never reach a log line.

Tokens, sessions and ingest keys travel in query strings (``?token=``,
``?session=``, ``?key=``) and headers (``Authorization: Bearer``,
``X-Ingest-Key``, the session cookie).  The access log is written by us, but
Tornado's own warnings and tracebacks print the full request URI, and so may
any exception message.  :class:`RedactingFilter` rewrites every record that
passes through it, message and traceback alike; :func:`install` puts it on
every logger and handler the server writes through.
"""

from __future__ import annotations

import logging
import re
import urllib.parse

# Query parameters whose values are credentials.
SENSITIVE_PARAMS = ("token", "session", "key", "ingest_key", "access_token")

_PARAM_RE = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(%s)(=|%%3D)([^&\s'\"<>#;,)\]]+)" % "|".join(SENSITIVE_PARAMS)
)
_HEADER_RE = re.compile(
    r"(?i)((?:authorization|x-ingest-key)['\"]?\s*[:=,]\s*['\"]?(?:bearer\s+)?)(?!bearer\b)([^\s'\",;()<>]+)"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)([A-Za-z0-9._~+/=-]{8,})")
_COOKIE_RE = re.compile(r"(?i)(rt_session=)([^\s;'\",]+)")


def redact_uri(uri: str) -> str:
    """A request URI with credentials in the query string replaced by ``***``."""
    path, sep, query = uri.partition("?")
    if not sep:
        return uri
    parts = urllib.parse.parse_qsl(query, keep_blank_values=True)
    safe = [(k, "***" if k.lower() in SENSITIVE_PARAMS else v) for k, v in parts]
    return path + "?" + urllib.parse.urlencode(safe, safe="*")


def redact_text(text: str) -> str:
    """Any text (a log message, a traceback) with credential values replaced by ``***``."""
    if not text:
        return text
    text = _PARAM_RE.sub(r"\1\2***", text)
    text = _HEADER_RE.sub(r"\1***", text)
    text = _BEARER_RE.sub(r"\1***", text)
    return _COOKIE_RE.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback text; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        record._redacted = True  # type: ignore[attr-defined]
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactingFilter()
_PREFIXES = ("tornado", "realtime", "asyncio", "handlers")


def install() -> None:
    """Put the filter on the loggers the server and Tornado write through (a
    logger's filters see the records created on it) and on the root logger's
    handlers (which see everything that propagates).  Idempotent."""
    loggers: list[logging.Logger] = [logging.getLogger(n) for n in
                                     ("tornado.access", "tornado.application", "tornado.general", "asyncio")]
    for name, obj in list(logging.root.manager.loggerDict.items()):
        if isinstance(obj, logging.Logger) and name.startswith(_PREFIXES):
            loggers.append(obj)
    for logger in loggers:
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in logging.root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
