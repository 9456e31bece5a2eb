"""The `cadenza.toml` file (DESIGN §3): read, validate, and merge command-line flags.

Every new generation reads the config of its own release, so a mistake here must be caught
before an upgrade touches anything, and reported completely: an operator fixing a config
during a failed `systemctl reload` should see every problem at once, not one per attempt.
Each problem names the file, the dotted key and what was expected.
"""

from __future__ import annotations

import errno
import json
import os
import tomllib
from .records import asdict, record, replace
from pathlib import Path
from typing import Any

from cadenza.validate import (MAX_CONCURRENCY, MAX_MEMORY_MB, MAX_REQUESTS, MAX_WORKERS, MAX_WSGI_THREADS,
                              ConfigError, Readiness, Validator, _absolute_path, _addresses, _app_name, _app_spec, _boolean,
                              _check_addresses, _choice, _environment, _forwarded_ips, _fraction, _integer,
                              _metrics_address, _readiness,
                              _Report, _root_path, _seconds, _seconds_or_off, _show, _socket_path,
                              _string_list, _suggest, _tls_file)

__all__ = ["Config", "ConfigError", "Readiness", "HttpSection", "DEFAULT_APP", "load", "parse", "defaults",
           "override", "from_run_args", "require_app", "http_environment", "worker_environment",
           "listen_origins", "discover", "resolve_release",
           "ReleaseError"]

DEFAULT_APP = "cadenza.demo:app"


@record(frozen=True)
class AppSection:
    name: str = "cadenza"
    root: Path | None = None
    exec_path: Path | None = None
    directory: Path | None = None


@record(frozen=True)
class ListenSection:
    addresses: tuple[str, ...] = ("127.0.0.1:8000",)
    from_flags: bool = False     # the addresses came from --bind (error messages name the flag)


@record(frozen=True)
class WorkersSection:
    count: int = 2
    app: str | None = None
    command: tuple[str, ...] | None = None
    ready: Readiness = Readiness("notify")
    ready_timeout: float = 30.0
    graceful_timeout: float = 30.0
    watchdog: float = 0.0        # seconds without WATCHDOG=1 before a worker is replaced; 0: off
    env: tuple[tuple[str, str], ...] = ()   # [workers.env]: added to every worker's environment
    preload: bool = False        # one preloader per generation imports the app and forks the workers
    max_requests: int = 0        # recycle a worker after this many requests (+ 0..jitter); 0: off
    max_requests_jitter: int = 0
    max_lifetime: float = 0.0    # seconds a worker serves before it is recycled; 0: off
    max_memory: int = 0          # MB of a worker's unique memory (USS) before it is recycled; 0: off
    timeout: float = 0.0         # seconds a request may run (built-in worker); 0: off


@record(frozen=True)
class HttpSection:
    """[http], the built-in worker's HTTP settings. These defaults are the only ones: the worker
    uses them too when it runs without CADENZA_HTTP, and the fields are CADENZA_HTTP's keys."""
    protocol: str = "auto"                 # auto (httptools when installed) | httptools | h11
    loop: str = "auto"                     # auto (uvloop when installed) | uvloop | asyncio
    lifespan: str = "auto"                 # ASGI lifespan: auto | on | off
    keepalive: float = 5.0                 # seconds an idle keep-alive connection is kept
    access_log: bool = False
    proxy_headers: bool = True             # believe X-Forwarded-For/-Proto from forwarded_allow_ips
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1",)   # IPs, networks, "*", "unix"
    root_path: str = ""                    # the prefix the app is mounted under behind a proxy
    limit_concurrency: int = 0             # open connections per worker (idle ones too) before 503; 0: off
    certfile: str | None = None            # TLS: a PEM certificate chain (with the key, or keyfile)
    keyfile: str | None = None
    wsgi_threads: int = 10                 # the WSGI thread pool of each worker


@record(frozen=True)
class UpgradeSection:
    timeout: float = 60.0
    canary: int = 0                   # workers the next generation starts with first; 0: no canary
    canary_duration: float = 60.0     # seconds the canary serves before it is judged
    canary_max_error_rate: float = 0.01   # its 5xx share may exceed the old one's by this much
    rollback_window: float = 0.0      # seconds a generation that handed over stays warm; 0: off


