"""Failures of the OS, and the upgrade's pre-flight, under a real systemd 252 (tests/sdns.py).

DESIGN §4.1: a failure of the OS (fork EAGAIN under TasksMax=, ...) is an event like any other:
the operation fails with its reason, a waiting client is answered, the master carries on serving,
never leaves RELOADING=1 without READY=1, never signals pid <= 0. §4.2: pre-flight refuses a
release it cannot start, with the reason, before anything is forked; §3: a bad, empty or
truncated config in a new release, or one naming another app, fails that upgrade only.

Each test keeps an HTTP client running and asserts that it lost nothing, and asserts the end
state systemd reports. Limits are real: TasksMax= (see osfaults.TaskLimit).
"""
from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import AppRoot, base_python
from osfaults import (APP, ASGI_RELEASE, UNIT, Clients, TaskLimit, answer, control_connections_held, heir,
                      journal_has, main_pid, poll, status, title, unit_procs)
from procs import alive, children, free_port

EAGAIN = re.compile(r"Resource temporarily unavailable|EAGAIN|Errno 11\]")
FAIL_WITHIN = 10     # seconds: a reload that cannot work says so at once
RELOAD_BOUND = 60    # seconds: any reload that takes longer hangs
HTTPWORKER = Path(__file__).resolve().parent / "programs" / "httpworker.py"


def make_site(ns, exec_start: str | None = None, **release) -> AppRoot:
    """APP serving r1 (`release`: AppRoot.release's settings) from its pinned launcher,
    socket-activated, and an unrelated service beside it."""
    app = AppRoot(ns.state, APP, free_port())
    app.deploy("r1", **release)
    app.pin()
    for name, text in app.units().items():
        ns.write_unit(name, text)
    if exec_start:   # "{bin}" stands for ROOT/shared/bin
        exec_start = exec_start.replace("{bin}", str(app.root / "shared" / "bin"))
        ns.write_unit(f"{UNIT}.d/exec.conf", f"[Service]\nExecStart=\nExecStart={exec_start}\n")
    ns.write_unit("bystander.service", "[Service]\nExecStart=/bin/sleep infinity\n")
    ns.systemctl("daemon-reload", check=True)
    ns.systemctl("start", f"{APP}.socket", UNIT, "bystander.service", check=True)
    assert answer(app) == "release r1"
    return app


@pytest.fixture
def clients():
    made: list[Clients] = []

    def start(port: int, **kw) -> Clients:
        made.append(Clients(port, **kw))
        return made[-1]
    yield start
    for c in made:
        c.stop()


@pytest.fixture
def limits(systemd):
    made: list[TaskLimit] = []

    def make() -> TaskLimit:
        made.append(TaskLimit(systemd, UNIT))
        return made[-1]
    yield make
    for limit in made:
        limit.close()


def reload(ns, bound: float = RELOAD_BOUND) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    try:
        return ns.systemctl("reload", APP, timeout=bound), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        pass
    props = ns.show(UNIT, "ActiveState", "SubState", "StatusText")
    pytest.fail(f"BUG: `systemctl reload {APP}` still running after {bound}s; {props}\n"
                f"{ns.journal('-o', 'cat', '-n', '30')}")


def settled(ns, before: str) -> None:
    """The unit as it was: active, the same MainPID, never restarted."""
    props = ns.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts")
    assert props == {"ActiveState": "active", "SubState": "running", "MainPID": before, "NRestarts": "0"}, (
        f"{props}\n{ns.journal('-o', 'cat', '-n', '30')}")


def immediate_stop_hits_only_the_unit(ns) -> None:
    """`systemctl kill -s INT --kill-whom=main`: the master stops at once. Its processes end, it
    exits 0 (not SIGKILLed by a kill(0) of its own group, which Restart=on-failure would answer
    with a restart), and nothing outside the unit (journald, another service) is hit.
    The caller has stopped its clients: APP.socket would start the service again."""
    others = {u: ns.show(u, "MainPID")["MainPID"] for u in ("bystander.service", "systemd-journald.service")}
    procs = set(unit_procs(ns).values())
    assert ns.systemctl("kill", "-s", "INT", "--kill-whom=main", UNIT).returncode == 0
    poll(lambda: (p := ns.show(UNIT, "ActiveState", "NRestarts"))["ActiveState"] in ("inactive", "failed")
         or p["NRestarts"] != "0", timeout=20, what="the end of the unit")
    props = ns.show(UNIT, "ActiveState", "Result", "NRestarts", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0",
                     "ExecMainCode": "1", "ExecMainStatus": "0"}, f"{props}\n{ns.journal('-o', 'cat', '-n', '30')}"
    assert not [p for p in procs if alive(p)]
    for unit, pid in others.items():
        assert ns.show(unit, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}, unit


