"""`cadenza run` settings, for real: [workers.env] and CADENZA_HTTP in the workers' environment,
`--app MODULE`, `--bind localhost:PORT`, and two demos side by side as a user that is not root,
each with its control socket in that user's runtime directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cadenza.control.socketfile import ControlError, bind_socket
from procs import CADENZA, VENV_BIN, cmdline, free_port, get

PROGRAMS = Path(__file__).parent / "programs"
NOBODY = 65534

# An app named by its module only: `application` is what "envapp" means.
ENVAPP = '''\
import json, os

def application(environ, start_response):
    body = json.dumps({k: os.environ.get(k) for k in ("GREETING", "CADENZA_HTTP", "CADENZA_WORKER_ID")})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]
'''


def own_control(tmp_path: Path) -> str:
    return f'[control]\nsocket = "{tmp_path / "control.sock"}"\n'


def test_builtin_workers_get_workers_env_and_http_and_app_means_application(start, tmp_path):
    (tmp_path / "envapp.py").write_text(ENVAPP)
    port = free_port()
    cfg = tmp_path / "cadenza.toml"
    cfg.write_text(f'[workers]\ncount = 2\napp = "envapp"\n[workers.env]\nGREETING = "hello there"\n'
                   f'[http]\nkeepalive = 2\nwsgi_threads = 4\n{own_control(tmp_path)}')
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{port}", env={"GREETING": "from the master's environment"})
    m.wait_ready(timeout=30)
    seen = {}
    deadline = time.monotonic() + 20
    while len(seen) < 2:   # both workers: the kernel picks which one accepts
        assert time.monotonic() < deadline, seen
        status, body = get(port)
        assert status == 200, body
        answer = json.loads(body)
        seen[answer["CADENZA_WORKER_ID"]] = answer
    for answer in seen.values():
        assert answer["GREETING"] == "hello there"     # [workers.env] wins over the inherited one
        http = json.loads(answer["CADENZA_HTTP"])
        assert (http["keepalive"], http["wsgi_threads"], http["protocol"]) == (2, 4, "auto")
        assert http["forwarded_allow_ips"] == ["127.0.0.1"] and http["certfile"] is None
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_command_workers_get_workers_env_but_no_http(start, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "cadenza.toml"
    cfg.write_text(f'[workers]\ncount = 1\ncommand = ["{sys.executable}", "{PROGRAMS / "envworker.py"}", "{out}"]\n'
                   f'[workers.env]\nDJANGO_SETTINGS_MODULE = "demo.settings"\nEMPTY = ""\n{own_control(tmp_path)}')
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    m.wait_ready()
    env = json.loads((out / "1.json").read_text())["env"]
    assert env["DJANGO_SETTINGS_MODULE"] == "demo.settings" and env["EMPTY"] == ""
    assert "CADENZA_HTTP" not in env and env["CADENZA_WORKER_ID"] == "1"
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_app_module_and_bind_localhost_serve(start, tmp_path):
    (tmp_path / "envapp.py").write_text(ENVAPP)
    port = free_port()
    m = start("--app", "envapp", "--bind", f"localhost:{port}", "--workers", "1",
              "--control-socket", str(tmp_path / "control.sock"))
    m.wait_ready(timeout=30)
    names = {info[4][0] for info in socket.getaddrinfo("localhost", port, 0, socket.SOCK_STREAM)}
    for host in names:   # 127.0.0.1, and ::1 where /etc/hosts says so
        status, body = get(port, host=host)
        assert status == 200 and json.loads(body)["CADENZA_WORKER_ID"] == "1", (host, body)
    assert "127.0.0.1" in names
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_a_bind_name_that_does_not_resolve_names_the_flag(start, tmp_path):
    m = start("--bind", "nothing.invalid:8000", "--control-socket", str(tmp_path / "control.sock"))
    assert m.wait_exit() == 71
    assert ('--bind "nothing.invalid:8000": cannot listen on nothing.invalid:8000: the host name '
            "'nothing.invalid' does not resolve") in m.log()


def test_units_refuse_a_host_name_that_listen_stream_cannot_take(tmp_path):
    proc = subprocess.run([CADENZA, "units", "--name", "demo", "--root", str(tmp_path), "--listen", "localhost:8000",
                           "-o", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert proc.stderr.strip() == ("cadenza units: --listen localhost:8000: ListenStream= takes a numeric address, "
                                   "not a host name; use 127.0.0.1:8000 or [::1]:8000 (repeat --listen for both)")
    assert list(tmp_path.iterdir()) == []


# ---- as a user that is not root -------------------------------------------------------------

class UserRun:
    """`cadenza run ARGS` as nobody (from root: setpriv, keeping only CAP_DAC_READ_SEARCH, so that a
    checkout in a private directory stays readable; writing needs what any user needs)."""

    def __init__(self, tmp: Path, xdg: Path, *args: str):
        self.log_path = tmp / f"user-run-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_"))}
        env["XDG_RUNTIME_DIR"] = str(xdg)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*as_user(), CADENZA, "run", *args], cwd=tmp, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, port: int, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:   # nothing tells the test when it serves but an answer
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.log()}"
            try:
                status, body = get(port, timeout=2)
                return body
            except OSError:
                assert time.monotonic() < deadline, self.log()
                time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]


def user_uid() -> int:
    return NOBODY if os.geteuid() == 0 else os.geteuid()


def ctl_as_user(xdg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    env.pop("CADENZA_CONTROL_SOCKET", None)
    return subprocess.run([*as_user(), str(VENV_BIN / "supervisorctl"), *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def user_xdg(tmp_path):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(xdg, NOBODY, NOBODY)
    return xdg


def test_two_demos_run_side_by_side_as_a_user_and_a_clash_on_one_socket_is_refused(tmp_path, user_xdg):
    first_port, second_port, clash_port = free_port(), free_port(), free_port()
    first = UserRun(tmp_path, user_xdg, "--workers", "1", "--bind", f"127.0.0.1:{first_port}")
    runs = [first]
    try:
        assert "hello from cadenza worker" in first.wait_serving(first_port)
        sock = user_xdg / "cadenza" / "cadenza" / "control.sock"
        assert sock.is_socket() and sock.stat().st_uid == user_uid(), first.log()
        inode = sock.stat().st_ino
        # The same name again: the same socket, which is the first one's. Refused, not taken.
        clash = UserRun(tmp_path, user_xdg, "--workers", "1", "--bind", f"127.0.0.1:{clash_port}")
        runs.append(clash)
        assert clash.proc.wait(30) == 73
        assert (f"not starting: another master already serves control socket {sock}; stop it first, or give this "
                "one a socket of its own: `cadenza run --control-socket PATH` (or --name NAME)") in clash.log()
        assert sock.stat().st_ino == inode
        # Another name: a socket of its own, beside it.
        second = UserRun(tmp_path, user_xdg, "--workers", "1", "--name", "second", "--bind", f"127.0.0.1:{second_port}")
        runs.append(second)
        assert "hello from cadenza worker" in second.wait_serving(second_port)
        assert get(first_port)[0] == 200
        assert [cmdline(run.proc.pid) for run in (first, second)] == ["cadenza master gen 1 [cadenza]",
                                                                   "cadenza master gen 1 [second]"]
        # supervisorctl, as that user, finds each where its master put it.
        for name, port in (("cadenza", first_port), ("second", second_port)):
            status = ctl_as_user(user_xdg, "-s", str(user_xdg / "cadenza" / name / "control.sock"), "status", "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["generation"] == 1
        found = ctl_as_user(user_xdg, "status", "--json")   # no -s: the default socket, for this user
        assert found.returncode == 0 and json.loads(found.stdout)["generation"] == 1, found.stderr
        assert [run.stop() for run in (first, second)] == [0, 0]
        assert not sock.exists()
    finally:
        for run in runs:
            if run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait()


# ---- the user's runtime directory under /tmp --------------------------------------------------

def test_a_private_runtime_directory_is_made_0700(tmp_path):
    private = tmp_path / "cadenza-uid"
    sock = bind_socket(private / "cadenza" / "demo" / "control.sock", private=private)
    sock.close()
    assert oct(private.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("make, what", [
    (lambda trap, elsewhere: (trap.mkdir(), trap.chmod(0o755)), "a directory of uid 0, mode 0755"),
    (lambda trap, elsewhere: trap.symlink_to(elsewhere), "not a directory"),
], ids=["open directory", "symlink"])
def test_a_runtime_directory_someone_else_made_first_is_refused(tmp_path, make, what):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    trap = tmp_path / "cadenza-uid"
    make(trap, elsewhere)
    with pytest.raises(ControlError) as info:
        bind_socket(trap / "cadenza" / "demo" / "control.sock", private=trap)
    assert str(info.value).startswith(f"{trap} is not this user's own private directory (it is {what}")
    assert "--control-socket PATH" in str(info.value)
    assert list(elsewhere.iterdir()) == [] and not (trap / "cadenza").exists()
