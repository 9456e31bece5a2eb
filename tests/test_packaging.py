"""The Debian package (packaging/): built once per session with `bash packaging/build-deb.sh`,
then installed with apt into a real systemd 252 booted on an overlay of the host's root
(tests/sdns.py, overlay=True), used as an operator would (pin, enable the socket, serve, deploy,
`systemctl reload`), and purged, leaving nothing behind inside, and nothing changed on the host.
Then run under `User=` (a drop-in), as an unprivileged system user who alone, with root, may use
the control socket.

CADENZA_DEB=/path/to/cadenza_X_ARCH.deb tests that package instead of building one.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

import sdns
import tally

REPO = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
VENV = "/opt/venvs/cadenza"
# Debian's tools, never a pyenv shim or the test's venv (pip's settings and proxies pass).
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
INSIDE_ENV = dict(sdns.INNER_ENV, DEBIAN_FRONTEND="noninteractive")
CONFIG = """\
[app]
name = "demo"
root = "/srv/demo"

[workers]
app = "cadenza.demo:app"
count = 2

[control]
socket = "/run/cadenza/demo/control.sock"
"""
GET = ("import urllib.request; "
       "print(urllib.request.urlopen('http://127.0.0.1:8000/', timeout=20).read().decode(), end='')")

# The build (about 40 s: it compiles pystemd) and the boot share a test's time limit.
pytestmark = pytest.mark.timeout(600)


def host(*cmd: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(env, PATH=HOST_PATH, LANG="C.UTF-8"))


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    if os.environ.get("CADENZA_DEB"):
        return Path(os.environ["CADENZA_DEB"])
    # Where CI runs (CADENZA_REQUIRE_SYSTEMD=1: Debian, root) the package must be built and tested.
    give_up = pytest.fail if os.environ.get("CADENZA_REQUIRE_SYSTEMD") == "1" else pytest.skip
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get", path=HOST_PATH) is None:
        give_up("the package is built on Debian (apt-get, dpkg-buildpackage)")
    if os.geteuid() != 0:
        give_up("build-deb.sh installs its build dependencies: root only (or set CADENZA_DEB)")
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    build = host("bash", str(REPO / "packaging" / "build-deb.sh"), str(out), timeout=900)
    if build.returncode != 0:
        pytest.fail(f"build-deb.sh failed ({build.returncode}):\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}")
    debs = list(out.glob("*.deb"))
    assert len(debs) == 1, (debs, build.stdout[-2000:])
    print(f"built {debs[0].name} ({debs[0].stat().st_size} bytes) in {time.monotonic() - t0:.1f}s")
    return debs[0]


@pytest.fixture(scope="session")
def supervisor_debs(tmp_path_factory) -> list[Path]:
    """Debian's supervisor package, plus those of its dependencies the host lacks (the
    namespace has no network, so they are fetched here)."""
    out = tmp_path_factory.mktemp("supervisor")

    def download(*names: str) -> None:
        # The sandbox user _apt could not write the pytest temp dir.
        cmd = ("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *names)
        if host(*cmd, cwd=out).returncode != 0:
            host("apt-get", "update", "-qq", timeout=300)   # no package lists yet
            got = host(*cmd, cwd=out)
            assert got.returncode == 0, f"apt-get download {' '.join(names)}:\n{got.stderr}"

    download("supervisor")
    (sup,) = out.glob("supervisor_*.deb")
    plan = host("apt-get", "install", "--simulate", "--no-install-recommends", "-q", f"./{sup.name}", cwd=out)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    missing = [m for m in re.findall(r"^Inst (\S+)", plan.stdout, re.M) if m != "supervisor"]
    if missing:
        download(*missing)
    return sorted(out.glob("*.deb"))


class Entry(NamedTuple):
    type: bytes       # tarfile's: DIRTYPE, SYMTYPE, REGTYPE ...
    linkname: str
    content: bytes


def members(deb: Path) -> dict[str, Entry]:
    """The package's files by absolute path, read from its data archive (about 20 MB)."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {posixpath.normpath("/" + info.name):
                Entry(info.type, info.linkname, tar.extractfile(info).read() if info.isfile() else b"")
                for info in tar.getmembers()}


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_deb_carries_a_venv_the_unit_templates_and_nothing_of_supervisor(deb, supervisor_debs):
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    assert deb.name == f"cadenza_{VERSION}_{arch}.deb"
    py = os.path.basename(os.path.realpath("/usr/bin/python3"))   # python3.11 on Debian 12
    depends = field(deb, "Depends")
    assert py in depends.split(", ") and "libsystemd0" in depends, depends

    files = members(deb)
    for template in ("cadenza@.service", "cadenza@.socket"):   # one source: units/
        assert files[f"/lib/systemd/system/{template}"].content == (REPO / "units" / template).read_bytes()
    assert files["/usr/bin/cadenza"].linkname == f"{VENV}/bin/cadenza"
    assert files[f"{VENV}/bin/python"].type == tarfile.SYMTYPE
    assert files[f"{VENV}/bin/{py}"].linkname == f"/usr/bin/{py}"
    # pystemd compiled here, against libsystemd-dev: a wheel tagged for this platform, not manylinux.
    (wheel,) = [f for n, f in files.items() if re.search(r"/site-packages/pystemd-[^/]+\.dist-info/WHEEL$", n)]
    assert re.search(rb"^Tag: cp3\d+-cp3\d+-linux_", wheel.content, re.M), wheel.content
    outside = {n for n in files if not n.startswith((f"{VENV}/", "/usr/share/doc/cadenza/"))}
    assert outside == {"/", "/lib", "/lib/systemd", "/lib/systemd/system", "/opt", "/opt/venvs", VENV,
                       "/usr", "/usr/bin", "/usr/share", "/usr/share/doc", "/usr/share/doc/cadenza",
                       "/lib/systemd/system/cadenza@.service", "/lib/systemd/system/cadenza@.socket",
                       "/usr/bin/cadenza"}

    # Co-installable with Debian's supervisor: no path but shared directories in common.
    (sup,) = [d for d in supervisor_debs if d.name.startswith("supervisor_")]
    theirs = {n for n, f in members(sup).items() if f.type != tarfile.DIRTYPE}
    assert "/usr/bin/supervisorctl" in theirs
    assert not theirs & {n for n, f in files.items() if f.type != tarfile.DIRTYPE}