@record(frozen=True)
class MetricsSection:
    listen: str | None = None         # loopback host:port or unix:PATH; None: off
    multiprocess: bool = False        # own PROMETHEUS_MULTIPROC_DIR for the app's prometheus_client


@record(frozen=True)
class ControlSection:
    socket: Path | None = None
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    status_groups: tuple[str, ...] = ()


@record(frozen=True)
class Config:
    app: AppSection
    listen: ListenSection
    workers: WorkersSection
    upgrade: UpgradeSection
    control: ControlSection
    source: Path | None = None
    http: HttpSection | None = None      # None: the file has no [http] (the defaults apply)
    metrics: MetricsSection = MetricsSection()

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


_SCHEMA: dict[str, dict[str, Validator]] = {
    "app": {"name": _app_name, "root": _absolute_path, "exec_path": _absolute_path,
            "directory": _absolute_path},
    "listen": {"addresses": _addresses},
    "workers": {"count": _integer(1, MAX_WORKERS), "app": _app_spec,
                "command": _string_list("the program and its arguments", allow_empty=False),
                "ready": _readiness, "ready_timeout": _seconds, "graceful_timeout": _seconds,
                "watchdog": _seconds_or_off, "env": _environment, "preload": _boolean,
                "max_requests": _integer(0, MAX_REQUESTS), "max_requests_jitter": _integer(0, MAX_REQUESTS),
                "max_lifetime": _seconds_or_off, "max_memory": _integer(0, MAX_MEMORY_MB),
                "timeout": _seconds_or_off},
    "upgrade": {"timeout": _seconds, "canary": _integer(0, MAX_WORKERS), "canary_duration": _seconds,
                "canary_max_error_rate": _fraction, "rollback_window": _seconds_or_off},
    "control": {"socket": _socket_path,
                "allow_users": _string_list("user names", allow_empty=True),
                "allow_groups": _string_list("group names", allow_empty=True),
                "status_groups": _string_list("group names", allow_empty=True)},
    "http": {"protocol": _choice("auto", "httptools", "h11"), "loop": _choice("auto", "uvloop", "asyncio"),
             "lifespan": _choice("auto", "on", "off"), "keepalive": _seconds, "access_log": _boolean,
             "proxy_headers": _boolean, "forwarded_allow_ips": _forwarded_ips, "root_path": _root_path,
             "limit_concurrency": _integer(0, MAX_CONCURRENCY), "certfile": _tls_file, "keyfile": _tls_file,
             "wsgi_threads": _integer(1, MAX_WSGI_THREADS)},
    "metrics": {"listen": _metrics_address, "multiprocess": _boolean},
}
_SECTION_TYPES = {"app": AppSection, "listen": ListenSection, "workers": WorkersSection,
                  "upgrade": UpgradeSection, "control": ControlSection, "http": HttpSection,
                  "metrics": MetricsSection}
_OPTIONAL = {"http"}   # Config holds None for these when the file has none


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
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SCHEMA if name not in _OPTIONAL}
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
    if "http" in sections:
        _check_http(sections["http"], sections["workers"], report)
    return sections


def _check_workers(workers: dict[str, Any], report: _Report) -> None:
    if "app" in workers and "command" in workers:
        report.add("workers", "set either workers.app or workers.command, not both")
    if "command" in workers:
        # These need the built-in worker: it preloads, counts requests and times them.
        for key, what in (("preload", "imports the application once and forks the workers"),
                          ("max_requests", "counts the requests a worker served"),
                          ("timeout", "times each request")):
            if workers.get(key):
                report.add(f"workers.{key}", f"only the built-in worker (workers.app) {what}; "
                           f"workers.command runs a server of its own: remove workers.{key}, or use "
                           "that server's own setting")
    if workers.get("max_requests_jitter") and not workers.get("max_requests"):
        report.add("workers.max_requests_jitter", "a jitter needs workers.max_requests: set it too, "
                   "or remove the jitter")
    ready, limit = workers.get("ready"), workers.get("ready_timeout", WorkersSection.ready_timeout)
    # A worker counts as ready only after `uptime`; if that is past ready_timeout, no worker ever is.
    if isinstance(ready, Readiness) and ready.kind == "uptime" and ready.seconds >= limit > 0:
        report.add("workers.ready", f"{ready} is never reached within workers.ready_timeout = "
                                    f"{limit:g} s; lower the uptime or raise ready_timeout")