def eagain_lines(ns) -> list[str]:
    return [line for line in ns.journal("-o", "cat").splitlines() if EAGAIN.search(line)]


# ---- b. fork failure when an upgrade starts -------------------------------------------------

def test_fork_failure_at_upgrade_start_fails_the_reload_and_the_service_carries_on(systemd, clients, limits):
    site = make_site(systemd, **ASGI_RELEASE)
    client = clients(site.port)
    before, master = main_pid(systemd)
    site.deploy("r2", **ASGI_RELEASE)
    limit = limits()
    limit.set(limit.current())   # the master's next fork gets EAGAIN
    seen = 0
    for attempt in (1, 2):   # the second one, still limited, fails the same way and does not hang
        done, took = reload(systemd, bound=FAIL_WITHIN + 10)
        assert done.returncode != 0 and took < FAIL_WITHIN, (attempt, done, took)
        # systemctl has returned: the unit is active again, not still "reloading".
        settled(systemd, before)
        assert limit.failures() >= attempt, "the limit refused no fork: not the fault under test"
        lines = poll(lambda n=seen: len(eagain_lines(systemd)) > n and eagain_lines(systemd), timeout=5,
                     what=f"a reason naming the fork failure (EAGAIN) for reload {attempt}")
        seen = len(lines)
        assert answer(site) == "release r1" and alive(master)
    limit.set(None)
    done, _ = reload(systemd)
    assert done.returncode == 0, done.stderr + systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r2"
    assert set(client.check()) == {"release r1", "release r2"}
    immediate_stop_hits_only_the_unit(systemd)


# ---- c. a respawn whose fork fails -----------------------------------------------------------

def test_respawn_fork_failure_keeps_the_master_and_fills_the_slot_once_possible(systemd, clients, limits):
    site = make_site(systemd, **ASGI_RELEASE)
    client = clients(site.port, new_connections=False)   # held by one worker: the other is idle
    before, master = main_pid(systemd)
    held = unit_procs(systemd)[client.wait_keepalive_pid()]
    (victim,) = [w for w in children(master) if w != held]
    threads = int(Path(f"/proc/{victim}/status").read_text().split("Threads:")[1].split()[0])
    limit = limits()
    # Once the victim is gone the unit sits exactly at its limit: the respawn's fork gets EAGAIN.
    limit.set(limit.current() - threads)
    os.kill(victim, signal.SIGKILL)
    # Two refused forks: the master tried, and tried again (backoff), or it is gone.
    poll(lambda: limit.failures() >= 2 or not alive(master), timeout=20, what="two refused respawns")
    assert alive(master), f"BUG: the master died of a failed respawn\n{systemd.journal('-o', 'cat', '-n', '30')}"
    settled(systemd, before)
    assert answer(site) == "release r1"
    limit.set(None)
    systemd.wait_for(UNIT, "StatusText", "generation 1 serving: 2/2 workers ready", timeout=30)
    workers = children(master)
    assert len(workers) == 2 and held in workers and victim not in workers, workers
    settled(systemd, before)
    assert set(client.check()) == {"release r1"}
    immediate_stop_hits_only_the_unit(systemd)   # after fork failures: nothing signals pid 0


# ---- n. the new master's pidfd does not leak into workers ------------------------------------

