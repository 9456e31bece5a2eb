"""The sdns harness itself, against the real systemd 252 it boots."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

import sdns

# Socket-activated Type=notify service: one "hello" line per connection.
HELLO_PY = """\
import os, socket
assert int(os.environ["LISTEN_PID"]) == os.getpid() and os.environ["LISTEN_FDS"] == "1"
listener = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
addr = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
    n.sendto(b"READY=1", "\\0" + addr[1:] if addr.startswith("@") else addr)
while True:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(b"hello\\n")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root: str) -> set[tuple[str, str]]:
    """Every entry below root, with its symlink target, as a comparable set."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            out.add((p, os.readlink(p) if os.path.islink(p) else ""))
    return out


def our_children() -> list[str]:
    """Commands of the live (non-zombie) children of this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm_end = (text := stat.read_text()).rindex(")")
        except (OSError, ValueError):
            continue  # exited while we looked
        state, ppid = text[comm_end + 2:].split()[:2]
        if int(ppid) == os.getpid() and state != "Z":
            found.append(text[text.index("(") + 1:comm_end])
    return found


def test_boots_to_running(systemd):
    assert systemd.systemctl("is-system-running", "--wait").stdout.strip() == "running"
    assert systemd.show("systemd-journald.service", "ActiveState") == {"ActiveState": "active"}


def test_socket_activated_notify_service(systemd):
    port, script = free_port(), systemd.state / "hello.py"
    script.write_text(HELLO_PY)
    systemd.write_unit("hello.socket", f"[Socket]\nListenStream=127.0.0.1:{port}\n")
    # User=nobody proves the state dir is traversable by an unprivileged service.
    systemd.write_unit("hello.service", "[Service]\nType=notify\nUser=nobody\n"
                       f"ExecStart=/usr/bin/python3 {script}\n")
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("start", "hello.socket", check=True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.makefile("rb").readline() == b"hello\n"
    systemd.wait_for("hello.service", "ActiveState", "active")
    props = systemd.show("hello.service", "MainPID", "SubState", "NRestarts")
    assert int(props["MainPID"]) > 0, props
    assert props["SubState"] == "running" and props["NRestarts"] == "0", props


def test_state_dir_has_the_same_path_inside(systemd):
    (systemd.state / "from-host").write_text("h\n")
    assert systemd.run("cat", systemd.state / "from-host", check=True).stdout == "h\n"
    assert systemd.run("pwd", cwd=systemd.state, check=True).stdout.strip() == str(systemd.state)
    systemd.run("sh", "-c", "echo n > from-ns", cwd=systemd.state, check=True)
    assert (systemd.state / "from-ns").read_text() == "n\n"
    # Everything else on the root file system is read-only for the namespace.
    assert systemd.run("touch", "/etc/sdns-must-fail").returncode != 0


def test_teardown_leaves_nothing(systemd_factory):
    with systemd_factory() as ns:
        pid1, cgroup, state, tag = ns.pid1, ns.cgroup, ns.state, f"sdns-{ns.id}"
        ns.popen("sleep", "1000")  # an nsenter'd process must not outlive the namespace
        assert cgroup.is_dir() and state.is_dir()
    assert not cgroup.exists() and not state.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid1, 0)
    assert not {"unshare", "cat", "nsenter", "systemd"} & set(our_children())
    for cg in Path("/proc").glob("[0-9]*/cgroup"):
        try:
            assert tag not in cg.read_text(), cg
        except FileNotFoundError:
            pass  # exited while we looked


def test_host_untouched_by_a_boot(systemd_factory):
    etc_before, tmp_before = tree("/etc/systemd/system"), set(os.listdir("/tmp"))
    dev_before = {p: os.path.lexists(p) for p in ("/dev/log", "/dev/initctl", "/run/mount/utab")}
    with systemd_factory() as ns:
        marker = f"sdns-marker-{ns.id}"
        ns.write_unit("idle.service", "[Service]\nExecStart=/bin/sleep 1000\n"
                      "[Install]\nWantedBy=multi-user.target\n")
        ns.systemctl("daemon-reload", check=True)
        ns.systemctl("enable", "--now", "idle.service", check=True)  # writes below /etc
        ns.run("touch", f"/tmp/{marker}", check=True)
        state = ns.state
    assert tree("/etc/systemd/system") == etc_before
    # /tmp is shared with other users of the machine, so only look for what a boot could add.
    new = set(os.listdir("/tmp")) - tmp_before
    assert not {n for n in new if n in (marker, state.name) or n.startswith(
        ("systemd-private-", ".X11-unix", ".ICE-unix", ".XIM-unix", ".font-unix"))}
    assert {p: os.path.lexists(p) for p in dev_before} == dev_before


def test_boot_failure_carries_the_console(systemd_factory):
    ns = systemd_factory(extra_tmpfs=("/nonexistent-sdns-path",))
    with pytest.raises(sdns.BootError, match="nonexistent-sdns-path"):
        ns.start()
    assert ns.cgroup is None and ns.state is None and ns.pid1 is None


def test_janitor_removes_only_orphaned_empty_cgroups(_sdns_session):
    base = sdns.cgroup2_base()
    orphan, live = base / "sdns-999999999-janitor", base / f"sdns-{os.getpid()}-janitor"
    orphan.mkdir()
    (orphan / "child").mkdir()
    live.mkdir()
    try:
        assert orphan in sdns.janitor()
        assert not orphan.exists() and live.exists()
    finally:
        for d in (orphan / "child", orphan, live):
            if d.exists():
                d.rmdir()