def _check_http(http: dict[str, Any], workers: dict[str, Any], report: _Report) -> None:
    if "command" in workers:
        report.add("http", "[http] configures the built-in worker (workers.app) only; workers.command "
                           "runs a server of its own, which these settings never reach: remove [http] "
                           "or set them in that command")
    if "keyfile" in http and "certfile" not in http:
        report.add("http.keyfile", "a key needs its certificate: set http.certfile too, or remove "
                                   "http.keyfile")


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
             app: str | None = None, command: list[str] | None = None, name: str | None = None,
             control_socket: str | None = None) -> Config:
    """Apply command-line flags, which win over the file. Empty `binds`/`command` mean "not given"."""
    report = _Report(None)
    if app is not None and command:
        report.add("--app", "pass either --app or a command after --, not both")
    if binds:
        _check_addresses(binds, [f"--bind {_show(text)}" for text in binds], report)
    if workers is not None:
        _integer(1, MAX_WORKERS)(workers, "--workers", report)
    if app is not None:
        app = _app_spec(app, "--app", report)
    if command:
        _string_list("the program and its arguments", False)(command, "command after --", report)
        if config.http is not None:
            report.add("command after --", f"{config.source}: [http] configures the built-in worker only, "
                                           "and a command runs a server of its own: remove [http] there, "
                                           "or serve the app with --app")
    if name is not None:
        _app_name(name, "--name", report)
    socket_path = _socket_path(control_socket, "--control-socket", report) if control_socket is not None else None
    report.raise_if_any()
    listen = replace(config.listen, addresses=tuple(binds), from_flags=True) if binds else config.listen
    section = config.workers
    if workers is not None:
        section = replace(section, count=workers)
    if app is not None:
        section = replace(section, app=app, command=None)
    if command:
        section = replace(section, app=None, command=tuple(command))
    app_section = replace(config.app, name=name) if name is not None else config.app
    control = replace(config.control, socket=socket_path) if control_socket is not None else config.control
    return replace(config, app=app_section, listen=listen, workers=section, control=control)


def from_run_args(args, command: list[str] | None = None,
                  directory: str | os.PathLike | None = None) -> Config:
    """What `cadenza run ARGS [-- COMMAND]` serves, started in `directory`: the config file found
    there (or the defaults), then the flags. The one reading of them: `cadenza run`, `cadenza
    check` and an upgrade's pre-flight (for the next generation's argv) all come here."""
    path = discover(getattr(args, "config", None), directory)
    cfg = load(path) if path else defaults()
    flags = {key: getattr(args, key, None) for key in ("workers", "app", "name", "control_socket")}
    return require_app(override(cfg, binds=getattr(args, "bind", None), command=command or None, **flags))


def listen_origins(config: Config) -> list[str]:
    """Where each of `config.listen.addresses` was given, for an error that must name it."""
    addresses = config.listen.addresses
    if config.listen.from_flags:
        return [f"--bind {_show(text)}" for text in addresses]
    if config.source is not None:
        return [f"{config.source}: listen.addresses[{i}]" for i in range(len(addresses))]
    return ["the default address (--bind ADDR picks another)"] * len(addresses)


# ---- what each worker gets ---------------------------------------------------------------

def http_environment(config: Config) -> dict[str, str]:
    """{"CADENZA_HTTP": JSON} for the built-in worker: [http] with every key, defaults filled in
    (certfile/keyfile null when unset). Nothing for a workers.command program."""
    if not config.workers.app:
        return {}
    values = asdict(config.http or HttpSection())
    return {"CADENZA_HTTP": json.dumps(values, separators=(",", ":"))}


def worker_environment(config: Config) -> dict[str, str]:
    """What this config adds to each worker's environment (never to the master's: a release's
    [workers.env] reaches only its own generation's workers, and a key removed is gone)."""
    extra = {}
    if config.workers.timeout and not config.workers.command:
        extra["CADENZA_TIMEOUT"] = f"{config.workers.timeout:g}"
    return {**dict(config.workers.env), **http_environment(config), **extra}


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