def test_installed_it_serves_upgrades_on_reload_and_purges_without_a_trace(deb, supervisor_debs,
                                                                              systemd_factory):
    watched = ("/opt/venvs/cadenza", "/usr/bin/cadenza", "/lib/systemd/system/cadenza@.service",
               "/srv/demo", "/var/lib/dpkg/info/cadenza.list")
    before = host_state(watched)
    # A private netns: the template listens on 127.0.0.1:8000, which must not clash with the
    # host's; and apt cannot fetch anything, so installing proves the dependencies are there.
    with systemd_factory(net="private", overlay=True) as ns:
        for d in (deb, *supervisor_debs):
            shutil.copy(d, ns.state)
        debs = "/run/sdns"

        # Debian's supervisor first (kept from starting: only its files matter here).
        # No man-db trigger either (it reindexes every manual page: seconds).
        sh(ns, "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; "
               "rm -f /var/lib/man-db/auto-update")
        sh(ns, "dpkg -i " + " ".join(f"{debs}/{d.name}" for d in supervisor_debs), timeout=120)
        sh(ns, "rm /usr/sbin/policy-rc.d")

        out = sh(ns, f"apt-get install -y --no-install-recommends {debs}/{deb.name}", timeout=120)
        assert "Need to get 0 B" in out, out
        assert sh(ns, "cadenza --version").strip() == f"cadenza {VERSION}"
        assert sh(ns, "readlink -f /usr/bin/cadenza").strip() == f"{VENV}/bin/cadenza"
        assert sh(ns, "dpkg -S /usr/bin/supervisorctl").strip() == "supervisor: /usr/bin/supervisorctl"
        # Templates: installed, known to systemd, neither enabled nor started.
        listed = sh(ns, "systemctl list-unit-files --no-legend 'cadenza@*'").split("\n")
        assert sorted(line.split()[:2] for line in listed if line) == [
            ["cadenza@.service", "disabled"], ["cadenza@.socket", "disabled"]], listed
        assert sh(ns, "systemctl list-units --all --no-legend 'cadenza@*'").strip() == ""
        assert sh(ns, "find /etc/systemd/system -name 'cadenza*'").strip() == ""

        # An app, as DESIGN §1 has it; a pinned launcher into the package's venv.
        deploy(ns, "1")
        # --unit: the pinned supervisorctl would otherwise ask systemd about demo.service.
        sh(ns, f"cadenza pin --root /srv/demo --python {VENV}/bin/python --unit cadenza@demo")
        sh(ns, "systemctl enable --now cadenza@demo.socket")
        assert ns.show("cadenza@demo.service", "FragmentPath") == {
            "FragmentPath": "/lib/systemd/system/cadenza@.service"}
        reply = sh(ns, f"python3 -c \"{GET}\"")
        assert re.fullmatch(r"hello from cadenza worker \d gen 1 pid \d+ release /srv/demo/releases/1\n", reply)
        # A reload queued while the start job runs merges into it: wait for the start to end.
        ns.wait_for("cadenza@demo.service", "ActiveState", "active", timeout=30)
        first = ns.show("cadenza@demo.service", "MainPID")["MainPID"]

        deploy(ns, "2")
        sh(ns, "systemctl reload cadenza@demo", timeout=120)
        props = ns.show("cadenza@demo.service", "ActiveState", "MainPID", "StatusText")
        assert props["ActiveState"] == "active" and props["MainPID"] not in ("0", first), props
        assert props["StatusText"].startswith("generation 2 serving"), props
        reply = sh(ns, f"python3 -c \"{GET}\"")
        assert re.fullmatch(r"hello from cadenza worker \d gen 2 pid \d+ release /srv/demo/releases/2\n", reply)
        status_then_stop(ns, props["MainPID"])
        sh(ns, "systemctl disable cadenza@demo.socket")
        sh(ns, "apt-get purge -y cadenza", timeout=120)
        gone = ns.run("dpkg", "-L", "cadenza", env=INSIDE_ENV)
        assert gone.returncode != 0 and gone.stdout == "", gone
        left = sh(ns, "find /opt /usr /lib/systemd /etc /var/lib/dpkg/info -name '*cadenza*'")
        assert left == "", left
        units = ns.systemctl("list-unit-files", "cadenza@*")
        assert "0 unit files listed." in units.stdout, units
        # Nothing of supervisor's was touched either (dpkg checks every file's md5sum).
        assert sh(ns, "dpkg --verify supervisor").strip() == ""
    assert host_state(watched) == before


