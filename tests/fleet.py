"""A fleet for the Ansible rollout tests (deploy/ansible/): hosts that are real systemd 252
instances (tests/sdns.py), each in a network namespace of its own, on a bridge, reached over SSH
by a real ansible-playbook, behind a real HAProxy.

    test process (root netns)                 switch netns (`unshare --net sleep`)
      client --> 127.0.0.1:P ============fd====> haproxy --+                  host netns (sdns)
                                                 ansible  -+- br0 10.213.57.1 -- veth -- eth0 .11 web1
                                                 -playbook |                   -- veth -- eth0 .12 web2
                                                 (ssh)     |                   -- veth -- eth0 .13 web3

The test's HAProxy listens on a socket bound in the test's own network namespace (on loopback)
and handed to it as an fd (`bind fd@N`), so the test's clients reach it as they are, while its
health checks and proxied connections start from the switch, where the hosts are. Nothing is
added to the machine's network: the bridge, the veths and the subnet live in namespaces that
vanish with their last process (the switch's sleeper, the hosts' systemd).
"""
from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import sdns
from deploy import PROJECT_SITE, PY_DIR, SCRIPT, base_python
from procs import wait as wait_until   # polls for states nothing announces

REPO = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = REPO / "deploy" / "ansible"
PLAYBOOK = ANSIBLE_DIR / "rollout.yml"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory.example.ini"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"

SUBNET = "10.213.57"           # an unusual private /24, inside the test's namespaces only
BRIDGE_IP = f"{SUBNET}.1"
# The example inventory's hosts and app (test_fleet.py checks that the file still says so).
HOSTS = {"web1": f"{SUBNET}.11", "web2": f"{SUBNET}.12", "web3": f"{SUBNET}.13"}
APP, ROOT, PORT = "demo", "/srv/demo", 8000
UNIT = f"{APP}.service"
# Apps the tests deploy: the example inventory's, and one more beside it on web1 (a shared venv).
APPS = {APP: PORT, "solo": 8001}
SSHD_UNIT = "fleet-sshd.service"

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def missing_tools() -> list[str]:
    """What the fleet needs beyond sdns, each with how to install it."""
    wanted = {"/usr/sbin/sshd": "apt-get install openssh-server",
              "/usr/lib/openssh/sftp-server": "apt-get install openssh-sftp-server",
              shutil.which("ssh") or "/usr/bin/ssh": "apt-get install openssh-client",
              shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen": "apt-get install openssh-client",
              shutil.which("haproxy", path=sdns.PATH) or "/usr/sbin/haproxy": "apt-get install haproxy",
              shutil.which("ip", path=sdns.PATH) or "/usr/sbin/ip": "apt-get install iproute2",
              shutil.which("curl", path=sdns.PATH) or "/usr/bin/curl": "apt-get install curl",
              str(ANSIBLE_PLAYBOOK): f"{sys.executable} -m pip install ansible-core "
                                     "(or bash scripts/install.sh --test)"}
    return [f"{path} ({fix})" for path, fix in wanted.items() if not os.access(path, os.X_OK)]


def _die_with_parent() -> None:
    # A SIGKILLed test must not leave a sleeper holding the switch, or an HAProxy, behind.
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(70)


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)   # by its pid: a child of ours
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Switch:
    """A network namespace held by a sleeping process of ours, with the hosts' bridge in it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        own = os.readlink("/proc/self/ns/net")
        self.proc = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"],
                                     env=sdns.INNER_ENV, preexec_fn=_die_with_parent)
        # unshare(2) happens after the fork: its netns link differs from ours once it has.
        wait_until(lambda: self._netns() not in ("", own) and self._comm() == "sleep", 10,
                   "network namespace of the switch")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "add", "br0", "type", "bridge")
        self.run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
        self.run("ip", "link", "set", "br0", "up")

    def _netns(self) -> str:
        try:
            return os.readlink(f"/proc/{self.proc.pid}/ns/net")
        except OSError:
            return ""

    def _comm(self) -> str:
        try:
            return Path(f"/proc/{self.proc.pid}/comm").read_text().strip()
        except OSError:
            return ""

    def enter(self) -> list[str]:
        """argv prefix that runs a command in the switch's network namespace (only)."""
        return ["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", "--"]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*self.enter(), *cmd], capture_output=True, text=True,
                              env=sdns.INNER_ENV, timeout=30)
        if check and proc.returncode != 0:
            raise sdns.CommandFailed(proc.returncode, list(cmd), proc.stdout, proc.stderr)
        return proc

    def stop(self) -> None:
        # The bridge and the switch's ends of the veths go with the namespace.
        _stop(self.proc, signal.SIGKILL)


