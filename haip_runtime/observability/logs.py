"""Logging set-up from ``[observability]``: console lines for people or one JSON object per line.

Every line passes ``Redactor`` (bearer tokens, JWTs, ``?token=`` and the config's own secrets
never reach a log), and ``LogBudget`` keeps a noisy logger (an MCP server printing garbage on
stdout) to a bounded number of one-line records per minute.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable

from haip_runtime.config.models import ObservabilityConfig
from haip_runtime.observability import tracing

REDACTED = "<redacted>"
_PATTERNS = (
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\",;]+"), r"\g<1>" + REDACTED),
    (re.compile(r"(?i)([?&](?:access_)?token=)[^&\s'\"]+"), r"\g<1>" + REDACTED),
)


class Redactor(logging.Filter):
    """Rewrites each record's message with tokens and the given secret values replaced by ``<redacted>``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # Short values would redact ordinary words; config secrets of 8+ characters are specific enough.
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class LogBudget(logging.Filter):
    """At most ``limit`` records per ``window`` seconds from one logger, each without its traceback.

    The first record after a window that dropped some says how many were dropped.
    """

    def __init__(self, limit: int = 5, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.limit, self.window, self._clock = limit, window, clock
        self._started = -window
        self._count = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = self._clock()
            if now - self._started >= self.window:
                self._started, self._count = now, 0
            self._count += 1
            if self._count > self.limit:
                self._dropped += 1
                return False
            dropped, self._dropped = self._dropped, 0
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{record.getMessage()}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            record.msg, record.args = message[:300], None
        record.exc_info, record.exc_text = None, None
        if dropped:
            record.msg, record.args = f"{record.getMessage()} ({dropped} similar lines dropped)", None
        return True


def limit_logger(name: str, limit: int = 5, window: float = 60.0) -> None:
    """Put a ``LogBudget`` on logger ``name`` (once; later calls keep the first)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, LogBudget) for f in logger.filters):
        logger.addFilter(LogBudget(limit, window))


class TraceIds(logging.Filter):
    """Puts the current span's ``trace_id`` and ``span_id`` on each record ("-" outside a span)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = tracing.current_ids()
        record.trace_id, record.span_id = ids if ids is not None else ("-", "-")
        return True


#: Control characters written escaped in a text log line (a line break in a client's text would let it
#: write a line of its own making into the log; a terminal escape, rewrite what the operator sees).
_ESCAPED = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters escaped (a traceback still follows it)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPED)
        return super().formatMessage(record)


class ClientFaults(logging.Filter):
    """uvicorn logs a client's text frame that is not UTF-8 as an ERROR with its traceback (it closes the
    connection 1007, as RFC 6455 asks, and the session stays resumable): the client's fault, not the
    server's, so an operator alerting on ERROR is not woken by it. Made an INFO line (a prober's find)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.msg == "Invalid UTF-8 sequence received from client.":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "a client sent a text frame that is not UTF-8: its connection was closed 1007"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            **({"worker": self.worker} if self.worker else {}),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", "-")
        if trace_id != "-":
            body["trace_id"], body["span_id"] = trace_id, getattr(record, "span_id", "-")
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure_logging(config: ObservabilityConfig, secrets: Iterable[str] = (), worker: str | None = None) -> None:
    """Every record to stderr, redacted; ``worker`` (``serve --workers``: ``w1``, ``w2``...) tags each line
    of one worker process, whose stderr it shares with the others and the supervisor."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redactor(secrets))
    traced = config.tracing != "off"
    if traced:
        handler.addFilter(TraceIds())
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        ids = " [trace=%(trace_id)s span=%(span_id)s]" if traced else ""
        tag = f"[{worker}] " if worker else ""
        line = f"%(asctime)s %(levelname)-7s {tag}%(name)s{ids}: %(message)s"
        handler.setFormatter(TextFormatter(line, "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = getattr(logging, config.log_level.upper())
    for name in ("haip_runtime", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    # (the root's WARNING would drop its lines anyway: set, so that a second configure can turn it off)
    logging.getLogger("uvicorn.access").setLevel(level if config.access_log else logging.WARNING)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(each, ClientFaults) for each in uvicorn_errors.filters):
        uvicorn_errors.addFilter(ClientFaults())
