"""The control protocol (DESIGN §5), shared by the master's server and supervisorctl.

A client sends one line `{"cmd": COMMAND, ...}` and reads events, one JSON object per line,
until `{"done": true, "ok": ..., "code": ...}` and EOF. `code` is supervisorctl's exit code.
"""

from __future__ import annotations

import json

from ..exitcodes import CTL_DENIED as DENIED
from ..exitcodes import CTL_FAILED as FAILED
from ..exitcodes import CTL_OK as OK
from ..exitcodes import CTL_UNREACHABLE as UNREACHABLE
from ..exitcodes import CTL_USAGE as USAGE

__all__ = ["OK", "FAILED", "USAGE", "UNREACHABLE", "DENIED", "COMMANDS", "READ_ONLY", "MAX_REQUEST",
           "BadRequest", "BadAnswer", "encode", "parse_request", "parse_event", "done"]

COMMANDS = ("status", "metrics", "upgrade", "rollback", "restart", "scale", "stop")
READ_ONLY = frozenset({"status", "metrics"})
MAX_REQUEST = 64 * 1024


class BadRequest(ValueError):
    pass


class BadAnswer(ValueError):
    pass


def encode(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def done(code: int, text: str = "", **extra) -> dict:
    return {"done": True, "ok": code == OK, "code": code, "text": text, **extra}


def parse_request(line: bytes) -> dict:
    """The request object, or BadRequest saying what is wrong with it."""
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise BadRequest(f"malformed request: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise BadRequest("malformed request: expected an object with a string \"cmd\"")
    if request["cmd"] not in COMMANDS:
        raise BadRequest(f"unknown command {request['cmd']!r}; commands: {', '.join(sorted(COMMANDS))}")
    return request


def parse_event(line: bytes) -> dict:
    """One event from the master, or BadAnswer saying why it is none."""
    try:
        event = json.loads(line)
    except ValueError as exc:
        raise BadAnswer(f"not JSON ({exc}): {line[:80]!r}") from None
    if not isinstance(event, dict):
        raise BadAnswer(f"not a JSON object: {line[:80]!r}")
    if event.get("done") and (not isinstance(event.get("code"), int) or isinstance(event["code"], bool)):
        raise BadAnswer(f"a final event without an integer code: {line[:80]!r}")
    return event
