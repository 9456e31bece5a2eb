"""How each value of `cadenza.toml` is checked: one validator per kind of value, each reporting
problems as "SOURCE: KEY: MESSAGE" with what was expected and what was got, so that every
problem of a config can be reported at once (config.py holds the sections and the schema)."""

from __future__ import annotations

import ipaddress
import json
import keyword
import os
import re
import socket
from .records import record
from typing import Any, Callable
from pathlib import Path

from cadenza.listeners import Address, parse_address

MAX_WORKERS = 1024
MAX_TIMEOUT = 86400.0
MAX_UPTIME = 3600.0
# sun_path is 108 bytes including the terminating NUL (unix(7)); a longer path cannot be bound.
MAX_SOCKET_PATH = 107
MAX_CONCURRENCY = 1_000_000
MAX_WSGI_THREADS = 1024
MAX_REQUESTS = 1_000_000_000
MAX_MEMORY_MB = 1_048_576
# Set by cadenza for each worker (process.spawn, pool._spawn): [workers.env] may not replace them.
RESERVED_ENV = ("CADENZA_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_")


class ConfigError(Exception):
    """Every problem found in one config, one full sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@record(frozen=True)
class Readiness:
    kind: str
    seconds: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Readiness:
        """Parse "notify", "spawn" or "uptime:DURATION"; ValueError says what was expected."""
        if text in ("notify", "spawn"):
            return cls(text)
        if isinstance(text, str) and text.startswith("uptime:"):
            return cls("uptime", _parse_duration(text))
        raise ValueError('expected "notify", "spawn" or "uptime:DURATION" (such as uptime:2s), '
                         f"got {_show(text)}")

    def __str__(self) -> str:
        return f"uptime:{self.seconds:g}s" if self.kind == "uptime" else self.kind


def _parse_duration(text: str) -> float:
    match = re.fullmatch(r"uptime:(\d+(?:\.\d+)?)(ms|s)?", text)
    if not match:
        raise ValueError(f"expected uptime:DURATION such as uptime:2s, uptime:500ms or uptime:1.5s, "
                         f"got {_show(text)}")
    seconds = float(match[1]) / (1000 if match[2] == "ms" else 1)
    if not 0 < seconds <= MAX_UPTIME:
        raise ValueError(f"uptime must be greater than 0 and at most {MAX_UPTIME:g} seconds, "
                         f"got {_show(text)}")
    return seconds


class _Report:
    """Collects problems as "SOURCE: KEY: MESSAGE" so that all of them can be raised together."""

    def __init__(self, source: str | None):
        self.source = source
        self.problems: list[str] = []

    def add(self, key: str, message: str) -> None:
        where = f"{self.source}: {key}" if self.source else key
        self.problems.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _show(value: Any) -> str:
    """A value as the operator wrote it in TOML, so `got "4"` shows the quotes that are the mistake."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word: str, choices: list[str], shape: str = "{}") -> str:
    import difflib   # only for a config with a mistake: a master's start is on every reload's path
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {shape.format(close[0])}?)" if close else ""