# Inside the namespace: GETs until the file argv[1] exists; "polling" once the first one was
# answered, then at the end one JSON line with what it saw.
POLL = """\
import json, os, re, sys, time, urllib.request
ok, failures, generations = 0, [], set()
while not os.path.exists(sys.argv[1]):
    try:
        body = urllib.request.urlopen('http://127.0.0.1:8000/', timeout=20).read().decode()
        generations.add(int(re.search(r' gen (\\d+) ', body)[1]))
        ok += 1
        if ok == 1:
            print("polling", flush=True)
    except Exception as exc:
        failures.append(repr(exc))
    time.sleep(0.02)
print(json.dumps({"ok": ok, "failures": failures, "generations": sorted(generations)}))
"""


def test_under_user_it_runs_unprivileged_and_keeps_its_control_socket(deb, systemd_factory):
    """The shipped template with `User=demo` in a drop-in: master, workers and ExecReload run as
    an unprivileged system user, the control socket is that user's alone (0660 in a 0750
    RuntimeDirectory), root keeps control, other users are refused, and reload upgrades."""
    passwd = Path("/etc/passwd").read_bytes()
    with systemd_factory(net="private", overlay=True) as ns:
        shutil.copy(deb, ns.state)
        sh(ns, "rm -f /var/lib/man-db/auto-update")   # no man-db trigger (seconds)
        sh(ns, f"apt-get install -y --no-install-recommends /run/sdns/{deb.name}", timeout=120)

        # The service user, and a deployer in its group (gets through the file modes).
        sh(ns, "useradd --system --user-group --no-create-home --home-dir /nonexistent "
               "--shell /usr/sbin/nologin demo; "
               "useradd --system --user-group --no-create-home --home-dir /nonexistent "
               "--shell /usr/sbin/nologin --groups demo deployer")
        uid, gid = (int(n) for n in sh(ns, "id -u demo; id -g demo").split())
        # What an operator deploys: everything root's, nothing writable but by root.
        sh(ns, "install -d -o root -g root -m 0755 /srv/demo /srv/demo/releases /srv/demo/shared")
        deploy(ns, "1")
        sh(ns, f"cadenza pin --root /srv/demo --python {VENV}/bin/python --unit cadenza@demo")
        layout = sh(ns, "cd /srv/demo && stat -c '%n %U:%G %a' . releases releases/1 "
                        "releases/1/cadenza.toml shared shared/bin shared/bin/cadenza "
                        "shared/bin/supervisorctl").splitlines()
        assert layout == [". root:root 755", "releases root:root 755", "releases/1 root:root 755",
                          "releases/1/cadenza.toml root:root 644", "shared root:root 755",
                          "shared/bin root:root 755", "shared/bin/cadenza root:root 755",
                          "shared/bin/supervisorctl root:root 755"], layout

        sh(ns, "mkdir -p /etc/systemd/system/cadenza@demo.service.d && "
               "printf '[Service]\\nUser=demo\\nGroup=demo\\n' "
               "> /etc/systemd/system/cadenza@demo.service.d/user.conf && "
               "systemctl daemon-reload && systemctl start cadenza@demo.socket")
        assert ns.show("cadenza@demo.service", "User", "Group") == {"User": "demo", "Group": "demo"}
        reply = sh(ns, f"python3 -c \"{GET}\"")   # socket activation starts the service
        assert re.fullmatch(r"hello from cadenza worker \d gen 1 pid \d+ release /srv/demo/releases/1\n", reply)
        ns.wait_for("cadenza@demo.service", "ActiveState", "active", timeout=30)
        first = ns.show("cadenza@demo.service", "MainPID")["MainPID"]

        def processes() -> dict[int, str]:
            """Every process of the service (its cgroup), with its Uid: and Gid: lines."""
            cgroup = ns.show("cadenza@demo.service", "ControlGroup")["ControlGroup"]
            pids = [int(p) for p in sh(ns, f"cat /sys/fs/cgroup{cgroup}/cgroup.procs").split()]
            ids = {}
            for pid in pids:
                lines = sh(ns, f"grep -E '^(Uid|Gid):' /proc/{pid}/status || true").split("\n")
                if lines[0]:   # an ExecReload= that ended meanwhile has no status left
                    ids[pid] = " ".join(" ".join(line.split()[1:]) for line in lines if line)
            return ids

        def serving(generation: int) -> dict:
            """The master's status (asked by root, who may always ask), once every worker is ready."""
            deadline = time.monotonic() + 30
            while True:
                st = json.loads(sh(ns, "/srv/demo/shared/bin/supervisorctl status --json"))
                ready = [w for w in st["workers"] if w["state"] == "ready"]
                if st["generation"] == generation and len(ready) == 2 and not st["upgrading"]:
                    return st
                assert time.monotonic() < deadline, st
                time.sleep(0.1)

        def check_ownership(generation: int) -> None:
            st = serving(generation)
            mine = f"{uid} {uid} {uid} {uid} {gid} {gid} {gid} {gid}"   # real, effective, saved, fs
            ids = processes()
            assert {st["pid"], *(w["pid"] for w in st["workers"])} <= set(ids), (st, ids)
            assert set(ids.values()) == {mine}, ids
            assert sh(ns, f"ps -o user= -p {st['pid']}").strip() == "demo"
            sockets = sh(ns, "stat -c '%n %U:%G %a %A' /run/cadenza /run/cadenza/demo "
                             "/run/cadenza/demo/control.sock").splitlines()
            assert sockets == ["/run/cadenza root:root 755 drwxr-xr-x",
                               "/run/cadenza/demo demo:demo 750 drwxr-x---",
                               "/run/cadenza/demo/control.sock demo:demo 660 srw-rw----"], sockets

        check_ownership(1)
        assert ns.show("cadenza@demo.service", "StatusText")["StatusText"].startswith("generation 1 serving")

        # Others: nobody cannot even reach the socket (the 0750 directory); a member of the
        # service's group can, and the master refuses it by its uid (SO_PEERCRED).
        ctl = "/srv/demo/shared/bin/supervisorctl"
        refused = ns.run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                         ctl, "status", env=INSIDE_ENV)
        assert refused.returncode == 4, refused
        assert refused.stderr == ("supervisorctl: permission denied on /run/cadenza/demo/control.sock: "
                                  "ask for access to the control socket (control.allow_users / "
                                  "allow_groups)\n"), refused
        deployer = int(sh(ns, "id -u deployer"))
        as_deployer = ("setpriv", "--reuid=deployer", "--regid=deployer", "--init-groups", ctl)
        refused = ns.run(*as_deployer, "upgrade", env=INSIDE_ENV)
        assert refused.returncode == 4, refused
        assert f"permission denied: uid {deployer} may not use this control socket" in refused.stderr, refused
        refused = ns.run(*as_deployer, "status", env=INSIDE_ENV)
        assert refused.returncode == 4, refused
        assert f"permission denied: uid {deployer} may not use this control socket" in refused.stderr, refused
        journal = ns.journal("-u", "cadenza@demo.service")
        assert re.search(rf"control: denied to uid {deployer} \(pid \d+\)", journal), journal

        # The upgrade: ExecReload= runs the pinned supervisorctl as demo, which the master obeys.
        stop = ns.state / "stop-polling"
        poller = ns.popen("python3", "-c", POLL, str(stop), stdout=subprocess.PIPE, text=True)
        assert poller.stdout.readline() == "polling\n"
        deploy(ns, "2")
        sh(ns, "systemctl reload cadenza@demo", timeout=120)
        props = ns.show("cadenza@demo.service", "ActiveState", "MainPID", "StatusText")
        assert props["ActiveState"] == "active" and props["MainPID"] not in ("0", first), props
        assert props["StatusText"].startswith("generation 2 serving"), props   # not 3: refused above
        # The pinned supervisorctl of ExecReload= spoke as the service user.
        journal = ns.journal("-u", "cadenza@demo.service")
        assert re.search(rf"control: upgrade from pid \d+ uid {uid}$", journal, re.M), journal
        check_ownership(2)
        assert serving(2)["pid"] == int(props["MainPID"])
        reply = sh(ns, f"python3 -c \"{GET}\"")
        assert re.fullmatch(r"hello from cadenza worker \d gen 2 pid \d+ release /srv/demo/releases/2\n", reply)
        stop.touch()
        polled = json.loads(poller.communicate(timeout=30)[0])
        tally.add(polled["ok"], len(polled["failures"]))
        assert polled["failures"] == [] and polled["generations"] == [1, 2], polled
        status_then_stop(ns, props["MainPID"])
        # RuntimeDirectory= goes with the service, the control socket with it.
        assert sh(ns, "ls -A /run/cadenza").strip() == ""
    assert Path("/etc/passwd").read_bytes() == passwd   # the users lived in the overlay only


