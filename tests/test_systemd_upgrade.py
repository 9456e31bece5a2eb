"""Zero-downtime upgrades under a real systemd 252 (tests/sdns.py), driven as an operator does:
deploy a release, switch `current`, `systemctl reload APP`, prune (DESIGN §1, §4).

Every test keeps two HTTP clients busy from the host for its whole length (one opening a new
connection per request, one on a keep-alive connection) and asserts that not one request failed.
Pids: systemd reports the namespace's pids; /proc on the host is read through the unit's cgroup.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from deploy import AppRoot
from procs import alive, children, free_port, get

APP = "web"
UNIT = f"{APP}.service"
DATE = re.compile(r"\b\d{4}-\d\d-\d\d\b")


class Hammer:
    """Sequential GETs on new connections, and on one keep-alive connection, until check()."""

    def __init__(self, port: int):
        self.port = port
        self.done = threading.Event()
        self.failures: list[str] = []
        self.seen: collections.Counter[str] = collections.Counter()   # "release rN" -> answers
        self.threads = [threading.Thread(target=t, daemon=True) for t in (self._fresh, self._keepalive)]
        for thread in self.threads:
            thread.start()

    def _record(self, name: str, request) -> None:
        try:
            status, body = request()
        except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
            self.failures.append(f"{name} {time.strftime('%T')}: {exc!r}")
            return
        if status != 200:
            self.failures.append(f"{name}: HTTP {status} {body!r}")
        else:
            self.seen[body.split(" pid")[0]] += 1

    def _fresh(self) -> None:
        # The waits only pace the clients, so they do not starve the masters of CPU.
        while not self.done.wait(0.005):
            self._record("new-connection", lambda: get(self.port))

    def _keepalive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

        def request():
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            except Exception:
                conn.close()   # the next request reconnects; this one still counts as failed
                raise
        while not self.done.wait(0.005):
            self._record("keep-alive", request)   # http.client reconnects after Connection: close
        conn.close()

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def check(self) -> collections.Counter:
        self.stop()
        assert not self.failures, f"{len(self.failures)} failed request(s): {self.failures[:10]}"
        assert sum(self.seen.values()) > 20, self.seen
        return self.seen


@pytest.fixture
def site(systemd):
    """APP serving release r1 from a pinned launcher, socket-activated."""
    app = AppRoot(systemd.state, APP, free_port())
    app.deploy("r1")
    app.pin()
    for name, text in app.units().items():
        systemd.write_unit(name, text)
    systemd.systemctl("daemon-reload", check=True)
    systemd.systemctl("start", f"{APP}.socket", UNIT, check=True)
    assert answer(app) == "release r1"
    return app


@pytest.fixture
def hammer(site):
    h = Hammer(site.port)
    yield h
    h.stop()


def answer(app: AppRoot) -> str:
    status, body = get(app.port)
    assert status == 200, body
    return body.split(" pid")[0]


def poll(probe, timeout: float = 15.0, what: str = "condition"):
    """probe()'s first truthy value; only for states that nothing announces to the test."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.01)
    return value


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def unit_procs(ns) -> dict[int, int]:
    """{namespace pid: host pid} of every live process in the unit's cgroup."""
    cgroup = ns.show(UNIT, "ControlGroup")["ControlGroup"]
    try:
        pids = (ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split() if cgroup else []
    except FileNotFoundError:   # systemd removes the cgroup of a stopped unit
        return {}
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        nspid = next(line.split()[-1] for line in status.splitlines() if line.startswith("NSpid:"))
        if alive(int(pid)):
            found[int(nspid)] = int(pid)
    return found


def main_pid(ns) -> tuple[str, int]:
    """MainPID as systemd says it, and the host pid of that process."""
    pid = ns.show(UNIT, "MainPID")["MainPID"]
    return pid, unit_procs(ns)[int(pid)]


def generation_procs(ns, gen: int) -> list[str]:
    return [t for t in map(title, unit_procs(ns).values()) if f" gen {gen} " in t]


def heir_of(master: int, workers: set[int]) -> int | None:
    """Master N's child that is not one of its workers: generation N+1's master."""
    return next((p for p in children(master) if p not in workers), None)


def status(app: AppRoot) -> dict:
    """`supervisorctl status --json`, spoken directly on the control socket from the host."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(app.socket))
        sock.sendall(b'{"cmd": "status"}\n')
        last = sock.makefile().read().splitlines()[-1]
    return json.loads(last)["status"]


def journal_has(ns, text: str) -> str:
    # journald reads the streams asynchronously: a line written just before systemctl returned
    # may land a moment later.
    return poll(lambda: text in (j := ns.journal("-o", "cat")) and j, what=f"journal line {text!r}")


def accepted(port: int, client_port: int) -> bool:
    """Has a worker accept()ed our connection?  A queued one has no socket inode yet."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == client_port:
            return f[9] != "0"
    return False


def slow_request(port: int, seconds: float) -> dict:
    """Sends GET /slow?s=N, returns once a worker holds it; the answer lands in the dict."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/slow?s={seconds}")
    out: dict = {}

    def read():
        try:
            resp = conn.getresponse()
            out.update(status=resp.status, body=resp.read().decode(), at=time.monotonic(),
                       connection=resp.getheader("connection"))
        except Exception as exc:  # noqa: BLE001 - reported by the test's assertion
            out["error"] = repr(exc)
    out["thread"] = threading.Thread(target=read, daemon=True)
    out["thread"].start()
    poll(lambda: accepted(port, conn.sock.getsockname()[1]), what="accept() of the slow request")
    return out


def test_five_deploys_each_reload_hands_over_and_prune_never_breaks_the_next(systemd, site, hammer):
    for n in range(2, 7):
        before, _ = main_pid(systemd)
        site.deploy(f"r{n}")
        t0 = time.monotonic()
        reload = systemd.systemctl("reload", APP)
        took = time.monotonic() - t0
        assert reload.returncode == 0, (reload.stderr, systemd.journal("-n", "40"))
        # `systemctl reload` blocks until the old generation drained: the very next request,
        # on a new connection, is answered by the new release.
        assert answer(site) == f"release r{n}", f"after reload {n} ({took:.2f}s)"
        props = systemd.show(UNIT, "MainPID", "NRestarts", "ActiveState", "SubState")
        assert props["MainPID"] != before, props
        assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0"), props
        st = status(site)
        assert (st["generation"], st["release"], st["last_upgrade"]["ok"]) == (n, str(site.path(f"r{n}")), True), st
        # From r3 on this deletes the release gen 1 was started from (by ExecStart), then the
        # one each earlier generation came from, venv and all: the next reload must not care.
        site.prune(keep=2)
        assert site.releases() == [f"r{n - 1}", f"r{n}"]
    assert set(hammer.check()) == {f"release r{n}" for n in range(1, 7)}


@pytest.mark.parametrize("broken, reason", [
    ("import-error", "ImportError: the release lacks missing_dep"),
    ("invalid-config", "workers.count"),
])
def test_failed_upgrade_fails_the_reload_and_the_old_release_keeps_serving(systemd, site, hammer,
                                                                           broken, reason):
    before, master = main_pid(systemd)
    procs_before = set(unit_procs(systemd).values())
    if broken == "import-error":   # worker start fails, gen 2 gives up after its ready_timeout
        site.deploy("r2", app_body='raise ImportError("the release lacks missing_dep")', ready_timeout=3)
    else:                          # refused at pre-flight: the new release's config does not parse
        site.deploy("r2", count="two")
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode != 0, reload
    props = systemd.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": before, "ActiveState": "active", "NRestarts": "0"}, props
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    assert not last["ok"] and reason in last["reason"], last
    journal_has(systemd, reason)   # the failed ExecReload's output says why
    # Whatever gen 2 had started is gone; gen 1 is exactly as it was.
    poll(lambda: set(unit_procs(systemd).values()) == procs_before, what="gen 2 gone")
    assert generation_procs(systemd, 2) == []
    # The operator fixes the release: the next reload works.
    site.deploy("r3")
    assert systemd.systemctl("reload", APP).returncode == 0
    assert answer(site) == "release r3"
    assert set(hammer.check()) == {"release r1", "release r3"}


@pytest.mark.parametrize("damage, reason", [
    ("missing", "is unusable: No such file or directory"),
    ("launcher o+w", "is writable by others"),
    ("bin dir o+w", "is writable by others"),
])
def test_unsafe_pinned_path_is_refused_before_anything_is_forked(systemd, site, hammer, damage, reason):
    launcher = site.root / "shared" / "bin" / "cadenza"
    site.deploy("r2")
    before, master = main_pid(systemd)
    procs_before, workers_before = set(unit_procs(systemd).values()), set(children(master))
    if damage == "missing":
        launcher.unlink()
    else:
        target = launcher if damage == "launcher o+w" else launcher.parent
        target.chmod(target.stat().st_mode | 0o002)
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode != 0, reload
    assert systemd.show(UNIT, "MainPID")["MainPID"] == before
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    assert last["reason"].startswith("refused: pinned path") and reason in last["reason"], last
    assert last["pid"] == 0, last   # no pid: nothing was forked
    journal_has(systemd, reason)
    journal = systemd.journal("-o", "cat")
    assert "generation 2 started" not in journal and "cadenza master gen 2" not in journal
    assert set(children(master)) == workers_before
    assert set(unit_procs(systemd).values()) == procs_before
    assert hammer.check() == {"release r1": sum(hammer.seen.values())}


def test_new_master_killed_while_its_workers_boot_rolls_back(systemd, site, hammer):
    site.deploy("r2", app_body="time.sleep(2)")   # the window: gen 2's workers import for 2 s
    before, master = main_pid(systemd)
    workers = set(children(master))
    reload = systemd.popen("systemctl", "reload", APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def booting_heir():
        heir = heir_of(master, workers)
        booting = [w for w in children(heir) if title(w).startswith("cadenza worker")] if heir else []
        return len(booting) == 2 and (heir, title(heir), booting)
    heir, heir_title, heir_workers = poll(booting_heir, what="gen 2 master with 2 booting workers")
    os.kill(heir, signal.SIGKILL)
    assert reload.wait(timeout=30) != 0
    props = systemd.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": before, "ActiveState": "active", "NRestarts": "0"}, props
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    # The cause reads "killed by SIGKILL" or "closed the hand-off channel", whichever master N
    # notices first: the channel's EOF and SIGCHLD race.
    assert not last["ok"] and last["generation"] == 2 and last["reason"].startswith("generation 2 "), last
    poll(lambda: not generation_procs(systemd, 2), what="gen 2 processes gone")
    assert not [p for p in (heir, *heir_workers) if alive(p)]
    assert set(children(master)) == workers
    assert hammer.check() == {"release r1": sum(hammer.seen.values())}
    # Last, so that the rollback above is checked even while this fails.
    assert heir_title.startswith(f"cadenza master gen 2 [{APP}]"), f"BUG: gen 2 master titled {heir_title!r}"


def test_ten_usr2_within_100ms_start_exactly_one_generation(systemd, site, hammer):
    site.deploy("r2")
    before, master = main_pid(systemd)
    t0 = time.monotonic()
    for _ in range(10):
        os.kill(master, signal.SIGUSR2)
    assert time.monotonic() - t0 < 0.1
    new = poll(lambda: (pid := systemd.show(UNIT, "MainPID")["MainPID"]) != before and pid, what="new MainPID")
    heir = unit_procs(systemd)[int(new)]
    # Settled: the old master has drained and left; only gen 2's master and workers remain.
    poll(lambda: not alive(master), what="gen 1 master exit")
    poll(lambda: set(unit_procs(systemd).values()) == {heir, *children(heir)} and len(children(heir)) == 2,
         what="only gen 2 left")
    systemd.wait_for(UNIT, "ActiveState", "active")
    assert answer(site) == "release r2"
    assert [t for t in map(title, unit_procs(systemd).values()) if "gen 3" in t] == []
    journal = systemd.journal("-o", "cat")
    assert journal.count("starting generation 2") == 1 and "generation 3" not in journal, journal
    assert (status(site)["generation"], systemd.show(UNIT, "NRestarts")["NRestarts"]) == (2, "0")
    assert set(hammer.check()) == {"release r1", "release r2"}
    assert title(heir).startswith(f"cadenza master gen 2 [{APP}]"), f"BUG: MainPID titled {title(heir)!r}"


def test_slow_requests_in_flight_on_the_old_generation_complete(systemd, site, hammer):
    site.deploy("r2")
    slow = [slow_request(site.port, 3) for _ in range(4)]   # held by gen 1's workers
    reload = systemd.systemctl("reload", APP)
    reloaded_at = time.monotonic()
    assert reload.returncode == 0, reload.stderr
    for s in slow:
        s["thread"].join(timeout=30)
        assert s.get("status") == 200 and s["body"].startswith("release r1 "), s
        # The reload returns only once the old generation drained: its requests first.
        assert s["at"] <= reloaded_at, s
    assert answer(site) == "release r2"
    assert set(hammer.check()) == {"release r1", "release r2"}


def test_stop_during_an_upgrade_drains_both_generations(systemd, site, hammer):
    site.deploy("r2", app_body="time.sleep(3)")   # gen 2 stays "starting" for 3 s
    before, master = main_pid(systemd)
    workers = set(children(master))
    assert systemd.systemctl("reload", "--no-block", APP).returncode == 0
    heir = poll(lambda: heir_of(master, workers), what="gen 2 master")
    poll(lambda: len(children(heir)) == 2, what="gen 2 workers")
    seen = set(unit_procs(systemd).values())
    # The clients stop before the stop: with APP.socket still listening, their next connection
    # would (rightly) activate the service again. One slow request is in flight instead.
    assert set(hammer.check()) == {"release r1"}
    slow = slow_request(site.port, 1)
    stop = systemd.systemctl("stop", UNIT)
    stopped_at = time.monotonic()
    assert stop.returncode == 0, stop.stderr
    slow["thread"].join(timeout=30)
    assert slow.get("status") == 200 and slow["body"].startswith("release r1 "), slow
    assert slow["at"] <= stopped_at and slow["connection"] == "close", slow
    assert unit_procs(systemd) == {} and not [p for p in seen if alive(p)]
    journal = systemd.journal("-o", "cat")
    # Gen 2 stopped by itself, and nothing was left for systemd's final SIGKILL (KillMode=mixed).
    assert "generation 2 stopped" in journal and "with signal SIGKILL" not in journal
    # An operator's stop ends inactive, not failed; systemd SIGTERMs the ExecReload process too.
    props = systemd.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, f"BUG: {props}"


def test_later_generations_log_to_the_journal_like_the_first(systemd, site, hammer):
    site.deploy("r2")
    assert systemd.systemctl("reload", APP).returncode == 0
    (site.root / "shared" / "bin").chmod(0o757)   # gen 2 must now log an error: it refuses
    assert systemd.systemctl("reload", APP).returncode != 0
    journal_has(systemd, "refused: pinned path")
    # README: under journald each line has its <N> priority prefix and no timestamp of its own.
    masters = [line for line in systemd.journal("-o", "cat", "-t", "cadenza").splitlines() if "master[" in line]
    assert not [line for line in masters if DATE.search(line)], f"BUG: {[m for m in masters if DATE.search(m)][:3]}"
    assert "refused: pinned path" in systemd.journal("-o", "cat", "-t", "cadenza", "-p", "err")
    assert set(hammer.check()) == {"release r1", "release r2"}
