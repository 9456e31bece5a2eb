"""`cadenza` command line. Only this module turns errors into exit codes (listed in exitcodes.py).

`cadenza run` loads the daemon (cadenza.daemon.boot) and nothing of the operator tools; `pin` and
`units` load theirs (cadenza.tools) only when asked, so that a master never carries them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, exitcodes
from . import config as C
from .trust import config_problems

EPILOG = "exit codes of `cadenza run`: " + exitcodes.describe(exitcodes.DAEMON)


def _parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadenza", description="Prefork supervisor that lives under systemd.",
                                     epilog=EPILOG, exit_on_error=exit_on_error)
    parser.add_argument("--version", action="version", version=f"cadenza {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a master and its workers",
                         description="Run a master and its workers. Without a config and an app it "
                                     "serves the built-in demo on 127.0.0.1:8000 with 2 workers. "
                                     "Anything after -- is a worker command instead of --app.")
    _config_arg(run)
    run.add_argument("--bind", action="append", metavar="ADDR",
                     help="host:port (a name such as localhost listens on each of its addresses), [v6]:port "
                          "or unix:/path[;mode=0660]; repeat for more (overrides [listen])")
    run.add_argument("--workers", type=int, metavar="N", help="number of workers (overrides workers.count)")
    run.add_argument("--app", metavar="MOD:OBJ", help="WSGI or ASGI application for the built-in worker "
                                                      "(MOD alone means MOD:application)")
    run.add_argument("--name", metavar="NAME", help="the app's name in process titles and in the default "
                                                    "control socket path (overrides app.name)")
    run.add_argument("--control-socket", metavar="PATH",
                     help="absolute path of the control socket (overrides control.socket; default "
                          "/run/cadenza/NAME/control.sock, or $XDG_RUNTIME_DIR/cadenza/NAME/control.sock "
                          "when that cannot be made: not root)")
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


def load_config(args, command: list[str] | None = None) -> C.Config:
    return C.from_run_args(args, command)


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
        return exitcodes.USAGE
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
        return exitcodes.CONFIG
    return 0


def cmd_pin(args) -> int:
    from .tools.pinning import PinError, pin
    try:
        for path in pin(Path(args.root), args.python, args.socket, args.unit):
            print(f"wrote {path}")
    except PinError as exc:
        print(f"cadenza pin: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    return 0


def cmd_run(args, command: list[str], raw_argv: list[str]):
    """Never returns: once the generation is over the process ends at once (exiting.py), since a
    `systemctl reload` waits for the old master to be gone."""
    from .daemon.boot import run
    from .exiting import exit_now
    exit_now(run(args, command, raw_argv))


def parse_run_argv(argv: list[str]):
    """`cadenza run`'s arguments exactly as main() reads them: (args, worker command). ValueError
    when they are not valid. The pre-flight uses this for the next generation's argv."""
    argv = list(argv)
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    try:
        args = _parser(exit_on_error=False).parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise ValueError(str(exc)) from None
    if args.command != "run":
        raise ValueError(f"expected `run`, got {args.command!r}")
    return args, command


def cmd_check(args, command: list[str]) -> int:
    problems: list[str] = []
    try:
        cfg = load_config(args)
    except C.ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    path = C.discover(args.config)
    if path:
        problems += config_problems(path)
    try:
        release = C.resolve_release(cfg)
    except C.ReleaseError as exc:
        release = None
        problems.append(str(exc))
    if release is not None and cfg.workers.app:
        problems += _check_import(cfg.workers.app, release)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"ok: {path or 'built-in defaults'}; app {cfg.workers.app or ' '.join(cfg.workers.command)} "
              f"from {release}")
    return 1 if problems else 0


def _check_import(app: str, release: str) -> list[str]:
    # Imported in a child process: checking must not run the application's code in this one.
    import subprocess   # here: `cadenza run` never needs it, and a master's start is on every reload's path
    code = "import sys; from cadenza.worker.loading import load_app; load_app(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, app], cwd=release, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": release})
    if proc.returncode == 0:
        return []
    last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
    return [f"workers.app {app!r} cannot be imported from {release}: {last}"]


if __name__ == "__main__":
    sys.exit(main())
