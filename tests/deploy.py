"""Capistrano-style app roots for the upgrade tests: releases/, current, shared/bin, units.

ROOT/releases/TAG/      app.py, cadenza.toml and (by default) a venv of its own
ROOT/current -> releases/TAG
ROOT/shared/bin/        the pinned launchers, written by the project's `cadenza pin`
ROOT/run/control.sock   the control socket: under ROOT, so the host-side test reaches it too

Each release venv is a cheap `venv --without-pip` whose .pth adds the project venv's
site-packages, so cadenza (installed editable there) imports from it, yet the release still
has its own bin/cadenza and python, which a prune deletes with it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

# The venv the tests run from; CI runs from another clone path, so nothing is hard-coded.
PROJECT_VENV = Path(sys.executable).parent.parent
PY_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"
PROJECT_SITE = PROJECT_VENV / "lib" / PY_DIR / "site-packages"


def base_python() -> str:
    """The interpreter the project venv was made from (pyvenv.cfg), so release venvs match it."""
    cfg = dict(line.split(" = ", 1) for line in
               (PROJECT_VENV / "pyvenv.cfg").read_text().splitlines() if " = " in line)
    return cfg.get("executable") or str(Path(cfg["home"]) / "python3")


APP = '''\
import os
import time
from urllib.parse import parse_qs

{body}

def app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    text = f"release {tag} pid {{os.getpid()}}\\n".encode()
    if environ["PATH_INFO"] == "/stream":   # headers and a first line now, the rest once GATE exists
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream(text, query["gate"][0])
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(query.get("s", ["1"])[0]))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text))),
                              ("X-Pid", str(os.getpid()))])
    return [text]


def stream(text, gate):
    yield text
    while not os.path.exists(gate):
        time.sleep(0.01)
    yield b"end\\n"
'''

SCRIPT = "#!{python}\nimport sys\nfrom {module} import main\nsys.exit(main())\n"


class AppRoot:
    def __init__(self, base_dir: Path, name: str, port: int, *, count: int = 2,
                 ready_timeout: float = 15, graceful_timeout: float = 10, upgrade_timeout: float = 20):
        self.name, self.port = name, port
        self.root = Path(base_dir) / name
        self.socket = self.root / "run" / "control.sock"
        self.workers = {"count": count, "ready_timeout": ready_timeout, "graceful_timeout": graceful_timeout}
        self.upgrade_timeout = upgrade_timeout
        for sub in ("releases", "shared", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, tag: str) -> Path:
        return self.root / "releases" / tag

    def release(self, tag: str, app_body: str = "", config_extra: str = "", venv: bool = True,
                **workers: object) -> Path:
        """ROOT/releases/TAG with app.py answering "release TAG pid PID"; `app_body` runs at import,
        `workers` overrides [workers] keys (any value, valid or not), `config_extra` is appended."""
        rel = self.path(tag)
        rel.mkdir(parents=True)
        (rel / "app.py").write_text(APP.format(body=app_body, tag=tag))
        # workers.command replaces the built-in worker's app: a config may not name both.
        values = {**self.workers, **({} if "command" in workers else {"app": "app:app"}), **workers}
        # json.dumps renders str, numbers and lists of str as valid TOML values.
        lines = ["[app]", f"name = {json.dumps(self.name)}", f"root = {json.dumps(str(self.root))}",
                 "[workers]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()),
                 "[upgrade]", f"timeout = {self.upgrade_timeout}",
                 "[control]", f"socket = {json.dumps(str(self.socket))}"]
        (rel / "cadenza.toml").write_text("\n".join(lines) + "\n" + config_extra)
        if venv:
            self._venv(rel / ".venv")
        return rel

    def _venv(self, venv: Path) -> None:
        subprocess.run([base_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
        site = venv / "lib" / PY_DIR / "site-packages"
        (site / "cadenza_project.pth").write_text(f"import site; site.addsitedir({str(PROJECT_SITE)!r})\n")
        for program, module in (("cadenza", "cadenza.cli"), ("supervisorctl", "cadenza.supervisorctl")):
            script = venv / "bin" / program
            script.write_text(SCRIPT.format(python=venv / "bin" / "python", module=module))
            script.chmod(0o755)

    def switch(self, tag: str) -> None:
        """Point `current` at a release atomically, the way deploy tools do (rename over it)."""
        tmp = self.root / f".current.{tag}"
        tmp.symlink_to(Path("releases") / tag)
        os.replace(tmp, self.root / "current")

    def deploy(self, tag: str, **kw) -> Path:
        rel = self.release(tag, **kw)
        self.switch(tag)
        return rel

    def releases(self) -> list[str]:
        # Tags sort by deploy order when the tests name them so (r1 < r2 ... r9).
        return sorted(p.name for p in (self.root / "releases").iterdir())

    def prune(self, keep: int = 2) -> list[str]:
        """Delete all but the `keep` newest releases, venvs included; returns the deleted tags."""
        doomed = self.releases()[:-keep]
        for tag in doomed:
            shutil.rmtree(self.path(tag))
        return doomed

    def pin(self) -> None:
        subprocess.run([str(PROJECT_VENV / "bin" / "cadenza"), "pin", "--root", str(self.root)], check=True)

    def units(self) -> dict[str, str]:
        bin_dir = self.root / "shared" / "bin"
        # reload = up to upgrade.timeout for the next generation, plus the old one's drain.
        reload_budget = int(self.upgrade_timeout + self.workers["graceful_timeout"] + 10)
        service = f"""\
            [Unit]
            Requires={self.name}.socket
            After={self.name}.socket

            [Service]
            Type=notify
            NotifyAccess=main
            KillMode=mixed
            ExecStart={bin_dir}/cadenza run
            WorkingDirectory=-{self.root}/current
            ExecReload={bin_dir}/supervisorctl upgrade
            TimeoutStartSec={max(reload_budget, int(self.workers['ready_timeout']) + 10)}
            TimeoutStopSec={int(self.workers['graceful_timeout']) + 10}
            Restart=on-failure
            RestartPreventExitStatus=64 73 78
            """
        sock = f"[Socket]\nListenStream=127.0.0.1:{self.port}\n"
        return {f"{self.name}.service": textwrap.dedent(service), f"{self.name}.socket": sock}