def test_a_worker_respawned_during_an_upgrade_holds_no_pidfd(systemd, clients):
    site = make_site(systemd)
    client = clients(site.port, new_connections=False)
    before, master = main_pid(systemd)
    held = unit_procs(systemd)[client.wait_keepalive_pid()]
    site.deploy("r2", app_body="time.sleep(6)")   # gen 2 stays "starting" for 6 s
    reload_ = systemd.popen("systemctl", "reload", APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    new = poll(lambda: heir(systemd, site), what="gen 2 master")
    (victim,) = [w for w in children(master) if w != held and title(w).startswith("cadenza worker")]
    os.kill(victim, signal.SIGKILL)

    def respawned():
        fresh = [w for w in children(master) if w not in (held, victim)]
        return len(fresh) == 1 and title(fresh[0]).startswith("cadenza worker") and fresh[0]
    worker = poll(respawned, what="gen 1's replacement worker, exec'd")
    links = {}
    for fd in os.listdir(f"/proc/{worker}/fd"):
        try:
            links[int(fd)] = os.readlink(f"/proc/{worker}/fd/{fd}")
        except FileNotFoundError:
            pass
    assert alive(new) and systemd.show(UNIT, "MainPID")["MainPID"] == before, "the upgrade was over"
    pidfds = {fd: pidfd_target(worker, fd) for fd, link in links.items() if link == "anon_inode:[pidfd]"}
    assert not pidfds, (f"BUG: worker {worker} inherited pidfd(s) {pidfds} (fd: host pid it refers to; "
                        f"gen 2 master: {new}); its fds: {links}")
    assert reload_.wait(timeout=RELOAD_BOUND) == 0, reload_.communicate()
    assert answer(site) == "release r2"
    assert set(client.check()) <= {"release r1", "release r2"}


def pidfd_target(pid: int, fd: int) -> int | None:
    with contextlib.suppress(FileNotFoundError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("Pid:")[1].split()[0])
    return None


# ---- g. an empty, truncated or foreign cadenza.toml in the new release -----------------------

def _truncated(text: str) -> str:
    return text[:text.index("root = ") + 12]   # cut inside a string value


@pytest.mark.parametrize("damage, problems", [
    (lambda text: "", [("empty", "names no app")]),
    (_truncated, [("TOML", "line", "truncated")]),
    (lambda text: text.replace(f'name = "{APP}"', 'name = "other"'), [("other",), (APP,), ("name",)]),
], ids=["empty", "truncated", "other-app-name"])
def test_a_bad_config_in_the_new_release_fails_that_reload_only(systemd, clients, damage, problems):
    site = make_site(systemd)
    client = clients(site.port)
    before, _ = main_pid(systemd)
    procs_before = set(unit_procs(systemd).values())
    config = site.deploy("r2") / "cadenza.toml"
    config.write_text(damage(config.read_text()))
    done, _ = reload(systemd)
    assert done.returncode != 0, f"BUG: the reload succeeded\n{systemd.journal('-o', 'cat', '-n', '30')}"
    settled(systemd, before)
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    reason = "\n".join([last["reason"], *last.get("output", [])])
    names = (str(config), str(site.root / "current" / "cadenza.toml"))
    assert any(n in reason for n in names), f"the reason does not name the file: {reason!r}"
    for alternatives in problems:
        assert any(a in reason for a in alternatives), f"the reason names no {alternatives}: {reason!r}"
    journal_has(systemd, next(n for n in names if n in reason))   # what the operator sees
    poll(lambda: set(unit_procs(systemd).values()) == procs_before, what="gen 2 gone")
    site.deploy("r3")
    done, _ = reload(systemd)
    assert done.returncode == 0, done.stderr + systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r3"
    assert set(client.check()) == {"release r1", "release r3"}


# ---- k. pre-flight reads the new master's argv as `cadenza run` does ---------------------------

@pytest.mark.parametrize("config_arg", ["-c cadenza.toml", ""], ids=["-c CFG", "config from directory"])
def test_a_command_worker_with_its_own_dash_c_can_be_upgraded(systemd, clients, config_arg):
    # The worker is `python -c PROGRAM FILE`: its -c is the worker's, not cadenza's.
    program = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
    command = f'{{bin}}/cadenza run {config_arg} -- {sys.executable} -c "{program}" {HTTPWORKER}'
    site = make_site(systemd, exec_start=command)

    def served_by_the_command() -> bool:
        workers = children(main_pid(systemd)[1])
        return len(workers) == 2 and all(str(HTTPWORKER) in title(w) for w in workers)
    assert served_by_the_command()
    client = clients(site.port)
    site.deploy("r2")
    done, _ = reload(systemd)
    last = status(site)["last_upgrade"]
    assert done.returncode == 0 and last["ok"], f"BUG: upgrade refused: {last}"
    assert answer(site) == "release r2" and served_by_the_command()
    assert systemd.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert set(client.check()) == {"release r1", "release r2"}


# ---- l. idle control connections of an unprivileged user -------------------------------------

@pytest.mark.parametrize("opened_to", ["everyone", "status_groups"])
def test_idle_control_connections_of_an_unprivileged_user_do_not_block_a_reload(systemd, clients, opened_to):
    """The socket is 0660 root: nobody cannot even connect. An operator may open it to a
    monitoring group (status_groups, and its group on the socket) or to every local user (the
    master decides by SO_PEERCRED): then a user's 64 idle connections must not keep an
    operator's `systemctl reload` out."""
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    extra = f'status_groups = ["{group}"]\n' if opened_to == "status_groups" else ""
    site = make_site(systemd, config_extra=extra)
    if opened_to == "status_groups":
        os.chown(site.socket, -1, nobody.pw_gid)
    else:
        os.chmod(site.socket, 0o666)
    client = clients(site.port)
    site.deploy("r2", config_extra=extra)
    with control_connections_held(systemd, base_python(), site.socket, 64, nobody.pw_uid, nobody.pw_gid):
        done, _ = reload(systemd)
    assert done.returncode == 0, f"BUG: reload blocked: {done.stdout}{done.stderr}\n" + systemd.journal(
        "-o", "cat", "-n", "20")
    assert answer(site) == "release r2"
    assert set(client.check()) == {"release r1", "release r2"}
