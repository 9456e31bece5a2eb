"""The control socket and supervisorctl against a real master (outside systemd), shared-venv layout."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import VENV_BIN, Master, alive, cmdline, free_port, get

from cadenza.supervisorctl import main as supervisorctl_main   # imported before any setuid()

SUPERVISORCTL = str(VENV_BIN / "supervisorctl")


class Root:
    """ROOT/releases/<tag> with cadenza.toml, ROOT/current, ROOT/shared/bin pinned to this venv."""

    def __init__(self, base: Path, port: int, socket_dir: Path):
        self.path = base / "app"
        self.port = port
        self.socket = socket_dir / "control.sock"
        self.masters: list[Master] = []
        (self.path / "releases").mkdir(parents=True)
        os.chmod(base, 0o755)

    def release(self, tag: str, extra: str = "", app: str = "cadenza.demo:app") -> Path:
        rel = self.path / "releases" / tag
        rel.mkdir()
        (rel / "cadenza.toml").write_text(
            f'[app]\nname = "ctl"\nroot = "{self.path}"\n[listen]\naddresses = ["127.0.0.1:{self.port}"]\n'
            f'[workers]\ncount = 2\napp = "{app}"\nready_timeout = 10\ngraceful_timeout = 5\n'
            f'[upgrade]\ntimeout = 10\n[control]\nsocket = "{self.socket}"\n{extra}')
        return rel

    def switch(self, tag: str) -> None:
        tmp = self.path / "current.tmp"
        tmp.symlink_to(f"releases/{tag}")
        os.replace(tmp, self.path / "current")

    def pin(self) -> None:
        subprocess.run([str(VENV_BIN / "cadenza"), "pin", "--root", str(self.path),
                        "--python", sys.executable], check=True, capture_output=True)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.path / "shared/bin/supervisorctl"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def serve(self, tag: str = "r1") -> Master:
        """`current` switched to TAG, the root pinned, and a master started from `current`, serving."""
        self.switch(tag)
        self.pin()
        m = Master(self.path.parent, cwd=self.path / "current")
        self.masters.append(m)
        m.wait_ready()
        return m

    def close(self) -> None:
        """The main master's group (the one status names, which may be a later generation's) is
        killed, then every master serve() started is closed."""
        if self.masters:
            try:
                os.killpg(json.loads(self.ctl("status", "--json", timeout=10).stdout)["pid"], signal.SIGKILL)
            except (ValueError, KeyError, ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for m in self.masters:
            m.close()


def ctl_as_nobody(*args: str) -> tuple[int, str]:
    """supervisorctl's main() in a child that became nobody. Everything it runs was imported
    before setuid() and nothing is exec'd, so the checkout may sit where nobody cannot read
    (a clone inside a 0700 `mktemp -d`)."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = supervisorctl_main(list(args))
        except BaseException as exc:  # noqa: BLE001 - the child must always end here
            print(f"ctl_as_nobody: the child failed: {exc!r}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.fixture
def app(tmp_path):
    yield from _served(tmp_path)


# Worker 3 cannot load it, nor can anyone once a file `gate` is beside it.
FLAKY = """import os
if os.environ.get("CADENZA_WORKER_ID") == "3" or os.path.exists(os.path.join(os.path.dirname(__file__), "gate")):
    raise RuntimeError("this process cannot load the app")
from cadenza.demo import app
"""


@pytest.fixture
def flaky_app(tmp_path, request):
    """r1 serves FLAKY (with preload if the test is parametrized so), ready_timeout 2, graceful_timeout 1."""
    yield from _served(tmp_path, flaky=True, preload=getattr(request, "param", False))


def _served(tmp_path, flaky: bool = False, preload: bool = False):
    # The control socket lives where another user can reach it, so that SO_PEERCRED decides.
    socket_dir = Path(tempfile.mkdtemp(prefix="cadenza-ctl-", dir="/var/tmp"))
    os.chmod(socket_dir, 0o755)
    root = Root(tmp_path, free_port(), socket_dir)
    rel = root.release("r1", app="flaky:app" if flaky else "cadenza.demo:app")
    if flaky:
        (rel / "flaky.py").write_text(FLAKY)
        config = rel / "cadenza.toml"
        short = f"ready_timeout = 2\ngraceful_timeout = 1\npreload = {str(preload).lower()}\n"
        config.write_text(config.read_text().replace("ready_timeout = 10\ngraceful_timeout = 5\n", short))
    root.switch("r1")
    root.pin()
    m = Master(tmp_path, cwd=root.path / "current")
    m.wait_ready()
    # The master was started with no arguments: it must find ./cadenza.toml through `current`.
    yield root, m
    # A later generation runs in a process group of its own (its pgid is its pid).
    try:
        later = json.loads(root.ctl("status", "--json", timeout=10).stdout)["pid"]
        os.killpg(later, signal.SIGKILL)
    except (ValueError, KeyError, ProcessLookupError, subprocess.TimeoutExpired):
        pass
    m.close()
    shutil.rmtree(socket_dir, ignore_errors=True)


def status(root: Root) -> dict:
    proc = root.ctl("status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_status_describes_generation_workers_and_release(app):
    root, m = app
    st = status(root)
    assert st["generation"] == 1 and st["pid"] == m.pid and st["state"] == "serving" and st["main"]
    assert st["release"] == str(root.path / "releases/r1") and st["release_exists"]
    assert [w["state"] for w in st["workers"]] == ["ready", "ready"]
    assert st["listeners"] == [f"127.0.0.1:{root.port}"]
    assert stat.S_IMODE(root.socket.stat().st_mode) == 0o660
    text = root.ctl("status").stdout
    assert "generation 1 serving" in text and "2/2 ready" in text


def test_upgrade_streams_progress_and_survives_pruning(app):
    root, m = app
    for n, tag in enumerate(["r2", "r3", "r4"], start=2):
        root.release(tag)
        root.switch(tag)
        proc = root.ctl("upgrade")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for text in ("pre-flight passed", f"generation {n} started (pid", "workers ready 2/2",
                     f"MAINPID handed over to generation {n}", f"generation {n - 1} drained"):
            assert text in proc.stdout, proc.stdout
        old = root.path / "releases" / f"r{n - 1}"
        subprocess.run(["rm", "-rf", str(old)], check=True)   # pruned, as a deploy tool would
        assert f"release {root.path}/releases/{tag}" in get(root.port)[1]
    st = status(root)
    assert st["generation"] == 4 and st["release"].endswith("/r4")
    assert not alive(m.pid)   # generation 1 drained and exited


def test_failed_upgrade_exits_1_with_reason_and_output_and_old_keeps_serving(app):
    root, m = app
    rel = root.release("bad", app="nosuchmodule:app")
    root.switch("bad")
    proc = root.ctl("upgrade")
    assert proc.returncode == 1
    assert "upgrade to generation 2 failed" in proc.stderr
    assert "nosuchmodule" in proc.stderr        # the new generation's own words, relayed
    assert status(root)["pid"] == m.pid
    assert "release " + str(root.path / "releases/r1") in get(root.port)[1]
    assert status(root)["last_upgrade"]["ok"] is False
    assert rel.exists()


def test_upgrade_refused_when_pinned_path_is_unsafe(app):
    root, m = app
    root.release("r2")
    root.switch("r2")
    pinned = root.path / "shared/bin/cadenza"
    os.chmod(pinned, 0o757)
    proc = root.ctl("upgrade")
    assert proc.returncode == 1
    assert f"pinned path {pinned} is unsafe" in proc.stdout + proc.stderr
    assert "writable by others" in proc.stdout + proc.stderr
    os.unlink(pinned)
    proc = root.ctl("upgrade")
    assert proc.returncode == 1 and "No such file or directory" in proc.stdout + proc.stderr
    assert len([p for p in m.workers()]) == 2 and status(root)["generation"] == 1


def test_restart_scale_stop_wait_and_report(app):
    root, m = app
    before = {w["pid"] for w in status(root)["workers"]}
    proc = root.ctl("restart")
    assert proc.returncode == 0 and "2/2 worker(s) replaced" in proc.stdout
    assert not before & {w["pid"] for w in status(root)["workers"]}
    proc = root.ctl("scale", "+2")
    assert proc.returncode == 0 and "4/4 workers ready" in proc.stdout
    proc = root.ctl("scale", "1")
    assert proc.returncode == 0 and "1/1 workers ready" in proc.stdout
    assert len(status(root)["workers"]) == 1
    assert root.ctl("scale", "zero").returncode == 2
    proc = root.ctl("stop")
    assert proc.returncode == 0 and "generation 1 stopped" in proc.stdout
    assert m.wait_exit() == 0
    assert not root.socket.exists()
    assert root.ctl("status").returncode == 3


def test_a_scale_whose_new_worker_cannot_start_answers_within_its_bound(flaky_app):
    root, m = flaky_app
    began = time.monotonic()
    proc = root.ctl("scale", "3")
    took = time.monotonic() - began
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2/3 workers ready after 3s; the master goes on starting them; worker 3 exited with status 3" \
        in proc.stderr, proc.stderr
    assert took < 10, took
    assert status(root)["target_workers"] == 3 and m.proc.poll() is None


@pytest.mark.parametrize("flaky_app", [True], indirect=True, ids=["preload"])
def test_a_restart_while_the_preloader_cannot_come_back_answers_within_its_bound(flaky_app):
    root, m = flaky_app
    (root.path / "current" / "gate").write_text("")
    preloader = next(p for p in m.workers() if "preloader" in cmdline(p))
    os.kill(preloader, signal.SIGKILL)
    m.wait_log("this process cannot load the app")       # the new preloader's import fails
    proc = root.ctl("restart", timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0/2 worker(s) replaced after 5s; the rolling restart goes on; the preloader is down" in proc.stderr, \
        proc.stderr
    (root.path / "current" / "gate").unlink()              # the old workers served all along
    assert get(root.port)[0] == 200


def test_other_users_are_denied_and_logged(app):
    root, m = app
    code, err = ctl_as_nobody("-s", str(root.socket), "status")
    assert code == 4 and "permission denied" in err     # mode 0660 keeps nobody out
    os.chmod(root.socket, 0o666)   # past the file mode, SO_PEERCRED still decides
    code, err = ctl_as_nobody("-s", str(root.socket), "upgrade")
    assert code == 4 and "permission denied: uid 65534 may not" in err, err
    m.wait_log("denied to uid 65534")
    assert status(root)["generation"] == 1


def cpu(pid: int) -> float:
    """CPU seconds the process itself (not its children) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_share(cpu_of, least: float = 0.3, most: float = 30.0) -> float:
    """How much CPU `cpu_of()` (seconds) gained while this thread spun for `least` CPU seconds,
    as a fraction of those: near 1 for a loop that spins too, near 0 for one that waits. Measured
    against a spinner rather than the clock, so that a loaded machine cannot hide a spin."""
    before, mine, started = cpu_of(), time.thread_time(), time.monotonic()
    while time.thread_time() - mine < least:
        assert time.monotonic() - started < most, f"this test got under {least}s CPU in {most}s: too loaded to measure"
    return (cpu_of() - before) / (time.thread_time() - mine)


def test_a_client_that_half_closes_during_an_upgrade_costs_the_master_no_cpu(app):
    """`nc -N`, or Ctrl-C in `supervisorctl upgrade`: the request, then EOF, while the upgrade
    waits for workers that a lock the test holds keeps from loading."""
    root, m = app
    rel = root.release("r2", app="gate:app")
    (rel / "gate.py").write_text(
        "import fcntl, os\n"
        "with open(os.path.join(os.path.dirname(__file__), 'gate.lock')) as f:\n"
        "    fcntl.flock(f, fcntl.LOCK_SH)   # until the test lets go of LOCK_EX\n"
        "from cadenza.worker.demo import app\n")
    with open(rel / "gate.lock", "w") as gate, socket.socket(socket.AF_UNIX) as s:
        fcntl.flock(gate, fcntl.LOCK_EX)
        root.switch("r2")
        s.settimeout(20)
        s.connect(str(root.socket))
        s.sendall(b'{"cmd": "upgrade"}\n')
        s.shutdown(socket.SHUT_WR)
        seen = b""
        while b"generation 2 started" not in seen:   # the request was read; the upgrade waits
            chunk = s.recv(65536)
            assert chunk, f"the master hung up during the upgrade: {seen!r}"
            seen += chunk
        share = cpu_share(lambda: cpu(m.pid))
        fcntl.flock(gate, fcntl.LOCK_UN)
        while chunk := s.recv(65536):
            seen += chunk
    assert share < 0.2, f"the master used {share:.0%} of the CPU a spinning loop gets, for a half-closed client"
    assert json.loads(seen.splitlines()[-1])["code"] == 0, seen   # and it still heard the outcome


def raw(root: Root, data: bytes, read: bool = True) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(root.socket))
        s.settimeout(10)
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass   # the master answered and hung up before taking all of it: what we test
        if not read:
            return b""
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("data, expected", [
    (b"not json\n", "malformed request"),
    (b'["status"]\n', "malformed request"),
    (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
])
def test_bad_requests_get_an_error(app, data, expected):
    root, _ = app
    answer = json.loads(raw(root, data))
    assert answer["done"] and answer["code"] == 2 and expected in answer["text"]
    assert status(root)["state"] == "serving"


def test_oversized_silent_and_many_clients_cost_nothing(app):
    root, m = app
    try:
        answer = json.loads(raw(root, b"x" * (10 << 20)))
        assert answer["code"] == 2 and "longer than" in answer["text"]
    except ConnectionResetError:
        pass   # dropped: the master hung up with our bytes unread, which resets the connection
    silent = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    for s in silent:
        s.connect(str(root.socket))
    crowd = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(root.socket))
        crowd.append(s)
    for s in crowd:
        s.close()
    assert get(root.port)[0] == 200
    assert status(root)["state"] == "serving"
    silent[0].settimeout(10)
    assert b"no request within" in silent[0].recv(4096)   # dropped after its timeout
    for s in silent:
        s.close()
    root.release("r2")
    root.switch("r2")
    assert root.ctl("upgrade").returncode == 0


def test_ten_usr2_make_one_generation(app):
    root, m = app
    root.release("r2")
    root.switch("r2")
    for _ in range(10):
        os.kill(m.pid, signal.SIGUSR2)
    m.wait_for(lambda x: x.get("MAINPID"))
    assert m.wait_exit() == 0
    st = status(root)
    assert st["generation"] == 2
    assert "joining the upgrade" in m.log() or m.log().count("upgrade requested by SIGUSR2") == 1
    assert m.log().count("starting generation") == 1


def test_pin_refuses_a_directory_others_can_write(tmp_path):
    root = tmp_path / "srv"
    (root / "shared" / "bin").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(root / "shared" / "bin", 0o777)
    proc = subprocess.run([str(VENV_BIN / "cadenza"), "pin", "--root", str(root)], capture_output=True, text=True)
    assert proc.returncode == 78
    assert f"refusing to pin into {root}/shared/bin" in proc.stderr and "chmod go-w" in proc.stderr
    assert not (root / "shared/bin/cadenza").exists()
    os.chmod(root / "shared" / "bin", 0o755)
    proc = subprocess.run([str(VENV_BIN / "cadenza"), "pin", "--root", str(root), "--python", sys.executable],
                          capture_output=True, text=True, check=True)
    launcher = (root / "shared/bin/cadenza")
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    assert sorted(p.name for p in (root / "shared/bin").iterdir()) == ["cadenza", "supervisorctl"]  # no temp left
    out = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.startswith("cadenza ")


def test_upgrade_refused_when_the_new_config_is_writable_by_others(app):
    root, m = app
    rel = root.release("r2")
    root.switch("r2")
    (rel / "cadenza.toml").chmod(0o646)
    proc = root.ctl("upgrade")
    assert proc.returncode == 1
    assert "the new release's config is unsafe" in proc.stderr and "writable by others" in proc.stderr
    assert status(root)["pid"] == m.pid


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(app):
    """Idle clients use up the master's fds (its limit lowered under it): accept() fails with
    EMFILE, the master says so once a second instead of spinning on the queued connection,
    and serves the control socket again once fds are free."""
    root, m = app
    used = len(os.listdir(f"/proc/{m.pid}/fd"))
    resource.prlimit(m.pid, resource.RLIMIT_NOFILE, (used + 5, used + 5))
    idle = []
    for _ in range(12):   # 5 are accepted and wait for a request; the rest queue in the kernel
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(root.socket))
        idle.append(s)
    m.wait_log("control socket: out of file descriptors")
    before, started = cpu(m.pid), time.monotonic()
    while m.log().count("out of file descriptors") < 3:   # the master's own 1 s pauses pace these lines
        assert time.monotonic() - started < 10, m.log()
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert elapsed > 1.5                     # not a line per loop iteration
    assert cpu(m.pid) - before < 0.25 * elapsed   # a spinning loop would burn a full CPU
    for s in idle:
        s.close()
    assert status(root)["state"] == "serving" and get(root.port)[0] == 200

