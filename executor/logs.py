"""Logs on stderr: human-readable lines by default, JSON lines with LOG_FORMAT=json.

A tiny logger of our own rather than `logging`: it costs nothing at start-up, and the executor's
lines must never be swallowed by a user's logging configuration.
"""
from __future__ import annotations

import os
import sys
import time

_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_redactions: list[str] = []
_context: dict = {}  # fields added to every line (the warm server binds the invocation id)


def _threshold() -> int:
    return _LEVELS.get(os.environ.get("EXECUTOR_LOG_LEVEL", "INFO").upper(), 20)


def add_redaction(secret: str) -> None:
    """Never print this value again (secrets)."""
    if secret and secret not in _redactions:
        _redactions.append(secret)


def remove_redaction(secret: str) -> None:
    if secret in _redactions:
        _redactions.remove(secret)


def has_redactions() -> bool:
    return bool(_redactions)


def redact(text: str) -> str:
    for secret in _redactions:
        text = text.replace(secret, "[redacted]")
    return text


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def emit(level: str, message: str, **fields: object) -> None:
    if _LEVELS[level] < _threshold():
        return
    if _context:
        fields = {**_context, **fields}
    if os.environ.get("LOG_FORMAT", "").lower() == "json":
        import json

        record = {"ts": _timestamp(), "level": level.lower(), "logger": "executor", "msg": message, **fields}
        line = json.dumps(record, default=str)
    else:
        extras = " ".join(f"{k}={_human(v)}" for k, v in fields.items())
        line = f"{_timestamp()} {level:<7} executor: {message}" + (f" {extras}" if extras else "")
    try:
        sys.stderr.write(redact(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed: nothing better to do


def _human(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def debug(message: str, **fields: object) -> None:
    emit("DEBUG", message, **fields)


def info(message: str, **fields: object) -> None:
    emit("INFO", message, **fields)


def warning(message: str, **fields: object) -> None:
    emit("WARNING", message, **fields)


def error(message: str, **fields: object) -> None:
    emit("ERROR", message, **fields)
