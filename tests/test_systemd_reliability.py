"""Faults under a real systemd 252: the fd store across restarts and crashes, hung workers,
workers killed under load. Every client here counts what it sees; none may be refused."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from procs import CADENZA, Client, children, free_port, get

APP = "rel"
# The shipped unit's list of exit codes that a restart would not heal.
SHIPPED_UNIT = Path(__file__).resolve().parent.parent / "units" / "cadenza@.service"
PREVENT = [line for line in SHIPPED_UNIT.read_text().splitlines() if line.startswith("RestartPreventExitStatus=")][0]


def write_app(ns, port: int, extra_workers: str = "", unit_extra: str = "", control: str = "") -> None:
    cfg = ns.state / "rel.toml"
    cfg.write_text(f'[app]\nname = "{APP}"\n[listen]\naddresses = ["127.0.0.1:{port}"]\n'
                   f'[workers]\ncount = 2\napp = "cadenza.demo:app"\nready_timeout = 10\ngraceful_timeout = 5\n{extra_workers}'
                   f'[control]\nsocket = "{control or ns.state / "rel.sock"}"\n')
    # No socket unit: cadenza binds, and FileDescriptorStoreMax= keeps its sockets across restarts.
    # systemd 252 does not set $FDSTORE itself (254 does), so the unit says it.
    ns.write_unit(f"{APP}.service", f"""[Service]
Type=notify
NotifyAccess=main
KillMode=mixed
ExecStart={CADENZA} run -c {cfg}
Restart=on-failure
RestartSec=0
FileDescriptorStoreMax=8
Environment=FDSTORE=8
TimeoutStopSec=20
{unit_extra}""")
    ns.systemctl("daemon-reload", check=True)


def host_pid(ns, unit: str) -> int:
    """MainPID is a pid of the namespace; the host pid is its NSpid's first entry."""
    inner = ns.show(unit, "MainPID")["MainPID"]
    cgroup = ns.show(unit, "ControlGroup")["ControlGroup"]
    for pid in (ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split():
        nspid = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                 if line.startswith("NSpid:")][0].split()
        if nspid[-1] == inner:
            return int(pid)
    raise AssertionError(f"MainPID {inner} not in {cgroup}")


def test_fd_store_keeps_the_sockets_across_restart_and_crash(systemd):
    ns, port = systemd, free_port()
    write_app(ns, port)
    ns.systemctl("start", f"{APP}.service", check=True)
    assert ns.show(f"{APP}.service", "NFileDescriptorStore")["NFileDescriptorStore"] == "2"
    client = Client(port)
    try:
        first = ns.show(f"{APP}.service", "MainPID")["MainPID"]
        assert ns.systemctl("restart", f"{APP}.service").returncode == 0
        second = ns.show(f"{APP}.service", "MainPID")["MainPID"]
        assert second != first
    finally:
        client.stop()
    assert client.failures == [] and client.ok > 0      # a restart drains: nothing fails
    client = Client(port)
    try:
        os.kill(host_pid(ns, f"{APP}.service"), signal.SIGKILL)     # a crash
        ns.wait_for(f"{APP}.service", "NRestarts", "1")
        ns.wait_for(f"{APP}.service", "ActiveState", "active")
        time.sleep(0.5)   # let the client run against the restarted service for a moment
    finally:
        client.stop()
    # A crash takes the requests its workers held (systemd kills them with the unit), but a new
    # connection is never refused: the listening socket lives on in the fd store.
    assert [f for f in client.failures if "Refused" in f] == [] and len(client.failures) <= 2
    assert client.ok > 0
    journal = ns.journal("-o", "cat")
    # The restarted masters adopted the stored sockets by name instead of binding new ones.
    status = json.loads(ns.run(str(Path(CADENZA).parent / "supervisorctl"), "-s", f"{ns.state}/rel.sock",
                               "status", "--json").stdout)
    assert status["listeners"] == [f"127.0.0.1:{port}"]
    assert journal.count("generation 1 starting 2 worker(s)") == 3