SSHD_CONFIG = """\
ListenAddress 0.0.0.0
HostKey /run/sdns/ssh/ssh_host_ed25519_key
# Under /run (0755), not under the host path of the state directory, which is in /tmp: StrictModes
# refuses a key file below a directory that everyone may write.
AuthorizedKeysFile /run/sdns/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
PrintLastLog no
UseDNS no
PidFile /run/sshd-fleet.pid
MaxStartups 50:30:100
MaxSessions 30
Subsystem sftp /usr/lib/openssh/sftp-server
"""

# Debian's sshd speaks sd_notify (its ssh.service is Type=notify): started means listening.
# A session with a pty fails here ("linux_audit_write_entry failed"): the namespaces hold no
# CAP_AUDIT_WRITE. The role needs none (pipelined modules, no ansible.builtin.script).
SSHD_SERVICE = """\
[Unit]
Description=OpenSSH server of a fleet test host
[Service]
Type=notify
ExecStart=/usr/sbin/sshd -D -e -f /run/sdns/ssh/sshd_config
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755
# A stop ends every session (KillMode=control-group): the host is unreachable at once.
TimeoutStopSec=60
"""


class Host:
    """One host: a booted systemd in a private netns, its eth0 on the switch, sshd as a unit."""

    def __init__(self, name: str, ip: str):
        self.name, self.ip = name, ip
        # /root too: an empty home, so the machine's root shell startup files (a pyenv init, say)
        # do not run in every ssh session, and ansible's ~/.ansible/tmp is writable.
        self.ns = sdns.SystemdNS(net="private", extra_tmpfs=("/srv", "/root"))

    def boot(self, switch: Switch, host_key: Path, authorized_key: str) -> None:
        self.ns.start()
        ns = self.ns
        ns.run("hostname", self.name, check=True)   # its own UTS namespace; the app names it
        veth = f"v-{self.name}"
        switch.run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                   "netns", str(ns.pid1))
        switch.run("ip", "link", "set", veth, "master", "br0", "up")
        for cmd in (("ip", "link", "set", "lo", "up"), ("ip", "addr", "add", f"{self.ip}/24", "dev", "eth0"),
                    ("ip", "link", "set", "eth0", "up")):
            ns.run(*cmd, check=True)
        ssh = ns.state / "ssh"
        ssh.mkdir(mode=0o755)
        (ssh / "sshd_config").write_text(SSHD_CONFIG)
        shutil.copy(host_key, ssh / "ssh_host_ed25519_key")
        (ssh / "ssh_host_ed25519_key").chmod(0o600)
        (ssh / "authorized_keys").write_text(authorized_key)
        (ssh / "authorized_keys").chmod(0o600)
        ns.write_unit(SSHD_UNIT, SSHD_SERVICE)
        # The shipped hardening hides /tmp, /home and /root from the app's service: a checkout
        # that CI cloned there (its venv is what the releases' venvs see) is bound back in.
        if dropin := sdns.hardening_dropin():
            for app in APPS:
                ns.write_unit(f"{app}.service.d/checkout.conf", dropin)
        ns.systemctl("daemon-reload", check=True)
        self.start_sshd()

    def start_sshd(self) -> None:
        self.ns.systemctl("start", SSHD_UNIT, check=True)

    def stop_sshd(self) -> None:
        self.ns.systemctl("stop", SSHD_UNIT, check=True)

    def path(self, path: str) -> Path:
        return self.ns.host_path(path)

    def current(self, app: str = APP) -> str:
        """What /srv/APP/current points to ("releases/ID"), "" when it does not exist."""
        try:
            return os.readlink(self.path(f"/srv/{app}/current"))
        except FileNotFoundError:
            return ""

    def releases(self, app: str = APP) -> list[str]:
        try:
            return sorted(os.listdir(self.path(f"/srv/{app}/releases")))
        except FileNotFoundError:
            return []

    def complete(self, release: str, app: str = APP) -> bool:
        return self.path(f"/srv/{app}/releases/{release}/.cadenza-release").is_file()

    def unit(self, app: str = APP) -> dict[str, str]:
        return self.ns.show(f"{app}.service", "ActiveState", "MainPID", "NRestarts", "InvocationID")

    def answer(self, app: str = APP) -> str:
        """The app's answer on the host's own port, up to " pid"; "" when it does not answer."""
        proc = self.ns.run("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{APPS[app]}/")
        return proc.stdout.split(" pid")[0] if proc.returncode == 0 else ""

    def serving(self, app: str = APP) -> str:
        """The release the main generation serves, from `supervisorctl status --json`."""
        proc = self.ns.run(f"/srv/{app}/shared/bin/supervisorctl", "status", "--json", check=True)
        return os.path.basename(json.loads(proc.stdout)["release"])

    def journal(self, lines: int = 60) -> str:
        return self.ns.journal("-n", str(lines), "-o", "cat")

    def stop(self) -> None:
        self.ns.stop()


