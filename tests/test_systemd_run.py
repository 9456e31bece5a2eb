"""`cadenza run` under a real systemd 252 (tests/sdns.py), driven with systemctl as an operator would.

Pids: systemd reports pids of the namespace's pid namespace; the tests read /proc on the host,
so every pid is mapped through the unit's cgroup (cgroup.procs lists host pids, NSpid maps them).
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from procs import CADENZA, accepted, alive, children, cmdline, cpu_seconds, free_port, get
from units import config_toml, service_unit, socket_unit

APP = "web"
UNIT = f"{APP}.service"
WORKER_TITLES = [f"cadenza worker {i} gen 1 [{APP}]" for i in (1, 2)]
DATE = re.compile(r"\b\d{4}-\d\d-\d\d\b")
BACKOFF = re.compile(r"generation 1 starting: 0/2 workers ready; worker \d exited with status 1, "
                     r"retry in (\d+\.\d)s \((\d+) failed start\(s\) in a row\)")


def install(ns, *, port: int | None = None, args: tuple[str, ...] = (), restart: str = "on-failure",
            unit: str = UNIT, env: dict[str, str] | None = None, **workers) -> None:
    """Write cadenza.toml and the units; with `port`, APP.socket listens there and is started."""
    config = ns.state / f"{unit}.toml"
    config.write_text(config_toml(APP, **workers))
    ns.write_unit(unit, service_unit(config, *args, restart=restart, env=env))
    if port is not None:
        ns.write_unit(f"{APP}.socket", socket_unit(port))
    ns.systemctl("daemon-reload", check=True)
    if port is not None:
        ns.systemctl("start", f"{APP}.socket", check=True)


def poll(probe, timeout: float = 10.0, what: str = "condition"):
    """probe()'s first truthy value; only for states that no event announces to the test."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.02)
    return value