def test_a_stopped_worker_that_pinged_is_replaced(systemd):
    ns, port = systemd, free_port()
    write_app(ns, port, extra_workers="watchdog = 1\n")
    ns.systemctl("start", f"{APP}.service", check=True)
    master = host_pid(ns, f"{APP}.service")
    victim = children(master)[0]
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while victim in children(master) or len(children(master)) < 2:
        assert time.monotonic() < deadline, ns.journal("-n", "30")
        time.sleep(0.05)   # the master's own timer decides; nothing tells the test
    assert "sent no WATCHDOG=1 for" in ns.journal("-o", "cat")
    assert ns.show(f"{APP}.service", "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert get(port)[0] == 200


def test_random_workers_killed_under_load(systemd):
    ns, port = systemd, free_port()
    write_app(ns, port, extra_workers="")
    ns.systemctl("start", f"{APP}.service", check=True)
    master = host_pid(ns, f"{APP}.service")
    client = Client(port)
    rng = random.Random(7)
    try:
        for _ in range(10):
            workers = children(master)
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
            time.sleep(0.2)
    finally:
        client.stop()
    ns.wait_for(f"{APP}.service", "StatusText", "generation 1 serving: 2/2 workers ready")
    state = ns.show(f"{APP}.service", "ActiveState", "NRestarts", "MainPID")
    assert state["ActiveState"] == "active" and state["NRestarts"] == "0"
    # A request in flight on a worker killed by SIGKILL can fail; a new connection never does.
    refused = [f for f in client.failures if "Refused" in f]
    assert refused == [] and client.ok > 10
    assert len(client.failures) <= 10


def _fill(ns, directory: Path) -> None:
    """A tmpfs of 4 inodes at `directory`, then files until it has none left."""
    directory.mkdir()
    assert ns.run("mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=4", "tmpfs", str(directory)).returncode == 0
    ns.run("sh", "-c", f'i=0; while touch "{directory}/f$i" 2>/dev/null; do i=$((i+1)); done')
    assert ns.run("touch", str(directory / "one-more")).returncode != 0


@pytest.mark.parametrize("fault, code, message", [
    ("read-only runtime directory", 73, "Read-only file system; {dir} is not writable by this service"),
    ("full runtime directory", 73, "No space left on device; {dir} is full"),
    ("LimitNOFILE=32", 78, "the open files limit is 32 (hard 32); cadenza needs at least 64"),
    ("config file writable by others", 78, "{cfg}: the config file is writable by others (mode 0646)"),
], ids=["read-only-runtime-dir", "full-runtime-dir", "LimitNOFILE=32", "config-writable-by-others"])
def test_a_unit_that_cannot_work_fails_once_with_the_reason(systemd, fault, code, message):
    """Faults of the unit's environment, not of the app: the start fails with a message that names
    the problem and the fix, and Restart=on-failure with the shipped RestartPreventExitStatus=
    does not loop."""
    ns, port = systemd, free_port()
    run_dir = ns.state / "run"
    unit_extra = PREVENT + "\n"
    if fault == "read-only runtime directory":
        run_dir.mkdir()
        unit_extra += f"ReadOnlyPaths={run_dir}\n"
    elif fault == "full runtime directory":
        _fill(ns, run_dir)
    elif fault.startswith("LimitNOFILE"):
        unit_extra += "LimitNOFILE=32\n"
    write_app(ns, port, unit_extra=unit_extra, control=f"{run_dir}/control.sock")
    if fault == "config file writable by others":
        run_dir.mkdir()
        (ns.state / "rel.toml").chmod(0o646)
    start = ns.systemctl("start", f"{APP}.service")
    assert start.returncode != 0
    state = ns.show(f"{APP}.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert state == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": str(code),
                     "NRestarts": "0"}, ns.journal("-n", "20")
    journal = ns.journal("-o", "cat", "-u", f"{APP}.service")
    assert message.format(dir=run_dir, cfg=ns.state / "rel.toml") in journal and "Traceback" not in journal, journal
    # Nothing is left waiting to retry: the unit stays failed until an operator acts.
    assert ns.show(f"{APP}.service", "SubState", "NRestarts") == {"SubState": "failed", "NRestarts": "0"}


def test_workers_never_see_systemds_notify_socket_or_stale_listen_variables(systemd):
    """Socket-activated, with a systemd watchdog: the master gets LISTEN_*, NOTIFY_SOCKET and
    WATCHDOG_USEC meant for it. Each worker, in this generation and the next, gets LISTEN_* for
    its own pid and its generation's NOTIFY_SOCKET, and nothing of systemd's."""
    ns, port = systemd, free_port()
    out = ns.state / "env"
    out.mkdir()
    envworker = Path(__file__).resolve().parent / "programs" / "envworker.py"
    cfg = ns.state / "env.toml"
    cfg.write_text(f'[app]\nname = "{APP}"\nexec_path = "{CADENZA}"\n[workers]\ncount = 2\n'
                   f'command = ["{sys.executable}", "{envworker}", "{out}"]\n'
                   f'[control]\nsocket = "{ns.state}/rel.sock"\n')
    ns.write_unit(f"{APP}.socket", f"[Socket]\nListenStream=127.0.0.1:{port}\n")
    ns.write_unit(f"{APP}.service", f"""[Service]
Type=notify
NotifyAccess=main
KillMode=mixed
WatchdogSec=30
ExecStart={CADENZA} run -c {cfg}
ExecReload={Path(CADENZA).parent / "supervisorctl"} -s {ns.state}/rel.sock upgrade
""")
    ns.systemctl("daemon-reload", check=True)
    ns.systemctl("start", f"{APP}.socket", f"{APP}.service", check=True)
    sockets = []
    for generation in (1, 2):
        infos = [json.loads((out / f"{i}.json").read_text()) for i in (1, 2)]
        for info in infos:
            env = info["env"]
            assert env["LISTEN_PID"] == str(info["pid"]) and env["LISTEN_FDS"] == "1", env
            assert env["LISTEN_FDNAMES"] == f"{APP}.socket" and env["CADENZA_GENERATION"] == str(generation), env
            assert env["NOTIFY_SOCKET"].startswith("@cadenza/"), env
            assert "WATCHDOG_USEC" not in env and "WATCHDOG_PID" not in env, env
        sockets.append({info["env"]["NOTIFY_SOCKET"] for info in infos})
        if generation == 1:
            for f in out.iterdir():
                f.unlink()
            reload = ns.systemctl("reload", f"{APP}.service")
            assert reload.returncode == 0, reload.stderr + ns.journal("-o", "cat", "-n", "20")
    assert len(sockets[0]) == len(sockets[1]) == 1 and sockets[0] != sockets[1]