HAPROXY_CFG = """\
global
    stats socket {stats} mode 600 level admin
    log stderr format raw local0 notice
    maxconn 512

defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s

frontend fleet
    bind fd@{fd}
    default_backend {app}

backend {app}
    balance roundrobin
    option httpchk GET /
    http-check expect status 200
    default-server check inter 250ms fall 2 rise 2
{servers}
"""


class HAProxy:
    """Debian's haproxy, run by the test in the switch's netns, on a loopback socket of the test's."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.stats_path = workdir / "haproxy.sock"
        self.log_path = workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, switch: Switch) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        fd = listener.fileno()
        servers = "\n".join(f"    server {name} {ip}:{PORT}" for name, ip in HOSTS.items())
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(stats=self.stats_path, fd=fd, app=APP, servers=servers))
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True,
                               pass_fds=(fd,), env=sdns.INNER_ENV)
        assert check.returncode == 0, f"haproxy -c -f {cfg}: {check.stdout}{check.stderr}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*switch.enter(), "haproxy", "-db", "-f", str(cfg)],
                                         pass_fds=(fd,), stdout=log, stderr=subprocess.STDOUT,
                                         env=sdns.INNER_ENV, preexec_fn=_die_with_parent)
        listener.close()   # HAProxy holds it now
        wait_until(lambda: self.stats_path.exists() and self.servers(), 10, "HAProxy stats socket")

    def command(self, text: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.stats_path))
            sock.sendall(text.encode() + b"\n")
            return sock.makefile().read()

    def servers(self) -> dict[str, dict[str, str]]:
        """The backend's servers from `show stat`: status (UP, DOWN ...), chkdown (UP->DOWN
        transitions), econ, eresp, wretr ..."""
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == APP and r["svname"] in HOSTS}

    def all_up(self) -> bool:
        servers = self.servers()
        return len(servers) == len(HOSTS) and all(s["status"] == "UP" for s in servers.values())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        _stop(self.proc)


APP_PY = '''\
import os
import socket
{body}

def app(environ, start_response):
    text = f"release {release} on {{socket.gethostname()}} pid {{os.getpid()}}\\n".encode()
    if environ["PATH_INFO"] == "/health":   # what the role's health check asks (the tests' inventory)
        start_response({health!r}, [("Content-Length", str(len(text)))])
        return [text]
    start_response({status!r}, [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]
'''

# The release's own venv, as tests/deploy.py builds them: a venv of the interpreter the project
# venv was made from, which sees the project venv's site-packages (cadenza and its dependencies)
# through a .pth, with bin/cadenza and bin/supervisorctl of its own; a prune deletes it.
MAKE_VENV = f'''\
import pathlib
import subprocess
import sys

venv = pathlib.Path(".venv").absolute()
subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
site = venv / "lib" / {PY_DIR!r} / "site-packages"
(site / "cadenza_project.pth").write_text("import site; site.addsitedir(" + repr({str(PROJECT_SITE)!r}) + ")\\n")
for program, module in (("cadenza", "cadenza.cli"), ("supervisorctl", "cadenza.supervisorctl")):
    script = venv / "bin" / program
    script.write_text({SCRIPT!r}.format(python=venv / "bin" / "python", module=module))
    script.chmod(0o755)
'''


def release_tarball(directory: Path, release: str, app_body: str = "", config_extra: str = "",
                    workers: int = 2, status: str = "200 OK", health: str = "200 OK", app: str = APP) -> Path:
    """DIR/RELEASE.tar.gz: app.py answering "release RELEASE on HOST pid PID" (with `status`, and
    `health` on /health), its cadenza.toml and bin/make-venv; `app_body` runs at import,
    `config_extra` ends the config."""
    config = (f'[app]\nname = "{app}"\nroot = "/srv/{app}"\n\n'
              f'[workers]\ncount = {workers}\napp = "app:app"\nready_timeout = 15\ngraceful_timeout = 5\n\n'
              f'[upgrade]\ntimeout = 20\n{config_extra}')
    files = {"app.py": (APP_PY.format(body=app_body, release=release, status=status, health=health), 0o644),
             "cadenza.toml": (config, 0o644), "bin/make-venv": (MAKE_VENV, 0o755)}
    path = directory / f"{release}.tar.gz"
    # As `tar -czf R.tar.gz -C build .` makes it on a build machine: "./" entries, owned by the
    # builder's uid, which the role must not carry over (cadenza refuses a config root does not own).
    with tarfile.open(path, "w:gz") as tar:
        for name in ("./", "./bin/"):
            tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
        for name, (text, mode) in files.items():
            data = text.encode()
            info = _tarinfo(f"./{name}", tarfile.REGTYPE, mode)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, int(time.time())
    info.uid = info.gid = 1000
    info.uname = info.gname = "builder"
    return info


RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
                   r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)", re.M)
RECAP_FIELDS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")


@dataclass
class Run:
    rc: int
    output: str
    seconds: float

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host; a host the play never reached is not in it."""
        text = self.output.rsplit("PLAY RECAP", 1)[-1] if "PLAY RECAP" in self.output else ""
        return {m[1]: dict(zip(RECAP_FIELDS, map(int, m.groups()[1:]))) for m in RECAP.finditer(text)}

    def __repr__(self) -> str:   # what an assertion about the run shows
        return f"ansible-playbook exit {self.rc} in {self.seconds:.1f}s:\n{self.output[-6000:]}"