# A validator gets the raw TOML value and its dotted key, reports problems, and returns the
# converted value (meaningless when it reported one: the config is then rejected as a whole).
Validator = Callable[[Any, str, _Report], Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _integer(low: int, high: int) -> Validator:
    def check(value: Any, key: str, report: _Report) -> int:
        if not _is_int(value) or not low <= value <= high:
            report.add(key, f"expected an integer from {low} to {high}, got {_show(value)}")
        return value
    return check


def _seconds(value: Any, key: str, report: _Report) -> float:
    # NaN and inf are valid TOML floats; the range test rejects both.
    if not (_is_int(value) or isinstance(value, float)) or not 0 < value <= MAX_TIMEOUT:
        report.add(key, f"expected a number of seconds greater than 0 and at most {MAX_TIMEOUT:g}, "
                        f"got {_show(value)}")
        return 0.0
    return float(value)


def _seconds_or_off(value: Any, key: str, report: _Report) -> float:
    if (_is_int(value) or isinstance(value, float)) and value == 0:
        return 0.0
    return _seconds(value, key, report)


def _absolute_path(value: Any, key: str, report: _Report) -> Path | None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        report.add(key, f"expected an absolute path such as /srv/demo, got {_show(value)}")
        return None
    return Path(value)


def _socket_path(value: Any, key: str, report: _Report) -> Path | None:
    path = _absolute_path(value, key, report)
    if path is not None and len(os.fsencode(value)) > MAX_SOCKET_PATH:
        report.add(key, f"a unix socket path can be at most {MAX_SOCKET_PATH} bytes long (unix(7)), "
                        f"got {len(os.fsencode(value))}; choose a shorter path")
    return path


def _app_name(value: Any, key: str, report: _Report) -> str:
    # The name becomes part of unit names and of /run/cadenza/NAME/, so "." and ".." are out too.
    if (not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", value)
            or value in (".", "..")):
        report.add(key, "expected a name of 1 to 64 letters, digits or _ . @ - "
                        f"(it is used in unit names and paths), got {_show(value)}")
    return value


def _string_list(what: str, allow_empty: bool) -> Validator:
    def check(value: Any, key: str, report: _Report) -> tuple[str, ...]:
        if (not isinstance(value, list) or (not value and not allow_empty)
                or not all(isinstance(item, str) and item for item in value)):
            amount = "a list" if allow_empty else "a non-empty list"
            report.add(key, f"expected {amount} of non-empty strings ({what}), got {_show(value)}")
            return ()
        return tuple(value)
    return check


def _app_spec(value: Any, key: str, report: _Report) -> str:
    """"module:object", or "module" for module:application (the name WSGI servers look for)."""
    module, sep, obj = value.partition(":") if isinstance(value, str) else ("", ":", "")
    if not sep:
        obj = "application"
    parts = module.split(".") + obj.split(".")
    if not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
        report.add(key, 'expected "module:object" such as "demo.wsgi:application" (or "module", '
                        f"meaning module:application), got {_show(value)}")
        return value
    return f"{module}:{obj}"


def _readiness(value: Any, key: str, report: _Report) -> Readiness:
    try:
        return Readiness.parse(value)
    except ValueError as exc:
        report.add(key, str(exc))
        return Readiness("notify")


def _addresses(value: Any, key: str, report: _Report) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        report.add(key, 'expected a non-empty list of addresses such as ["127.0.0.1:8000"], '
                        f"got {_show(value)}")
        return ()
    _check_addresses(value, [f"{key}[{i}]" for i in range(len(value))], report)
    return tuple(value)


def _check_addresses(texts: list[Any], keys: list[str], report: _Report) -> None:
    seen: dict[tuple, str] = {}
    for text, key in zip(texts, keys):
        try:
            address = parse_address(text)
        except ValueError as exc:
            report.add(key, f"{exc}; expected an address such as 127.0.0.1:8000, [::1]:8000 "
                            "or unix:/run/demo/http.sock")
            continue
        if address.path and len(os.fsencode(address.path)) > MAX_SOCKET_PATH:
            report.add(key, f"a unix socket path can be at most {MAX_SOCKET_PATH} bytes long "
                            f"(unix(7)), got {_show(address.path)}")
        same = _address_identity(address)
        if same in seen:
            report.add(key, f"duplicates {seen[same]} (the same socket); list each address once")
        seen.setdefault(same, key)


def _address_identity(address: Address) -> tuple:
    # ":8000" and "0.0.0.0:8000", or "[::1]:80" and "[0::1]:80", would be bound twice and fail.
    if address.path:
        return (address.family, address.path)
    if address.family == socket.AF_UNSPEC:   # a host name: "Localhost." is "localhost"
        return (address.family, address.host.lower().rstrip("."), address.port)
    return (address.family, socket.inet_pton(address.family, address.host), address.port)


def _metrics_address(value: Any, key: str, report: _Report) -> str | None:
    """[metrics] listen: a loopback IP and port, or a unix socket path. The exposition tells the
    service's internals (its releases, its error rates), so it never listens beyond the host."""
    try:
        address = parse_address(value)
    except ValueError as exc:
        report.add(key, f"{exc}; expected a loopback address such as 127.0.0.1:9808 or "
                        "unix:/run/cadenza/demo/metrics.sock")
        return None
    if address.family == socket.AF_UNIX:
        if len(os.fsencode(address.path)) > MAX_SOCKET_PATH:
            report.add(key, f"a unix socket path can be at most {MAX_SOCKET_PATH} bytes long (unix(7))")
            return None
        return value
    if address.family == socket.AF_UNSPEC or not ipaddress.ip_address(address.host).is_loopback:
        report.add(key, f"{value!r} is not a loopback address: the metrics tell the service's "
                        "internals to whoever connects; use 127.0.0.1:PORT, [::1]:PORT or a unix: path, "
                        "and let a local Prometheus agent or a proxy reach it")
        return None
    return value


def _fraction(value: Any, key: str, report: _Report) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        report.add(key, f"expected a fraction from 0 to 1 (0.01 is 1 %), got {_show(value)}")
        return 0.0
    return float(value)


# ---- [http] -------------------------------------------------------------------------------

def _choice(*options: str) -> Validator:
    def check(value: Any, key: str, report: _Report) -> str:
        if not isinstance(value, str) or value not in options:
            hint = _suggest(value, list(options), '"{}"') if isinstance(value, str) else ""
            report.add(key, f"expected one of {', '.join(json.dumps(o) for o in options)}, "
                            f"got {_show(value)}{hint}")
        return value
    return check


def _boolean(value: Any, key: str, report: _Report) -> bool:
    if not isinstance(value, bool):
        report.add(key, f"expected true or false, got {_show(value)}")
    return value


def _tls_file(value: Any, key: str, report: _Report) -> str | None:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        report.add(key, f'expected an absolute path such as "/etc/ssl/private/demo.pem", got {_show(value)}')
        return None
    return value


def _root_path(value: Any, key: str, report: _Report) -> str:
    # What the app is mounted under behind a proxy (ASGI root_path, WSGI SCRIPT_NAME).
    if not isinstance(value, str) or not re.fullmatch(r"(/[^/\s?#]+)*", value):
        report.add(key, 'expected "" or a path such as "/api": starting with "/", without a trailing "/", '
                        f"spaces, ? or #, got {_show(value)}")
    return value


def _forwarded_ips(value: Any, key: str, report: _Report) -> tuple[str, ...]:
    """Peers whose X-Forwarded-For/-Proto are believed: IPs, networks, "*" (any) or "unix"
    (connections on the unix-socket listeners, which only a local proxy can reach)."""
    if not isinstance(value, list):
        report.add(key, 'expected a list of IP addresses or networks such as ["127.0.0.1", "10.0.0.0/8"], '
                        f'or ["*"] for any, or ["unix"] for unix-socket listeners, got {_show(value)}')
        return ()
    for i, item in enumerate(value):
        if item in ("*", "unix"):
            continue
        where = f"{key}[{i}]"
        if not isinstance(item, str):
            report.add(where, f'expected an IP address or network as a string, such as "10.0.0.0/8", '
                              f"got {_show(item)}")
            continue
        try:
            ipaddress.ip_network(item)
        except ValueError as exc:
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                report.add(where, f'{_show(item)} is not an IP address or network ({exc}); expected such as '
                                  '"127.0.0.1", "::1", "10.0.0.0/8", or "*" or "unix"')
            else:
                report.add(where, f"{_show(item)} has host bits set; the network is {_show(str(network))}")
    if "*" in value and len(value) > 1:
        report.add(key, f'"*" trusts every peer already; list it alone, got {_show(value)}')
    return tuple(value) if all(isinstance(item, str) for item in value) else ()


# ---- [workers.env] ------------------------------------------------------------------------

def _environment(value: Any, key: str, report: _Report) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        report.add(key, 'expected a table of NAME = "value", such as [workers.env] with '
                        f'DJANGO_SETTINGS_MODULE = "demo.settings", got {_show(value)}')
        return ()
    pairs = []
    for name, text in value.items():
        valid = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None
        where = f"{key}.{name}" if valid else f"{key}.{_show(name)}"
        if not valid:
            report.add(where, "expected an environment variable name: letters, digits and _, "
                              "not starting with a digit")
        elif name.startswith(RESERVED_ENV):
            report.add(where, f"{name} is reserved: cadenza sets CADENZA_*, LISTEN_*, NOTIFY_SOCKET and "
                              "WATCHDOG_* for each worker itself; choose another name")
        elif not isinstance(text, str):
            report.add(where, "expected a string (an environment value is text: quote numbers and "
                              f"booleans, such as \"4\"), got {_show(text)}")
        elif "\0" in text:
            report.add(where, "contains a NUL character, which no environment value can hold")
        else:
            pairs.append((name, text))
    return tuple(pairs)
