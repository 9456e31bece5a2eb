"""The `cadenza.toml` file (DESIGN §3): read, validate, and merge command-line flags.

Every new generation reads the config of its own release, so a mistake here must be caught
before an upgrade touches anything, and reported completely: an operator fixing a config
during a failed `systemctl reload` should see every problem at once, not one per attempt.
Each problem names the file, the dotted key and what was expected.
"""

from __future__ import annotations

import difflib
import errno
import json
import keyword
import os
import re
import socket
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from cadenza.listeners import Address, parse_address

DEFAULT_APP = "cadenza.demo:app"
MAX_WORKERS = 1024
MAX_TIMEOUT = 86400.0
MAX_UPTIME = 3600.0
# sun_path is 108 bytes including the terminating NUL (unix(7)); a longer path cannot be bound.
MAX_SOCKET_PATH = 107


class ConfigError(Exception):
    """Every problem found in one config, one full sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class AppSection:
    name: str = "cadenza"
    root: Path | None = None
    exec_path: Path | None = None
    directory: Path | None = None


@dataclass(frozen=True)
class ListenSection:
    addresses: tuple[str, ...] = ("127.0.0.1:8000",)


@dataclass(frozen=True)
class WorkersSection:
    count: int = 2
    app: str | None = None
    command: tuple[str, ...] | None = None
    ready: Readiness = Readiness("notify")
    ready_timeout: float = 30.0
    graceful_timeout: float = 30.0
    watchdog: float = 0.0        # seconds without WATCHDOG=1 before a worker is replaced; 0: off


@dataclass(frozen=True)
class UpgradeSection:
    timeout: float = 60.0


@dataclass(frozen=True)
class ControlSection:
    socket: Path | None = None
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    status_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    app: AppSection
    listen: ListenSection
    workers: WorkersSection
    upgrade: UpgradeSection
    control: ControlSection
    source: Path | None = None

    @property
    def exec_path(self) -> Path | None:
        if self.app.exec_path is not None:
            return self.app.exec_path
        return self.app.root / "shared/bin/cadenza" if self.app.root is not None else None

    @property
    def directory(self) -> Path | None:
        # Never resolved: `current` must be followed anew by each generation (DESIGN §4).
        if self.app.directory is not None:
            return self.app.directory
        return self.app.root / "current" if self.app.root is not None else None

    @property
    def control_socket(self) -> Path:
        if self.control.socket is not None:
            return self.control.socket
        return Path(f"/run/cadenza/{self.app.name}/control.sock")


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
    module, sep, obj = value.partition(":") if isinstance(value, str) else ("", "", "")
    parts = module.split(".") + obj.split(".")
    if not sep or not all(part.isidentifier() and not keyword.iskeyword(part) for part in parts):
        report.add(key, 'expected "module:object" such as "demo.wsgi:application", '
                        f"got {_show(value)}")
    return value


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
    return (address.family, socket.inet_pton(address.family, address.host), address.port)


_SCHEMA: dict[str, dict[str, Validator]] = {
    "app": {"name": _app_name, "root": _absolute_path, "exec_path": _absolute_path,
            "directory": _absolute_path},
    "listen": {"addresses": _addresses},
    "workers": {"count": _integer(1, MAX_WORKERS), "app": _app_spec,
                "command": _string_list("the program and its arguments", allow_empty=False),
                "ready": _readiness, "ready_timeout": _seconds, "graceful_timeout": _seconds,
                "watchdog": _seconds_or_off},
    "upgrade": {"timeout": _seconds},
    "control": {"socket": _socket_path,
                "allow_users": _string_list("user names", allow_empty=True),
                "allow_groups": _string_list("group names", allow_empty=True),
                "status_groups": _string_list("group names", allow_empty=True)},
}
_SECTION_TYPES = {"app": AppSection, "listen": ListenSection, "workers": WorkersSection,
                  "upgrade": UpgradeSection, "control": ControlSection}


def _suggest(word: str, choices: list[str], shape: str = "{}") -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {shape.format(close[0])}?)" if close else ""


def _validate_section(section: str, table: dict[str, Any], report: _Report) -> dict[str, Any]:
    schema = _SCHEMA[section]
    values = {}
    for key, value in table.items():
        if key not in schema:
            report.add(f"{section}.{key}", f"unknown key; the keys of [{section}] are "
                       f"{', '.join(schema)}{_suggest(key, list(schema))}")
            continue
        values[key] = schema[key](value, f"{section}.{key}", report)
    return values


def _validate_document(document: dict[str, Any], report: _Report) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SCHEMA}
    names = ", ".join(f"[{name}]" for name in _SCHEMA)
    for name, table in document.items():
        if name not in _SCHEMA:
            report.add(name, f"unknown section; the sections are {names}"
                             f"{_suggest(name, list(_SCHEMA), '[{}]')}")
        elif not isinstance(table, dict):
            report.add(name, f"expected a table [{name}] holding its keys, got {_show(table)}")
        else:
            sections[name] = _validate_section(name, table, report)
    _check_workers(sections["workers"], report)
    return sections


def _check_workers(workers: dict[str, Any], report: _Report) -> None:
    if "app" in workers and "command" in workers:
        report.add("workers", "set either workers.app or workers.command, not both")
    ready, limit = workers.get("ready"), workers.get("ready_timeout", WorkersSection.ready_timeout)
    # A worker counts as ready only after `uptime`; if that is past ready_timeout, no worker ever is.
    if isinstance(ready, Readiness) and ready.kind == "uptime" and ready.seconds >= limit > 0:
        report.add("workers.ready", f"{ready} is never reached within workers.ready_timeout = "
                                    f"{limit:g} s; lower the uptime or raise ready_timeout")


def _build(sections: dict[str, dict[str, Any]], source: Path | None) -> Config:
    built = {name: _SECTION_TYPES[name](**values) for name, values in sections.items()}
    return Config(**built, source=source)


def parse(text: str, source: str) -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}; fix the syntax there"]) from exc
    report = _Report(str(source))
    sections = _validate_document(document, report)
    report.raise_if_any()
    return _build(sections, Path(source))


_READ_HINTS = {errno.ENOENT: "create it or pass -c with the right path",
               errno.EISDIR: "pass -c with the path of the file, not of its directory",
               errno.EACCES: "make it readable by the service user"}


def load(path: str | os.PathLike) -> Config:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        hint = _READ_HINTS.get(exc.errno, "check the path and its permissions")
        reason = exc.strerror or exc
        raise ConfigError([f"{os.fspath(path)}: cannot read config: {reason}; {hint}"]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{os.fspath(path)}: is not UTF-8 text (byte {exc.start}); "
                           "TOML files must be UTF-8"]) from exc
    return parse(text, os.fspath(path))


def defaults() -> Config:
    return Config(AppSection(), ListenSection(), WorkersSection(app=DEFAULT_APP), UpgradeSection(),
                  ControlSection())


def require_app(config: Config) -> Config:
    """A config *file* must name what it serves: an empty or truncated cadenza.toml in a new release
    would otherwise serve the built-in demo in production. Only `cadenza run` with no file at
    all serves the demo."""
    if config.workers.app or config.workers.command:
        return config
    if config.source is not None:
        raise ConfigError([f"{config.source}: workers: names no application; set workers.app = "
                           '"module:object" or workers.command = [...] (an empty or truncated file '
                           "is refused rather than served as the built-in demo)"])
    return replace(config, workers=replace(config.workers, app=DEFAULT_APP))


def override(config: Config, *, binds: list[str] | None = None, workers: int | None = None,
             app: str | None = None, command: list[str] | None = None) -> Config:
    """Apply command-line flags, which win over the file. Empty `binds`/`command` mean "not given"."""
    report = _Report(None)
    if app is not None and command:
        report.add("--app", "pass either --app or a command after --, not both")
    if binds:
        _check_addresses(binds, [f"--bind {_show(text)}" for text in binds], report)
    if workers is not None:
        _integer(1, MAX_WORKERS)(workers, "--workers", report)
    if app is not None:
        _app_spec(app, "--app", report)
    if command:
        _string_list("the program and its arguments", False)(command, "command after --", report)
    report.raise_if_any()
    listen = replace(config.listen, addresses=tuple(binds)) if binds else config.listen
    section = config.workers
    if workers is not None:
        section = replace(section, count=workers)
    if app is not None:
        section = replace(section, app=app, command=None)
    if command:
        section = replace(section, app=None, command=tuple(command))
    return replace(config, listen=listen, workers=section)


# ---- where a config is found, and which release it serves ----------------------------------

def discover(explicit: str | os.PathLike | None, directory: str | os.PathLike | None = None) -> Path | None:
    """The config file a master reads: -c FILE, else $CADENZA_CONFIG, else ./cadenza.toml when it
    exists. Relative paths are taken from `directory` (a new generation's working directory,
    which the pre-flight checks before the new master is started there), else from here."""
    base = Path(directory) if directory is not None else Path()
    if explicit:
        return base / explicit
    if os.environ.get("CADENZA_CONFIG"):
        return base / os.environ["CADENZA_CONFIG"]
    candidate = base / "cadenza.toml"
    return candidate if candidate.is_file() else None


class ReleaseError(Exception):
    pass


def resolve_release(config: Config) -> str:
    """What `directory` (e.g. ROOT/current) points at now: every worker of a generation runs there.
    Resolved once per generation; the unresolved path is what the next generation starts in."""
    if config.directory is None:
        return os.getcwd()
    release = os.path.realpath(config.directory)
    if not os.path.isdir(release):
        raise ReleaseError(f"{config.directory} (app.directory) does not resolve to an existing directory "
                           f"(it points at {release}); deploy a release and point the symlink at it")
    return release