class Ansible:
    """ansible-playbook, run in the switch's netns with the example inventory plus a test one
    (connection settings, the key of this run, the test releases' venv command)."""

    def __init__(self, workdir: Path, switch: Switch, key: Path):
        self.dir, self.switch, self.key = workdir, switch, key
        self.controls = workdir / "cp"   # ssh ControlPath sockets
        for sub in ("home", "local", "cp", "releases"):
            (workdir / sub).mkdir(exist_ok=True)
        ssh_args = ("-o ControlMaster=auto -o ControlPersist=30s -o StrictHostKeyChecking=no "
                    "-o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o ServerAliveInterval=2 "
                    "-o ServerAliveCountMax=3 -o LogLevel=ERROR")
        self.inventory = workdir / "test.ini"
        self.inventory.write_text(
            "[cadenza:vars]\n"
            f"ansible_ssh_private_key_file={key}\n"
            f"ansible_ssh_common_args='{ssh_args}'\n"
            f"cadenza_venv_command={base_python()} bin/make-venv\n"
            f"cadenza_health_url=http://127.0.0.1:{PORT}/health\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        self.env.update(ANSIBLE_HOME=str(workdir / "home"), ANSIBLE_LOCAL_TEMP=str(workdir / "local"),
                        ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.controls), ANSIBLE_PIPELINING="True",
                        ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1", ANSIBLE_TIMEOUT="10",
                        ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_CONFIG=str(workdir / "ansible.cfg"))
        (workdir / "ansible.cfg").write_text("# empty: no ansible.cfg of the machine's applies\n")

    def playbook(self, release: str, tarball: Path, timeout: float = 240, **extra) -> Run:
        """rollout.yml for RELEASE from TARBALL; `extra` are more extra vars (cadenza_serial=3)."""
        extra_vars = self.dir / f"vars-{release}-{time.monotonic_ns()}.json"
        extra_vars.write_text(json.dumps({"cadenza_release_id": release,
                                          "cadenza_release_tarball": str(tarball), **extra}))
        argv = [*self.switch.enter(), str(ANSIBLE_PLAYBOOK), "-i", str(EXAMPLE_INVENTORY),
                "-i", str(self.inventory), str(PLAYBOOK), "-e", f"@{extra_vars}"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.dir,
                                  timeout=timeout)
        finally:
            self.close_connections()
        return Run(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)

    def close_connections(self) -> None:
        """End the ssh masters this run left (ControlPersist), each through its own socket."""
        for path in self.controls.iterdir():
            subprocess.run(["ssh", "-o", f"ControlPath={path}", "-O", "exit", "fleet"],
                           capture_output=True, timeout=15)