def cgroup_procs(ns, cgroup: str) -> dict[int, int]:
    """{pid inside the namespace: host pid} of every process in a unit's cgroup."""
    try:
        pids = (ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split()
    except FileNotFoundError:  # systemd removes the cgroup of a stopped unit
        return {}
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue  # exited while we looked
        nspid = next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:"))
        found[int(nspid)] = int(pid)
    return found


def running(ns) -> tuple[dict[str, str], int, list[int]]:
    """(unit properties, master host pid, worker host pids) of the running unit."""
    props = ns.show(UNIT, "ActiveState", "MainPID", "ControlGroup", "NRestarts", "StatusText")
    procs = cgroup_procs(ns, props["ControlGroup"])
    master = procs[int(props["MainPID"])]
    return props, master, children(master)


def journal_lines(ns, text: str, *args: str) -> list[str]:
    """`journalctl -o cat ARGS` once it shows `text`: journald reads a stream asynchronously,
    so a line written just before the process exited may land after systemctl returned."""
    def lines():
        found = ns.journal("-o", "cat", *args).splitlines()
        return any(text in line for line in found) and found
    return poll(lines, what=f"journal line {text!r}")



def test_first_connection_starts_it_and_active_means_all_workers_ready(systemd):
    port = free_port()
    install(systemd, port=port, count=2)
    assert systemd.show(UNIT, "ActiveState", "MainPID") == {"ActiveState": "inactive", "MainPID": "0"}
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(get, port, "/", 30)
        # Watch the activation as systemd reports it, until the first `active` (one `show`, so
        # the two properties are read together).
        seen = []
        while not seen or seen[-1]["ActiveState"] != "active":
            props = systemd.show(UNIT, "ActiveState", "StatusText")
            assert props["ActiveState"] in ("inactive", "activating", "active"), (props, seen)
            seen.append(props)
            assert len(seen) < 2000, seen[-5:]
        status, body = reply.result(timeout=30)
    assert seen[-1]["StatusText"] == "generation 1 serving: 2/2 workers ready", seen
    assert status == 200 and "hello from cadenza worker" in body, body
    props, master, workers = running(systemd)
    assert cmdline(master).startswith("cadenza master gen 1"), cmdline(master)
    assert sorted(cmdline(w) for w in workers) == WORKER_TITLES
    # Nothing of the service lives outside master + workers.
    assert set(cgroup_procs(systemd, props["ControlGroup"]).values()) == {master, *workers}


def test_stop_drains_a_request_in_flight_and_leaves_nothing(systemd):
    port = free_port()
    install(systemd, port=port, count=2)
    assert get(port)[0] == 200
    systemd.wait_for(UNIT, "ActiveState", "active")
    props, master, workers = running(systemd)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/slow?s=2")

    def read():
        resp = conn.getresponse()
        return dict(status=resp.status, body=resp.read().decode(), at=time.monotonic(),
                    connection=resp.getheader("connection"))
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(read)
        # Stop only once a worker holds the request: one still queued on systemd's socket would
        # just activate the service again after the stop.
        poll(lambda: accepted(port, conn.sock.getsockname()[1]), what="accept() of the request")
        stop = systemd.systemctl("stop", UNIT)
        stopped_at = time.monotonic()
        answer = reply.result(timeout=30)
    assert stop.returncode == 0, stop.stderr
    assert answer["status"] == 200 and "hello from cadenza worker" in answer["body"], answer
    assert answer["connection"] == "close", answer  # a keep-alive client is let go, not cut
    assert answer["at"] <= stopped_at, "systemctl stop returned before the request was answered"
    after = systemd.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, after
    assert cgroup_procs(systemd, props["ControlGroup"]) == {}
    assert not [p for p in (master, *workers) if alive(p)]


def test_killed_worker_is_replaced_without_restarting_the_unit(systemd):
    port = free_port()
    install(systemd, port=port, count=2)
    assert get(port)[0] == 200
    systemd.wait_for(UNIT, "ActiveState", "active")
    before, master, workers = running(systemd)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        props, _, now = running(systemd)
        return (victim not in now and len(now) == 2 and "2/2 workers ready" in props["StatusText"]
                and (props, now))
    props, now = poll(replaced, what="replacement worker ready")
    assert props["ActiveState"] == "active" and props["NRestarts"] == "0", props
    assert props["MainPID"] == before["MainPID"], (before, props)
    assert sorted(cmdline(w) for w in now) == WORKER_TITLES
    for _ in range(4):
        assert get(port)[0] == 200


def test_worker_failing_at_start_backs_off_and_master_stays_idle(systemd):
    # Exit 1, a crash: an exit 3 ("the application could not be loaded") fails the start at once.
    install(systemd, count=2, command=["sh", "-c", "exit 1"], ready_timeout=60,
            args=("--bind", f"127.0.0.1:{free_port()}"))
    # --no-block: the start job lasts as long as the unit is activating, which is the point here.
    systemd.systemctl("start", "--no-block", UNIT, check=True)
    poll(lambda: "retry in" in systemd.show(UNIT, "StatusText")["StatusText"], what="backoff status")
    before, master, _ = running(systemd)
    cpu0, t0 = cpu_seconds(master), time.monotonic()
    statuses = set()
    while time.monotonic() - t0 < 3:  # the measuring window, also checking the state throughout
        props = systemd.show(UNIT, "ActiveState", "MainPID", "StatusText")
        assert props["ActiveState"] == "activating" and props["MainPID"] == before["MainPID"], props
        statuses.add(props["StatusText"])
    used, elapsed = cpu_seconds(master) - cpu0, time.monotonic() - t0
    assert used / elapsed < 0.05, f"master used {used:.2f}s CPU in {elapsed:.1f}s"
    # Between a respawn and its exit the status has no "retry in" part; otherwise it names the
    # delay, which doubles from 0.1 s per failure in a row (README), up to 10 s.
    retries = [BACKOFF.fullmatch(text) for text in statuses - {"generation 1 starting: 0/2 workers ready"}]
    assert retries and all(retries), statuses
    assert all(float(m[1]) == round(min(0.1 * 2 ** (int(m[2]) - 1), 10), 1) for m in retries), statuses
    stop = systemd.systemctl("stop", UNIT)
    assert stop.returncode == 0 and systemd.show(UNIT, "ActiveState")["ActiveState"] == "inactive"


def test_workers_never_ready_fail_the_start_with_75(systemd):
    install(systemd, count=2, command=["sleep", "1000"], ready_timeout=1, restart="no",
            args=("--bind", f"127.0.0.1:{free_port()}"))
    start = systemd.popen("systemctl", "start", UNIT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The start blocks until it fails; meanwhile collect every process the unit ever had.
    cgroup = poll(lambda: systemd.show(UNIT, "ControlGroup")["ControlGroup"], what="unit cgroup")
    seen: set[int] = set()
    while start.poll() is None:
        seen |= set(cgroup_procs(systemd, cgroup).values())
        time.sleep(0.02)
    assert start.returncode != 0, start.stderr.read()
    props = systemd.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "75"}, props
    journal_lines(systemd, "start failed: 0/2 workers ready after 1s")
    assert len(seen) >= 3, seen  # master and both workers were seen...
    assert cgroup_procs(systemd, cgroup) == {} and not [p for p in seen if alive(p)]  # ...and are gone
    # README: "the start fails with a STATUS= that says why".  What `systemctl status` keeps is
    # the last STATUS= sent; cadenza sends the reason, then "generation 1 stopping" over it.
    status = systemd.show(UNIT, "StatusText")["StatusText"]
    assert "start failed: 0/2 workers ready after 1s" in status, f"BUG: StatusText={status!r}"


def test_an_app_that_cannot_be_imported_fails_the_start_at_once_with_78(systemd):
    install(systemd, count=2, app="nosuch_module:app", ready_timeout=60, restart="no",
            args=("--bind", f"127.0.0.1:{free_port()}"))
    t0 = time.monotonic()
    start = systemd.systemctl("start", UNIT)
    took = time.monotonic() - t0
    assert start.returncode != 0 and took < 20, (took, start.stderr)   # not after ready_timeout = 60
    props = systemd.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "StatusText")
    assert (props["ActiveState"], props["Result"], props["ExecMainStatus"]) == ("failed", "exit-code", "78"), props
    reason = ("exited with status 3 (the application could not be loaded): cannot load app 'nosuch_module:app'")
    assert props["StatusText"].startswith("generation 1 start failed: worker ") and reason in props["StatusText"]
    assert "ModuleNotFoundError: No module named 'nosuch_module'" in props["StatusText"], props
    journal_lines(systemd, "generation 1 start failed: worker ")


