"""The contenders, each a socket-activated service in a private systemd serving the same app.

Every contender gets a Capistrano-style root (tests/deploy.py's AppRoot: releases/TAG with the
same app.py, `current`, shared/bin) and `APP.socket` listening on 127.0.0.1:PORT; they differ
only in the service unit and in how a reload is asked for:

cadenza          Type=notify, ExecReload= the pinned `supervisorctl upgrade` (AppRoot.units(),
                 as the upgrade tests use it)      -> `systemctl reload`
gunicorn-usr2    gunicorn 27 (sync workers), Type=notify, ExecReload=kill -s USR2 $MAINPID
                                                    -> `systemctl reload`
gunicorn-hup     the same with ExecReload=kill -s HUP $MAINPID (gunicorn's documented unit)
                                                    -> `systemctl reload`
uvicorn-restart  uvicorn's own Multiprocess supervisor (uvicorn_main.py), Type=simple
                                                    -> `systemctl restart`

gunicorn runs with `--chdir ROOT/current` (unresolved), so that a HUP's new workers import the
release `current` points at; without it gunicorn would stay in the release it started from.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import BENCH, PYTHON, VENV_BIN, deploy, release, wait_http

APP = "app"
UNIT = f"{APP}.service"


@dataclass(frozen=True)
class Contender:
    key: str
    verb: str          # systemctl verb of a "reload": reload | restart
    what: str          # one line for the report

    def install(self, ns, port: int, workers: int = 2, *, ready_timeout: float = 30,
                upgrade_timeout: float = 30, graceful_timeout: float = 10,
                start: bool = True, name: str = APP) -> deploy.AppRoot:
        """ROOT/releases/r1 deployed, units written; with `start`, socket + service started and
        answering."""
        root = deploy.AppRoot(ns.state, name, port, count=workers, ready_timeout=ready_timeout,
                              graceful_timeout=graceful_timeout, upgrade_timeout=upgrade_timeout)
        release(root, "r1")
        units = self.units(root, workers, graceful_timeout)
        for unit_name, text in units.items():
            ns.write_unit(unit_name, text)
        ns.systemctl("daemon-reload", check=True)
        if start:
            ns.systemctl("start", f"{name}.socket", f"{name}.service", check=True,
                         timeout=ready_timeout + 30)
            wait_http(port)
        return root

    def units(self, root: deploy.AppRoot, workers: int, graceful: float) -> dict[str, str]:
        if self.key == "cadenza":
            subprocess.run([str(VENV_BIN / "cadenza"), "pin", "--root", str(root.root)], check=True,
                           capture_output=True)
            return root.units()
        cur = root.root / "current"
        if self.key.startswith("gunicorn"):
            signal = "USR2" if self.key.endswith("usr2") else "HUP"
            service = ["Type=notify", "NotifyAccess=main",
                       f"ExecStart={VENV_BIN}/gunicorn --workers {workers} --chdir {cur} "
                       f"--graceful-timeout {int(graceful)} "
                       f"--control-socket {root.root}/run/gunicorn.ctl app:app",
                       f"ExecReload=/bin/kill -s {signal} $MAINPID"]
        else:
            service = ["Type=simple",
                       f"ExecStart={PYTHON} {BENCH / 'uvicorn_main.py'} asgi:app {workers} {graceful}"]
        lines = ["[Unit]", f"Requires={root.name}.socket", f"After={root.name}.socket", "",
                 "[Service]", *service, "KillMode=mixed", f"WorkingDirectory=-{cur}",
                 f"TimeoutStopSec={int(graceful) + 10}", "Restart=on-failure"]
        sock = f"[Socket]\nListenStream=127.0.0.1:{root.port}\n"
        return {f"{root.name}.service": "\n".join(lines) + "\n", f"{root.name}.socket": sock}


CADENZA = Contender("cadenza", "reload", "cadenza: `ExecReload=` pinned `supervisorctl upgrade`")
GUNICORN_USR2 = Contender("gunicorn-usr2", "reload", "gunicorn 27: `ExecReload=kill -s USR2 $MAINPID`")
GUNICORN_HUP = Contender("gunicorn-hup", "reload", "gunicorn 27: `ExecReload=kill -s HUP $MAINPID`")
UVICORN = Contender("uvicorn-restart", "restart", "uvicorn (Multiprocess): `systemctl restart`")
ALL = (CADENZA, GUNICORN_USR2, GUNICORN_HUP, UVICORN)
BY_KEY = {c.key: c for c in ALL}


def next_release(root: deploy.AppRoot, n: int) -> str:
    tag = f"r{n}"
    release(root, tag)
    return tag


def releases_dir(root: deploy.AppRoot) -> Path:
    return root.root / "releases"