class Fleet:
    """The hosts, their switch, HAProxy in front and ansible-playbook, built once per module."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.switch = Switch()
        self.hosts = [Host(name, ip) for name, ip in HOSTS.items()]
        self.haproxy = HAProxy(workdir)
        self.ansible: Ansible | None = None
        self.config_extra = ""   # ends every release's cadenza.toml, in its [upgrade] table
        self._serial = 0

    def start(self) -> None:
        key = self.dir / "id_ed25519"
        host_key = self.dir / "ssh_host_ed25519_key"
        for path in (key, host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f", str(path)],
                           check=True, capture_output=True)
        self.switch.start()
        for host in self.hosts:
            host.boot(self.switch, host_key, key.with_suffix(".pub").read_text())
        self.haproxy.start(self.switch)
        self.ansible = Ansible(self.dir, self.switch, key)

    def release_id(self) -> str:
        """A fresh release id that sorts after every earlier one (a deploy timestamp's shape)."""
        self._serial += 1
        return f"20260101{self._serial:06d}"

    def tarball(self, release: str, config_extra: str = "", **kw) -> Path:
        return release_tarball(self.dir / "releases", release, config_extra=self.config_extra + config_extra, **kw)

    def rollout(self, release: str, **kw) -> Run:
        extra = {k: kw.pop(k) for k in list(kw) if k.startswith("cadenza_")}
        return self.ansible.playbook(release, self.tarball(release, **kw), **extra)

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def snapshot(self) -> dict[str, dict]:
        return {h.name: {**h.unit(), "current": h.current(), "releases": h.releases()} for h in self.hosts}

    def stop(self) -> None:
        try:
            if self.ansible is not None:
                self.ansible.close_connections()
            self.haproxy.stop()
        finally:
            for host in self.hosts:
                host.stop()
            self.switch.stop()
