"""`cadenza` command line. Only this module turns errors into exit codes.

Exit codes of the daemon (sysexits, so units can list the permanent ones in
RestartPreventExitStatus=): 0 clean stop; 64 usage; 78 configuration (the config file, or a unit
setting such as a too low LimitNOFILE=); 73 the control socket could not be created; 71 a listener
could not be bound or adopted; 75 the workers did not become ready in time; 70 internal error.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import setproctitle

from . import __version__, logs
from .daemon import limits
from .trust import config_problems
from . import config as C
from .control.server import ControlError, bind_socket
from .listeners import ListenerError, adopt_from_env, bind, parse_address
from .master import Master
from .notify import Notifier
from .succession import CONTROL_FDNAME, Heir

EX_USAGE, EX_CONFIG, EX_OSERR, EX_SOFTWARE, EX_CANTCREAT = 64, 78, 71, 70, 73
log = logging.getLogger("cadenza")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadenza", description="Prefork supervisor that lives under systemd.")
    parser.add_argument("--version", action="version", version=f"cadenza {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a master and its workers",
                         description="Run a master and its workers. Without a config and an app it "
                                     "serves the built-in demo on 127.0.0.1:8000 with 2 workers. "
                                     "Anything after -- is a worker command instead of --app.")
    _config_arg(run)
    run.add_argument("--bind", action="append", metavar="ADDR",
                     help="host:port, [v6]:port or unix:/path[;mode=0660]; repeat for more (overrides [listen])")
    run.add_argument("--workers", type=int, metavar="N", help="number of workers (overrides workers.count)")
    run.add_argument("--app", metavar="MOD:OBJ", help="WSGI or ASGI application for the built-in worker")
    pin = sub.add_parser("pin", help="write ROOT/shared/bin/{cadenza,supervisorctl}, the pinned launchers",
                         description="Write the pinned launchers every generation is started from. They "
                                     "find the release at exec time: ROOT/current/.venv when it exists, "
                                     "else the shared venv's Python.")
    pin.add_argument("--root", required=True, metavar="DIR", help="the app's root (holds current/, shared/)")
    pin.add_argument("--python", metavar="PATH", help="a shared venv's python (default: this one, unless "
                                                      "it lives in a release)")
    pin.add_argument("--socket", metavar="PATH", help="control socket for the pinned supervisorctl "
                                                      "(default: from ROOT/current/cadenza.toml)")
    pin.add_argument("--unit", metavar="NAME", help="systemd unit for the pinned supervisorctl (default: app.name)")
    units = sub.add_parser("units", help="render APP.service and APP.socket from the unit templates",
                           description="Render APP.service and APP.socket from units/cadenza@.service and "
                                       "units/cadenza@.socket, for `systemctl reload APP`.")
    units.add_argument("--name", required=True, metavar="APP", help="unit name (APP.service, APP.socket)")
    units.add_argument("--root", required=True, metavar="DIR", help="the app's root (holds current/, shared/)")
    units.add_argument("--listen", action="append", metavar="ADDR",
                       help="host:port, [v6]:port or unix:/path[;mode=0660]; repeat for more")
    units.add_argument("--user", metavar="USER", help="run the service as this user")
    units.add_argument("-o", "--output", default=".", metavar="OUTDIR",
                       help="where to write the units (default: here; /etc/systemd/system to install)")
    check = sub.add_parser("check", help="validate the config and the app; exit 1 with every problem")
    _config_arg(check)
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file (default: $CADENZA_CONFIG, else ./cadenza.toml when it exists)")


def config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("CADENZA_CONFIG"):
        return Path(os.environ["CADENZA_CONFIG"])
    return Path("cadenza.toml") if Path("cadenza.toml").is_file() else None


def load_config(args, command: list[str] | None = None) -> C.Config:
    path = config_path(args.config)
    cfg = C.load(path) if path else C.defaults()
    return C.require_app(C.override(cfg, binds=getattr(args, "bind", None), workers=getattr(args, "workers", None),
                      app=getattr(args, "app", None), command=command or None))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    raw_argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if command and args.command != "run":
        print("cadenza: a worker command after -- is only for `cadenza run`", file=sys.stderr)
        return EX_USAGE
    if args.command == "run":
        return cmd_run(args, command, raw_argv)
    if args.command == "pin":
        return cmd_pin(args)
    if args.command == "units":
        return cmd_units(args)
    return cmd_check(args, command)


def cmd_units(args) -> int:
    from .tools import unitfiles
    try:
        units = unitfiles.render(args.name, Path(args.root), args.listen, args.user)
        for path in unitfiles.write(units, Path(args.output)):
            print(f"wrote {path}")
    except (unitfiles.UnitError, OSError) as exc:
        print(f"cadenza units: {exc}", file=sys.stderr)
        return EX_CONFIG
    return 0


def cmd_pin(args) -> int:
    from .tools.pinning import PinError, pin
    try:
        for path in pin(Path(args.root), args.python, args.socket, args.unit):
            print(f"wrote {path}")
    except PinError as exc:
        print(f"cadenza pin: {exc}", file=sys.stderr)
        return EX_CONFIG
    return 0


def cmd_run(args, command: list[str], raw_argv: list[str]) -> int:
    # Titled before anything touches the environment: setproctitle finds the memory it may
    # overwrite (argv, then environ) on its first call, and an edited environ can defeat that.
    setproctitle.setproctitle("cadenza master")
    log_fd = os.environ.get("CADENZA_LOG_FD", "")
    logs.setup("master", final_fd=int(log_fd) if log_fd.isdigit() else None)
    try:
        cfg = load_config(args, command)
    except C.ConfigError as exc:
        log.error("configuration refused, not starting:\n%s", exc)
        return EX_CONFIG
    unsafe = config_problems(cfg.source, writers=0o002) if cfg.source else []
    if unsafe:
        log.error("configuration refused, not starting:\n%s", "\n".join(unsafe))
        return EX_CONFIG
    problem = limits.open_files_problem()
    if problem:
        log.error("not starting: %s", problem)
        return EX_CONFIG
    release = resolve_release(cfg)
    if release is None:
        return EX_CONFIG
    heir = Heir.from_environ()
    # What an earlier generation bound itself, and so the last generation to stop removes.
    owned = set(os.environ.pop("CADENZA_OWNS", "").split(","))
    try:
        listeners = adopt_from_env()
        control = _take_control(listeners)
        bound_here = not listeners or "listeners" in owned
        if not listeners:
            listeners = [bind(parse_address(text), f"listen-{i}") for i, text in enumerate(cfg.listen.addresses, 1)]
    except ListenerError as exc:
        log.error("%s", exc)
        return EX_OSERR
    control_owned = control is None or "control" in owned
    if control is None:
        try:
            control = bind_socket(cfg.control_socket)
        except ControlError as exc:
            # Without it neither `systemctl reload` nor supervisorctl could reach this master.
            log.error("not starting: %s", exc)
            return EX_CANTCREAT
    notifier = Notifier.from_environ()
    store_max = os.environ.pop("FDSTORE", "0")
    if heir is None and store_max.isdigit() and int(store_max) > 0:
        # What we bound ourselves goes to systemd's fd store too: after a crash or a restart the
        # next master gets the same sockets back, and nothing is refused. systemd 254+ sets
        # $FDSTORE from FileDescriptorStoreMax=; on 252 the unit sets Environment=FDSTORE=N itself.
        offer = [(l.fd, l.name) for l in listeners] if bound_here else []
        if control is not None and control_owned:
            offer.append((control.fileno(), CONTROL_FDNAME))
        if offer and notifier.store_fds(offer):
            owned.add("fdstore")
    generation = int(os.environ.pop("CADENZA_GENERATION", "1") or 1)
    setproctitle.setproctitle(f"cadenza master gen {generation} [{cfg.app.name}]")
    master = Master(cfg, listeners, notifier, generation=generation, release=release, bound_here=bound_here,
                    heir=heir, argv=raw_argv, control=control, control_owned=control_owned,
                    fd_store="fdstore" in owned)
    try:
        return master.run()
    except Exception:
        log.exception("internal error in the master; please report it with this traceback")
        return EX_SOFTWARE


def _take_control(listeners):
    """The control socket arrives with the listeners, named cadenza-control, from master N."""
    for listener in listeners:
        if listener.name == CONTROL_FDNAME:
            listeners.remove(listener)
            return listener.sock
    return None


def resolve_release(cfg: C.Config) -> str | None:
    """Resolve `directory` (e.g. ROOT/current) once: every worker of this generation runs there."""
    directory = cfg.directory
    if directory is None:
        return os.getcwd()
    release = os.path.realpath(directory)
    if not os.path.isdir(release):
        log.error("%s (app.directory) does not resolve to an existing directory (got %s); "
                  "deploy a release and point the symlink at it", directory, release)
        return None
    return release


def cmd_check(args, command: list[str]) -> int:
    problems: list[str] = []
    try:
        cfg = load_config(args)
    except C.ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    path = config_path(args.config)
    if path:
        problems += config_problems(path)
    release = os.path.realpath(cfg.directory) if cfg.directory else os.getcwd()
    if cfg.directory and not os.path.isdir(release):
        problems.append(f"{cfg.directory}: app.directory does not resolve to an existing directory")
    elif cfg.workers.app:
        problems += _check_import(cfg.workers.app, release)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"ok: {path or 'built-in defaults'}; app {cfg.workers.app or ' '.join(cfg.workers.command)} "
              f"from {release}")
    return 1 if problems else 0


def _check_import(app: str, release: str) -> list[str]:
    # Imported in a child process: checking must not run the application's code in this one.
    code = "import sys; from cadenza.worker.app import load_app; load_app(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, app], cwd=release, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": release})
    if proc.returncode == 0:
        return []
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    return [f"workers.app {app!r} cannot be imported from {release}: {last}"]


if __name__ == "__main__":
    sys.exit(main())
