"""The real master outside systemd: real forks, real sockets, real HTTP; the test plays NOTIFY_SOCKET."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path


from procs import accepted, alive, children, cmdline, cpu_seconds, free_port, get

PROGRAMS = Path(__file__).parent / "programs"


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cadenza.toml"
    path.write_text(body)
    return path


def test_serves_and_reports_readiness_and_titles(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}", "--workers", "2")
    msg = m.wait_ready()
    assert "generation 1 serving: 2/2 workers ready" in msg["STATUS"]
    status, body = get(port)
    assert status == 200 and "hello from cadenza worker" in body
    workers = m.workers()
    assert len(workers) == 2
    assert cmdline(m.pid).startswith("cadenza master gen 1 [cadenza]")
    assert sorted(cmdline(w) for w in workers) == ["cadenza worker 1 gen 1 [cadenza]",
                                                   "cadenza worker 2 gen 1 [cadenza]"]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert m.wait_for(lambda x: x.get("STOPPING") == "1")
    assert not any(alive(w) for w in workers)


def test_killed_worker_is_respawned(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}")
    m.wait_ready()
    victim = m.workers()[0]
    os.kill(victim, signal.SIGKILL)
    m.wait_for(lambda x: "1/2 workers ready" in x.get("STATUS", ""))
    m.wait_for(lambda x: "2/2 workers ready" in x.get("STATUS", ""))
    workers = m.workers()
    assert len(workers) == 2 and victim not in workers
    assert get(port)[0] == 200
    assert "killed by SIGKILL; respawning in" in m.log()


def test_ttin_ttou_change_the_worker_count(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}", "--workers", "2")
    m.wait_ready()
    m.signal(signal.SIGTTIN)
    m.wait_status("3/3 workers ready")
    assert len(m.workers()) == 3
    m.signal(signal.SIGTTOU)
    m.wait_status("2/2 workers ready")
    deadline = time.monotonic() + 10
    while len(m.workers()) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)   # the removed worker drains; nothing signals its exit to the test
    assert len(m.workers()) == 2


def test_hup_restarts_every_worker_without_losing_capacity(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}", "--workers", "2")
    m.wait_ready()
    before = set(m.workers())
    failures, stop, thread = client_loop(port)
    m.signal(signal.SIGHUP)
    m.wait_status("rolling restart")
    m.wait_for(lambda x: "STATUS" in x and "rolling restart" not in x["STATUS"])
    deadline = time.monotonic() + 10
    while set(m.workers()) & before and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join()
    assert not set(m.workers()) & before
    statuses = [x["STATUS"] for x in m.messages if "STATUS" in x]
    assert all("2/2 workers ready" in s for s in statuses if "serving" in s), statuses
    assert failures == []


def client_loop(port: int):
    failures: list[str] = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                status, _ = get(port, timeout=5)
                if status != 200:
                    failures.append(str(status))
            except Exception as exc:  # noqa: BLE001 - every failure counts, whatever its type
                failures.append(repr(exc))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return failures, stop, thread


def test_term_drains_a_slow_request_in_flight(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}", "--workers", "1")
    m.wait_ready()
    result = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/slow?s=1.5")
    time.sleep(0.3)  # let the request reach the worker; there is no event for "request being handled"
    m.signal(signal.SIGTERM)
    resp = conn.getresponse()
    result["status"], result["body"] = resp.status, resp.read()
    assert result["status"] == 200
    assert resp.getheader("connection") == "close"
    assert m.wait_exit() == 0


def test_idle_keepalive_connection_gets_one_more_answer_with_close(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}", "--workers", "1")
    m.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/")
    first = conn.getresponse()
    first.read()
    assert first.getheader("connection") != "close"
    m.signal(signal.SIGTERM)
    m.wait_log("Shutting down")
    conn.request("GET", "/")   # the request a keep-alive client sends just as the worker leaves
    second = conn.getresponse()
    assert second.status == 200 and second.getheader("connection") == "close"
    assert m.wait_exit() == 0


def test_int_stops_at_once(start):
    port = free_port()
    m = start("--bind", f"127.0.0.1:{port}")
    m.wait_ready()
    workers = m.workers()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/slow?s=30")
    t0 = time.monotonic()
    m.signal(signal.SIGINT)
    assert m.wait_exit(timeout=5) == 0
    assert time.monotonic() - t0 < 5
    assert not any(alive(w) for w in workers)


def test_worker_failing_at_start_backs_off_and_master_stays_idle(start, tmp_path):
    # Exit 1: a crash. (Exit 3, "the application could not be loaded", fails the start at once.)
    cfg = write_config(tmp_path, '[workers]\ncount = 1\ncommand = ["sh", "-c", "exit 1"]\nready_timeout = 60\n')
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    m.wait_status("retry in 0.8s (4 failed start(s) in a row)")
    cpu0, t0 = cpu_seconds(m.pid), time.monotonic()
    m.wait_status("retry in 6.4s", timeout=20)
    used = cpu_seconds(m.pid) - cpu0
    elapsed = time.monotonic() - t0
    assert used / elapsed < 0.05, f"master used {used:.2f}s CPU in {elapsed:.1f}s"
    assert "worker 1 exited with status 1" in m.messages[-1]["STATUS"]
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_worker_never_ready_fails_the_start(start, tmp_path):
    cfg = write_config(tmp_path, '[workers]\ncount = 2\ncommand = ["sleep", "1000"]\nready_timeout = 1\n'
                                 + own_control(tmp_path))
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    msg = m.wait_status("start failed")
    assert "0/2 workers ready after 1s" in msg["STATUS"]
    # A program that never says READY=1 (uvicorn, gunicorn): the reason names the fix and the file.
    assert ('no READY=1 arrived from workers 1, 2 within 1s (workers.ready_timeout); a command worker '
            'that does not speak sd_notify needs ready = "spawn" or ready = "uptime:2s" under [workers] '
            f'in {cfg}') in msg["STATUS"], msg
    assert m.wait_exit() == 75
    assert not any(m.messages[i].get("READY") for i in range(len(m.messages)))


def test_ready_from_a_process_that_is_not_a_worker_is_refused_and_logged(start, tmp_path):
    # The worker tells the test its NOTIFY_SOCKET; a process of no worker's family (a child of
    # the test's, as nobody) says READY=1 there and stays until the master has looked at it.
    # (A worker's own children are heard: tests/test_process_groups.py.)
    address = tmp_path / "address"
    cfg = write_config(tmp_path, f'[workers]\ncount = 1\nready_timeout = 3\n'
                                 f'command = ["sh", "-c", "echo $NOTIFY_SOCKET > {address}.new; '
                                 f'mv {address}.new {address}; exec sleep 1000"]\n')
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    deadline = time.monotonic() + 10
    while not address.exists():
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.01)   # nothing announces a file written by the worker
    target = b"\0" + address.read_text().strip().lstrip("@").encode()
    release_r, release_w = os.pipe()
    stranger = os.fork()
    if stranger == 0:
        try:
            os.close(release_w)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1\nSTATUS=not a worker", target)
            os.read(release_r, 1)
        finally:
            os._exit(0)
    os.close(release_r)
    try:
        m.wait_log(f"refused READY=1 from pid {stranger} (uid 65534, {cmdline(os.getpid())[:60]}")
    finally:
        os.close(release_w)
        os.waitpid(stranger, 0)
    [line] = [l for l in m.log().splitlines() if "refused READY=1" in l]
    assert " WARNING " in line and "not sent by a worker of this generation or one of its descendants" in line
    m.wait_status("start failed")
    assert m.wait_exit() == 75
    assert not any(msg.get("READY") for msg in m.messages)


def test_command_worker_gets_listeners_and_its_own_environment(start, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    cfg = write_config(tmp_path, f'[workers]\ncount = 2\n'
                                 f'command = ["{sys.executable}", "{PROGRAMS / "envworker.py"}", "{out}"]\n')
    unix = tmp_path / "app.sock"
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{port}", "--bind", f"unix:{unix};mode=0600",
              env={"WATCHDOG_USEC": "5000000"})
    m.wait_ready()
    infos = [json.loads((out / f"{i}.json").read_text()) for i in (1, 2)]
    for i, info in enumerate(infos, 1):
        env = info["env"]
        assert env["LISTEN_PID"] == str(info["pid"])
        assert env["LISTEN_FDS"] == "2"
        assert env["LISTEN_FDNAMES"] == "listen-1:listen-2"
        assert env["CADENZA_WORKER_ID"] == str(i)
        assert env["NOTIFY_SOCKET"].startswith("@cadenza/") and env["NOTIFY_SOCKET"] != m.notify_path
        assert "WATCHDOG_USEC" not in env
        assert [fd["family"] for fd in info["fds"]] == ["AF_INET", "AF_UNIX"]
        assert all(fd["listening"] for fd in info["fds"])
    assert oct(unix.stat().st_mode & 0o777) == "0o600"
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert not unix.exists()


def test_watchdog_pings_when_asked(start):
    m = start("--bind", f"127.0.0.1:{free_port()}", env={"WATCHDOG_USEC": "400000"})
    assert m.wait_ready().get("WATCHDOG") == "1"
    m.wait_for(lambda x: x.get("WATCHDOG") == "1" and "READY" not in x)


def test_bind_failure_names_the_address(start):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = start("--bind", f"127.0.0.1:{port}")
        assert m.wait_exit() == 71
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in m.log()


def test_bad_config_exits_78_and_names_the_key(start, tmp_path):
    cfg = write_config(tmp_path, "[workers]\ncount = 0\n")
    m = start("-c", str(cfg))
    assert m.wait_exit() == 78
    assert "workers.count" in m.log()


def test_no_zombies_after_many_worker_deaths(start):
    m = start("--bind", f"127.0.0.1:{free_port()}", "--workers", "3")
    m.wait_ready()
    for _ in range(3):
        for w in m.workers():
            os.kill(w, signal.SIGKILL)
        m.wait_for(lambda x: "0/3" in x.get("STATUS", "") or "1/3" in x.get("STATUS", ""))
        m.wait_status("3/3 workers ready")
    zombies = [c for c in children(m.pid) if not alive(c)]
    assert zombies == []


def test_config_writable_by_others_is_refused(start, tmp_path):
    cfg = write_config(tmp_path, '[workers]\ncount = 1\napp = "cadenza.demo:app"\n')
    cfg.chmod(0o666)
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    assert m.wait_exit() == 78
    assert f"{cfg}: the config file is writable by others (mode 0666)" in m.log()
    assert f"chmod o-w {cfg}" in m.log()


def own_control(tmp_path: Path) -> str:
    """A control socket of the test's own: the default one belongs to whatever else runs here."""
    return f'[control]\nsocket = "{tmp_path / "control.sock"}"\n'


