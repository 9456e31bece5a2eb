"""`cadenza` command line. Only this module turns errors into exit codes.

Exit codes of the daemon (sysexits, so units can list the permanent ones in
RestartPreventExitStatus=): 0 clean stop; 64 usage; 78 configuration; 71 a listener could not
be bound or adopted; 75 the workers did not become ready in time; 70 internal error.
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
from . import config as C
from .listeners import ListenerError, adopt_from_env, bind, parse_address
from .master import Master
from .notify import Notifier

EX_USAGE, EX_CONFIG, EX_OSERR, EX_SOFTWARE = 64, 78, 71, 70
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
    return C.override(cfg, binds=getattr(args, "bind", None), workers=getattr(args, "workers", None),
                      app=getattr(args, "app", None), command=command or None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if command and args.command != "run":
        print("cadenza: a worker command after -- is only for `cadenza run`", file=sys.stderr)
        return EX_USAGE
    return {"run": cmd_run, "check": cmd_check}[args.command](args, command)


def cmd_run(args, command: list[str]) -> int:
    logs.setup("master")
    try:
        cfg = load_config(args, command)
    except C.ConfigError as exc:
        log.error("configuration refused, not starting:\n%s", exc)
        return EX_CONFIG
    release = resolve_release(cfg)
    if release is None:
        return EX_CONFIG
    try:
        listeners = adopt_from_env()
        bound_here = not listeners
        if bound_here:
            listeners = [bind(parse_address(text)) for text in cfg.listen.addresses]
    except ListenerError as exc:
        log.error("%s", exc)
        return EX_OSERR
    notifier = Notifier.from_environ()
    generation = int(os.environ.pop("CADENZA_GENERATION", "1") or 1)
    setproctitle.setproctitle(f"cadenza master gen {generation} [{cfg.app.name}]")
    master = Master(cfg, listeners, notifier, generation=generation, release=release, bound_here=bound_here)
    try:
        return master.run()
    except Exception:
        log.exception("internal error in the master; please report it with this traceback")
        return EX_SOFTWARE


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
        problems += C.check_file_safety(path)
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
    code = "import sys; from cadenza.appworker import load_app; load_app(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, app], cwd=release, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": release})
    if proc.returncode == 0:
        return []
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    return [f"workers.app {app!r} cannot be imported from {release}: {last}"]


if __name__ == "__main__":
    sys.exit(main())
