"""The shipped units (units/, rendered by `cadenza units`), hardened, in a real systemd 252; the
control plane through them: a truthful `systemctl reload`, `status -u`, `doctor`.

The app root lives outside /tmp and /home (tempfile under /var/lib), because the hardened unit
has PrivateTmp= and ProtectHome=: an app under /tmp would be invisible to its own service.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import sdns

from procs import VENV_BIN, Client, free_port, get

CADENZA = str(VENV_BIN / "cadenza")
APP = "shop"


class Root:
    """ROOT/releases/N/cadenza.toml, ROOT/current, shared venv pinned with --python."""

    def __init__(self, port: int):
        self.path = Path(tempfile.mkdtemp(prefix="cadenza-units-", dir="/var/lib"))
        os.chmod(self.path, 0o755)
        self.port = port
        self.n = 0

    def deploy(self, app: str = "cadenza.demo:app", extra: str = "") -> None:
        self.n += 1
        rel = self.path / "releases" / str(self.n)
        rel.mkdir(parents=True)
        (rel / "cadenza.toml").write_text(
            f'[app]\nname = "{APP}"\nroot = "{self.path}"\n[workers]\ncount = 2\napp = "{app}"\n'
            f'ready_timeout = 10\ngraceful_timeout = 5\n[upgrade]\ntimeout = 10\n{extra}')
        tmp = self.path / "current.tmp"
        tmp.symlink_to(f"releases/{self.n}")
        os.replace(tmp, self.path / "current")

    def cadenza(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CADENZA, *args], capture_output=True, text=True, check=True)


@pytest.fixture
def root():
    r = Root(free_port())
    r.deploy()
    r.cadenza("pin", "--root", str(r.path), "--python", sys.executable)
    yield r
    shutil.rmtree(r.path, ignore_errors=True)


def install(ns, root: Root) -> dict[str, str]:
    out = ns.state / "rendered"
    root.cadenza("units", "--name", APP, "--root", str(root.path), "--listen", f"127.0.0.1:{root.port}",
                 "-o", str(out))
    units = {name: (out / name).read_text() for name in (f"{APP}.service", f"{APP}.socket")}
    for name, text in units.items():
        ns.write_unit(name, text)
    # The shipped hardening hides /tmp, /var/tmp, /home and /root from the service; a checkout
    # (and so the venv the service runs from) that CI placed there is bound back in, read-only.
    if dropin := sdns.hardening_dropin():
        ns.write_unit(f"{APP}.service.d/checkout.conf", dropin)
    ns.systemctl("daemon-reload", check=True)
    ns.systemctl("start", f"{APP}.socket", check=True)
    return units


def ctl(ns, root: Root, *args: str) -> subprocess.CompletedProcess:
    # Inside the namespace: the control socket is in the unit's RuntimeDirectory there.
    return ns.run(str(root.path / "shared/bin/supervisorctl"), *args, timeout=60)


def test_rendered_units_pass_systemd_analyze(root, tmp_path):
    units = tmp_path / "units"
    root.cadenza("units", "--name", APP, "--root", str(root.path), "--listen", "127.0.0.1:8000",
                 "--listen", "unix:/run/shop/http.sock;mode=0660", "-o", str(units))
    service = (units / f"{APP}.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "KillMode=mixed", f"WorkingDirectory=-{root.path}/current",
                 f"ExecReload={root.path}/shared/bin/supervisorctl upgrade", "TimeoutStartSec=45",
                 "TimeoutStopSec=35", f"RuntimeDirectory=cadenza/{APP}", "Restart=on-failure"):
        assert line in service.splitlines(), line
    proc = subprocess.run(["systemd-analyze", "verify", "--recursive-errors=no",
                           str(units / f"{APP}.service"), str(units / f"{APP}.socket")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=40",
                           str(units / f"{APP}.service")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    exposure = float(proc.stdout.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert exposure <= 4.0


def test_template_instance_passes_systemd_analyze(systemd_factory):
    with systemd_factory(extra_tmpfs=("/srv",)) as ns:
        srv = ns.host_path("/srv/demo/shared/bin")
        srv.mkdir(parents=True)
        for program in ("cadenza", "supervisorctl"):
            (srv / program).write_text("#!/bin/sh\n")
            (srv / program).chmod(0o755)
        units = Path(__file__).resolve().parent.parent / "units"
        ns.write_unit("cadenza@.service", (units / "cadenza@.service").read_text())
        ns.write_unit("cadenza@.socket", (units / "cadenza@.socket").read_text())
        proc = ns.run("systemd-analyze", "verify", "--recursive-errors=no",
                      str(ns.state / "units/cadenza@demo.service"), str(ns.state / "units/cadenza@demo.socket"))
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_hardened_unit_serves_upgrades_reports_and_stops(systemd, root):
    ns = systemd
    install(ns, root)
    assert get(root.port)[0] == 200                    # socket activation starts it
    ns.wait_for(f"{APP}.service", "ActiveState", "active")
    first = ns.show(f"{APP}.service", "MainPID")["MainPID"]

    client = Client(root.port)
    try:
        root.deploy()
        reload = ns.systemctl("reload", f"{APP}.service")
        assert reload.returncode == 0, reload.stderr + ns.journal("-n", "40")
        after = ns.show(f"{APP}.service", "MainPID", "NRestarts", "ActiveState")
        assert after["MainPID"] != first and after["NRestarts"] == "0" and after["ActiveState"] == "active"
        assert "releases/2" in get(root.port)[1]

        root.deploy(app="no_such_module:app")
        reload = ns.systemctl("reload", f"{APP}.service")
        assert reload.returncode != 0
        assert ns.show(f"{APP}.service", "MainPID")["MainPID"] == after["MainPID"]
        assert "releases/2" in get(root.port)[1]
        assert "no_such_module" in ns.journal("-o", "cat")
    finally:
        client.stop()
    assert client.failures == []

    st = json.loads(ctl(ns, root, "status", "--json").stdout)
    assert st["unit"]["ActiveState"] == "active" and str(st["unit"]["MainPID"]) == after["MainPID"]
    assert st["last_upgrade"]["ok"] is False and "no_such_module" in "\n".join(st["last_upgrade"]["output"])
    doctor = ctl(ns, root, "doctor")
    assert "is not current" in doctor.stdout          # running release 2 while current is 3
    root.deploy()
    assert ns.systemctl("reload", f"{APP}.service").returncode == 0
    doctor = ctl(ns, root, "doctor")
    assert doctor.returncode == 0 and "has what an upgrade needs (systemd 252" in doctor.stdout, doctor.stdout

    assert ns.systemctl("stop", f"{APP}.service", f"{APP}.socket").returncode == 0
    assert ns.show(f"{APP}.service", "ActiveState")["ActiveState"] == "inactive", ns.journal("-n", "60")


def test_status_during_an_upgrade_shows_both_generations(systemd, root):
    ns = systemd
    install(ns, root)
    get(root.port)
    ns.wait_for(f"{APP}.service", "ActiveState", "active")
    root.deploy(app="slowapp:app")
    (root.path / "current/slowapp.py").write_text(
        "import time\ntime.sleep(3)\nfrom cadenza.demo import app\n")
    assert ns.systemctl("reload", "--no-block", f"{APP}.service").returncode == 0
    ns.wait_for(f"{APP}.service", "ActiveState", "reloading")
    # "reloading" starts with ExecReload's process; the master hears of it a moment later.
    deadline = time.monotonic() + 10
    while not (st := json.loads(ctl(ns, root, "status", "--json").stdout))["upgrading"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st["generation"] == 1 and st["state"] == "upgrading" and st["main"]
    assert st["upgrading"]["generation"] == 2 and st["upgrading"]["release"].endswith("/releases/2")
    text = ctl(ns, root, "status").stdout
    assert "generation 1 upgrading" in text and "upgrading to generation 2" in text
    ns.wait_for(f"{APP}.service", "ActiveState", "active", timeout=20)
    assert json.loads(ctl(ns, root, "status", "--json").stdout)["generation"] == 2


def test_doctor_names_what_would_break_an_upgrade(systemd, root):
    ns = systemd
    units = install(ns, root)
    service = units[f"{APP}.service"]
    bad = (service.replace("KillMode=mixed", "KillMode=control-group")
                  .replace(f"WorkingDirectory=-{root.path}", f"WorkingDirectory={root.path}")
                  .replace("TimeoutStartSec=45", "TimeoutStartSec=5"))
    bad = "\n".join("ExecReload=/bin/kill -USR2 $MAINPID" if line.startswith("ExecReload=") else line
                    for line in bad.splitlines()) + "\n"
    ns.write_unit(f"{APP}.service", bad)
    ns.systemctl("daemon-reload", check=True)
    get(root.port)
    ns.wait_for(f"{APP}.service", "ActiveState", "active")
    doctor = ctl(ns, root, "doctor")
    assert doctor.returncode == 1
    for text in ("only sends a signal", "KillMode=control-group", "without '-'", "TimeoutStartSec=5s"):
        assert text in doctor.stdout, doctor.stdout


def test_a_user_not_allowed_gets_exit_4(systemd, root):
    ns = systemd
    install(ns, root)
    get(root.port)
    ns.wait_for(f"{APP}.service", "ActiveState", "active")
    # supervisorctl from a copy nobody can read wherever this checkout lives (it needs no pystemd
    # for status and upgrade), run by the Debian python as nobody inside the namespace.
    lib = ns.state / "lib"
    shutil.copytree(Path(__file__).resolve().parent.parent / "src" / "cadenza", lib / "cadenza")
    for path in [lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    sock = f"/run/cadenza/{APP}/control.sock"

    def as_nobody(*args):
        code = f"import sys; sys.path.insert(0, {str(lib)!r}); from cadenza.supervisorctl import main; " \
               f"sys.exit(main({['-s', sock, *args]!r}))"
        return ns.run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                      "/usr/bin/python3", "-c", code)

    proc = as_nobody("status")                        # the runtime directory's mode keeps nobody out
    assert proc.returncode == 4 and "permission denied" in proc.stderr, proc.stderr
    ns.run("chmod", "o+x", f"/run/cadenza/{APP}", check=True)
    ns.run("chmod", "o+rw", sock, check=True)
    proc = as_nobody("upgrade")                       # past the modes, SO_PEERCRED decides
    # Refused at accept (SO_PEERCRED), before the request is read: no slot is taken.
    assert proc.returncode == 4 and "permission denied: uid 65534 may not use this control socket" in proc.stderr, proc.stderr
    assert "denied to uid 65534" in ns.journal("-o", "cat")
    assert ns.show(f"{APP}.service", "ActiveState")["ActiveState"] == "active"


def test_a_canary_s_judgement_and_growth_fit_in_the_rendered_reload_timeout(tmp_path):
    from cadenza.tools.unitfiles import timeouts
    rel = tmp_path / "releases" / "r1"
    rel.mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/r1")
    (rel / "cadenza.toml").write_text(
        '[app]\nname = "shop"\n[workers]\ncount = 4\nready_timeout = 10\ngraceful_timeout = 5\n'
        '[upgrade]\ntimeout = 20\ncanary = 1\ncanary_duration = 60\n')
    start, stop = timeouts(tmp_path)
    # the canary's start (20) + its judgement (60) + 3 workers one by one (3 x 20) + the drain (5) + 30
    assert (start, stop) == (20 + 60 + 3 * 20 + 5 + 30, 35), (start, stop)