def test_an_app_that_cannot_be_imported_fails_the_start_at_once_with_78(start, tmp_path):
    # ready_timeout = 60: the start fails long before it, on the workers' exit 3.
    cfg = write_config(tmp_path, '[workers]\ncount = 2\napp = "nosuch_module:app"\nready_timeout = 60\n'
                                 + own_control(tmp_path))
    t0 = time.monotonic()
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    assert m.wait_exit(timeout=20) == 78
    assert time.monotonic() - t0 < 20   # a second or two; not ready_timeout = 60
    reason = re.compile(r"generation 1 start failed: worker [12] exited with status 3 \(the application could "
                        r"not be loaded\): cannot load app .nosuch_module:app.* ModuleNotFoundError: "
                        r"No module named 'nosuch_module'")
    assert reason.search(m.log()), m.log()
    assert any(reason.search(x.get("STATUS", "")) for x in m.messages), m.messages
    assert not any(x.get("READY") for x in m.messages)


def test_exit_3_fails_the_start_with_the_workers_last_status(start, tmp_path):
    gate = tmp_path / "gate"
    gate.write_text("cannot connect to the database at 127.0.0.1:5432\n")
    cfg = write_config(tmp_path, f'[workers]\ncount = 2\nready_timeout = 60\n'
                                 f'command = ["{sys.executable}", "{PROGRAMS / "loadfail.py"}", "{gate}"]\n'
                                 + own_control(tmp_path))
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    assert m.wait_exit(timeout=20) == 78
    # The STATUS= a worker sends just before its exit is its reason, whichever the loop sees first.
    assert re.search(r"generation 1 start failed: worker [12] exited with status 3 \(the application could not "
                     r"be loaded\): cannot connect to the database at 127\.0\.0\.1:5432$", m.log(), re.M), m.log()