def test_stop_keeps_a_socket_units_listener_and_a_new_connection_waits_for_the_next_start(systemd):
    # systemd holds the listening socket: while the master drains, a new connection is queued on
    # it, not refused, and the start it triggers once the unit is down answers it.
    port = free_port()
    install(systemd, port=port, count=2)
    assert get(port)[0] == 200
    # Both workers serving (READY=1 reaches systemd only then): each has to log its drain below.
    systemd.wait_for(UNIT, "ActiveState", "active")
    _, master, _ = running(systemd)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/slow?s=2")
    with ThreadPoolExecutor(2) as pool:
        reply = pool.submit(lambda: conn.getresponse().status)
        poll(lambda: accepted(port, conn.sock.getsockname()[1]), what="accept() of the request")
        systemd.systemctl("stop", "--no-block", UNIT, check=True)
        # Both workers have stopped accepting (the journal is the only witness of that).
        poll(lambda: systemd.journal("-o", "cat", "-u", UNIT).count("Shutting down") == 2, what="the drain")
        late = pool.submit(get, port, "/", 30)
        assert reply.result(timeout=30) == 200
        status, body = late.result(timeout=30)
    assert status == 200 and "hello from cadenza worker" in body, body
    systemd.wait_for(UNIT, "ActiveState", "active")
    props, again, _ = running(systemd)
    assert again != master and props["NRestarts"] == "0", props   # started anew, by the socket