def status_then_stop(ns, main_pid: str) -> None:
    """Root's `supervisorctl status` after the reload to release 2, then a drained stop."""
    # The unit's state comes over pystemd, which the package compiled.
    status = sh(ns, "/srv/demo/shared/bin/supervisorctl status")
    assert "generation 2 serving" in status and "/srv/demo/releases/2" in status, status
    assert f"ActiveState=active SubState=running MainPID={main_pid} " in status, status
    sh(ns, "systemctl stop cadenza@demo.service cadenza@demo.socket")
    # Drained, not killed: the heir is not an alien MainPID to systemd (KillMode=mixed).
    assert ns.show("cadenza@demo.service", "ActiveState", "Result") == {
        "ActiveState": "inactive", "Result": "success"}
    assert "SIGKILL" not in ns.journal("-u", "cadenza@demo.service")


def sh(ns, script: str, timeout: float = 60) -> str:
    """Run a shell script inside; its stdout, or a failure that shows both streams."""
    proc = ns.run("bash", "-euo", "pipefail", "-c", script, env=INSIDE_ENV, timeout=timeout)
    assert proc.returncode == 0, f"{script}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n" \
                                 f"--- journal ---\n{ns.journal('-n', '30')}"
    return proc.stdout


def deploy(ns, tag: str) -> None:
    """A release with its config, then `current` switched to it atomically."""
    release = f"/srv/demo/releases/{tag}"
    sh(ns, f"mkdir -p {release} && cat > {release}/cadenza.toml <<'EOF'\n{CONFIG}EOF\n"
           f"ln -sfn releases/{tag} /srv/demo/current.new && mv -T /srv/demo/current.new /srv/demo/current")


def host_state(paths: tuple[str, ...]) -> dict:
    state = {p: os.path.lexists(p) for p in paths}
    st = os.stat("/var/lib/dpkg/status")
    state["dpkg status"] = (st.st_mtime_ns, st.st_size)
    return state