def test_exit_3_after_the_generation_served_is_a_crash_and_respawned(start, tmp_path):
    gate = tmp_path / "gate"
    cfg = write_config(tmp_path, f'[workers]\ncount = 2\nready_timeout = 60\n'
                                 f'command = ["{sys.executable}", "{PROGRAMS / "loadfail.py"}", "{gate}"]\n'
                                 + own_control(tmp_path))
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{free_port()}")
    m.wait_ready()
    gate.write_text("cannot connect to the database\n")
    os.kill(m.workers()[0], signal.SIGKILL)
    msg = m.wait_status("exited with status 3 (the application could not be loaded) "
                        "(cannot connect to the database), retry in")
    assert msg["STATUS"].startswith("generation 1 serving: 1/2 workers ready"), msg
    gate.unlink()
    m.wait_status("generation 1 serving: 2/2 workers ready", timeout=20)
    assert m.proc.poll() is None and len(m.workers()) == 2
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


def test_term_refuses_new_connections_at_once_while_a_request_in_flight_finishes(start, tmp_path):
    # cadenza bound the socket itself (no socket unit, no fd store): nothing else holds it.
    port = free_port()
    cfg = write_config(tmp_path, '[workers]\ncount = 2\napp = "cadenza.demo:app"\n' + own_control(tmp_path))
    m = start("-c", str(cfg), "--bind", f"127.0.0.1:{port}")
    m.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/slow?s=3")
    deadline = time.monotonic() + 10
    while not accepted(port, conn.sock.getsockname()[1]):
        assert time.monotonic() < deadline, "the request was never accepted"
        time.sleep(0.01)   # /proc/net/tcp is the only witness of accept()
    m.signal(signal.SIGTERM)
    sent = time.monotonic()
    while True:
        probe = socket.socket()
        try:
            probe.connect(("127.0.0.1", port))
        except (ConnectionRefusedError, ConnectionResetError):
            # a reset: the probe's handshake was under way when the listener closed
            refused_after = time.monotonic() - sent
            break
        finally:
            probe.close()
        assert time.monotonic() - sent < 1.0, "new connections were still accepted 1 s after SIGTERM"
    resp = conn.getresponse()
    assert resp.status == 200 and "hello from cadenza worker" in resp.read().decode()
    answered_after = time.monotonic() - sent
    assert refused_after < 1.0 < answered_after, (refused_after, answered_after)   # refused while in flight
    assert m.wait_exit() == 0