def test_outside_systemd_without_notify_socket(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOTIFY_SOCKET", "LISTEN_", "JOURNAL_STREAM", "WATCHDOG_"))}
    log = tmp_path / "cadenza.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([CADENZA, "run", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def answered():
            try:
                return get(port, timeout=5)[0] == 200
            except OSError:
                return False  # not bound yet
        poll(answered, timeout=20, what="HTTP 200")
        # Without NOTIFY_SOCKET only the log tells that both workers are up; a TERM that finds
        # a worker still starting is the case of test_stop_while_a_worker_starts_is_prompt.
        poll(lambda: "serving: 2/2 workers ready" in log.read_text(), what="2/2 ready in the log")
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = "still running 30s after SIGTERM"
        assert code == 0, f"{code}\n{log.read_text()}"
        assert not [w for w in workers if alive(w)]
        # Not under journald: plain timestamps, no priority prefixes.
        lines = log.read_text().splitlines()
        assert lines and all(DATE.match(line) for line in lines if "master[" in line), lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_journal_gets_priorities_and_no_timestamps(systemd):
    port = free_port()
    bind = ("--bind", f"127.0.0.1:{port}")
    install(systemd, count=1, args=bind)
    install(systemd, count=1, args=bind, unit="web2.service", restart="no")
    systemd.systemctl("start", UNIT, check=True)  # serves: info lines
    failed = systemd.systemctl("start", "web2.service")  # same port: an error line, exit 71
    assert failed.returncode != 0
    assert systemd.show("web2.service", "ExecMainStatus")["ExecMainStatus"] == "71"
    # journald may file a service's stream under init.scope: select by identifier, not by -u.
    bind_error = f"cannot listen on 127.0.0.1:{port}: Address already in use"
    ours = journal_lines(systemd, bind_error, "-t", "cadenza")
    errors = systemd.journal("-o", "cat", "-t", "cadenza", "-p", "err").splitlines()
    assert any(bind_error in line for line in errors), errors  # its <3> made it PRIORITY=3
    assert any("generation 1 starting" in line for line in ours), ours
    assert not any("generation 1 starting" in line for line in errors), errors
    # cadenza's own date, or a `<N>` prefix journald did not strip, would show in MESSAGE.
    assert not [line for line in ours if DATE.search(line) or re.search(r"\]: <\d>", line)], ours


# A stand-in for uvloop, which uvicorn (loop="auto") imports after cadenza's built-in worker has
# set its no-op SIGTERM handler and before uvicorn sets its own: it holds a starting worker there.
SLOW_UVLOOP = """\
import os, time
open(os.path.join(os.environ["CADENZA_TEST_MARKS"], str(os.getpid())), "w").close()
time.sleep(2)
raise ImportError("a stand-in: uvicorn falls back to asyncio")
"""


def test_stop_while_a_worker_starts_is_prompt(systemd):
    lib, marks = systemd.state / "pylib", systemd.state / "marks"
    lib.mkdir()
    marks.mkdir()
    (lib / "uvloop.py").write_text(SLOW_UVLOOP)
    install(systemd, count=1, graceful_timeout=10, args=("--bind", f"127.0.0.1:{free_port()}"),
            env={"PYTHONPATH": str(lib), "CADENZA_TEST_MARKS": str(marks)})
    systemd.systemctl("start", "--no-block", UNIT, check=True)
    poll(lambda: any(marks.iterdir()), what="a worker setting up its event loop")
    t0 = time.monotonic()
    stop = systemd.systemctl("stop", UNIT)
    elapsed = time.monotonic() - t0
    assert stop.returncode == 0 and systemd.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    # Nothing is in flight: the worker needs its 2 s to finish starting, then it should leave.
    assert elapsed < 6, (f"BUG: systemctl stop took {elapsed:.1f}s: the starting worker lost its "
                         "SIGTERM and the master waited out graceful_timeout (10s)")
