"""The hand-over's fault cells under a real systemd 252 (DESIGN §4.1, §4.2 steps 6-7, §8).

The barrier window: master N has sent MAINPID=<N+1> and waits (at most 2 s) for systemd's
answer to BARRIER=1 before it tells N+1 "main".  The tests hold that window open by stopping
the namespace's systemd (`frozen`), start the upgrade with `supervisorctl upgrade` inside the
namespace (systemctl cannot work while systemd is stopped), act once it prints the "committed"
event (its text starts with "MAINPID="), then let systemd go on.  Each test keeps HTTP clients
busy (the Hammer; stop tests stop it before the stop, since the socket unit would start the
service again for its next connection) and asserts that none lost a request, and the end state.
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import threading
from pathlib import Path

import pytest

from handover_fixtures import (APP, CLIENTS, UNIT, Sampler, Upgrade, answer, frozen, main_pid, masters,
                               poll, slow_request, status, title, unit_procs)
from procs import alive, children, get

pytest_plugins = ("handover_fixtures",)   # the `site` and `hammer` fixtures

SIGKILLED = "with signal SIGKILL"   # systemd's "Killing process N (x) with signal SIGKILL."


def journal(ns) -> str:
    return ns.journal("-o", "cat")


def assert_stopped_cleanly(ns, main: int) -> None:
    """Inactive by an operator's kind of stop: success, never restarted, nothing left to SIGKILL;
    and the last main process systemd knew (ExecMainPID) was `main`, which exited 0."""
    ns.wait_for(UNIT, "ActiveState", "inactive", timeout=40)
    props = ns.show(UNIT, "ActiveState", "Result", "NRestarts", "ExecMainPID", "ExecMainStatus")
    text = journal(ns)
    assert props == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0",
                     "ExecMainPID": str(main), "ExecMainStatus": "0"}, f"{props}\n{text[-3000:]}"
    assert SIGKILLED not in text and "Scheduled restart job" not in text, text[-3000:]
    assert unit_procs(ns) == {}


def answered_by(request, release: str) -> dict:
    """The answer to a slow_request(), which must be 200 from `release`."""
    try:
        answered = request.result(timeout=30)
    except (OSError, http.client.HTTPException) as exc:
        pytest.fail(f"BUG: a request in flight was cut: {exc!r}")
    assert answered["status"] == 200 and answered["body"].startswith(f"{release} "), answered
    return answered


class Gate:
    """Deploys a release whose workers, at import, say so and wait until the test opens the gate:
    until then none of them accepts, so a request placed meanwhile is held by generation N."""

    def __init__(self, site, tag: str):
        self.path, self.count = site.root / "run" / f"gate-{tag}", site.workers["count"]
        gate = str(self.path)
        site.deploy(tag, app_body=f"open({gate!r} + '.' + os.environ['CADENZA_WORKER_ID'], 'w').close()\n"
                                  f"while not os.path.exists({gate!r}):\n    time.sleep(0.01)")

    def wait(self) -> None:
        poll(lambda: all(Path(f"{self.path}.{i}").exists() for i in range(1, self.count + 1)),
             timeout=30, what="the new release's workers at the gate")

    def open(self) -> None:
        self.path.touch()


def hand_over_holding(ns, site, seconds: float):
    """Upgrade to r2 by USR2 (no reload job waits for it) with one /slow?s=SECONDS request placed
    on generation N while r2's workers wait at the gate.  Returns (slow, new MainPID, N's host
    pid) once systemd took the new MainPID and N drains its request."""
    before, old = main_pid(ns)
    gate = Gate(site, "r2")
    assert ns.systemctl("kill", "-s", "USR2", "--kill-whom=main", APP).returncode == 0
    gate.wait()
    slow = slow_request(site.port, seconds)
    gate.open()
    new = int(poll(lambda: (pid := ns.show(UNIT, "MainPID")["MainPID"]) != before and pid,
                   what="MAINPID hand-over"))
    poll(lambda: len(children(old)) == 1, what="master N's idle worker gone (N drains)")
    assert not slow.done(), "setup: the slow request ended before N began to drain"
    return slow, new, old


# ---- a. a stop inside the barrier window ---------------------------------------------------

@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "slow-request-on-N"])
def test_stop_inside_the_barrier_window_completes_the_hand_over_then_both_drain(
        systemd, site, hammer, in_flight):
    _, old = main_pid(systemd)
    gate = Gate(site, "r2")
    slow = None
    with frozen(systemd):
        upgrade = Upgrade(systemd, site)
        if in_flight:
            gate.wait()
            slow = slow_request(site.port, 3)   # held by one of N's workers
        # The clients stop before the stop: APP.socket would start the service again for them.
        # And before the window opens: N waits at most 2 s for BARRIER=1 (a systemd that is slow
        # to read must not stall a hand-over), so the fault has to follow the commit at once.
        poll(lambda: sum(hammer.seen.values()) > 20, timeout=30, what="the clients to have run a while")
        assert set(hammer.check()) <= {"release r1"}
        gate.open()
        new = upgrade.committed()
        os.kill(old, signal.SIGTERM)   # what systemd's stop sends to its MainPID, N
        assert slow is None or not slow.done(), "setup: the slow request ended before the fault"
    if slow is not None:
        answered_by(slow, "release r1")
    # Whether it reached N before systemd's answer to BARRIER=1 (and so before "main") or in the
    # same turn of N's loop, N passes it on.
    landed = "is passed on to generation 2"
    try:
        poll(lambda: landed in systemd.journal("-o", "cat", "-u", UNIT), timeout=15,
             what="the stop to land in the barrier window (N forwards it)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nsupervisorctl: {upgrade.lines}\n"
                             f"{systemd.journal('-o', 'short-precise', '-u', UNIT)}") from None
    # The hand-over completed (systemd took N+1 as its main process), then the stop reached it.
    assert_stopped_cleanly(systemd, main=new)
    upgrade.wait(timeout=30)   # answered or let go; its exit code is not the point here


# ---- e. master N killed inside the barrier window -----------------------------------------

def test_old_master_killed_inside_the_barrier_window_leaves_the_new_one_main(systemd, site, hammer):
    site.deploy("r2")
    _, old = main_pid(systemd)
    old_workers = children(old)
    with frozen(systemd):
        upgrade = Upgrade(systemd, site)
        new = upgrade.committed()
        os.kill(old, signal.SIGKILL)
    systemd.wait_for(UNIT, "MainPID", str(new), timeout=15)
    # Settled: N's workers drained by themselves (PDEATHSIG); N+1 must still be main, and serve.
    poll(lambda: not any(map(alive, [old, *old_workers])), timeout=30, what="generation 1 gone")
    try:
        st = status(site)
    except OSError as exc:   # no master answers the control socket
        st = {"generation": None, "pid": repr(exc)}
    props = systemd.show(UNIT, "MainPID", "ActiveState", "SubState", "NRestarts")
    assert (props, st["generation"], st["pid"]) == (
        {"MainPID": str(new), "ActiveState": "active", "SubState": "running", "NRestarts": "0"}, 2, new), \
        f"{props} {st['generation']} {st['pid']}\n{journal(systemd)[-3000:]}"
    assert answer(site) == "release r2"
    assert set(hammer.check()) <= {"release r1", "release r2"}
    upgrade.wait(timeout=30)


# ---- d. systemctl stop while N still drains -----------------------------------------------

def test_stop_while_the_old_generation_drains_waits_for_it(systemd, site, hammer):
    slow, new, old = hand_over_holding(systemd, site, 4)
    assert set(hammer.check()) <= {"release r1", "release r2"}   # APP.socket would restart APP
    stop = systemd.systemctl("stop", UNIT, timeout=60)
    assert stop.returncode == 0, stop.stderr
    answered_by(slow, "release r1")
    assert not alive(old)
    assert_stopped_cleanly(systemd, main=new)


# ---- o. a second upgrade while the predecessor still drains -------------------------------

def test_second_upgrade_waits_until_the_predecessor_is_gone(systemd, site, hammer):
    site.release("r3")   # switched to once generation 2 is main
    census = Sampler(lambda: masters(systemd))
    try:
        slow, _, _ = hand_over_holding(systemd, site, 4)   # generation 1 leaves, slowly
        systemd.wait_for(UNIT, "ActiveState", "active")
        site.switch("r3")
        reload = systemd.systemctl("reload", APP, timeout=90)   # asks generation 2, the main one
        answered_by(slow, "release r1")
    finally:
        samples = census.stop()
    assert reload.returncode == 0, reload.stderr + journal(systemd)[-3000:]
    most = max(samples, key=lambda s: len(s[1]))[1]
    assert len(most) <= 2, f"BUG: {len(most)} masters at once: {sorted(most)}"
    seen = {}
    for at, found in samples:
        for name in found:
            seen.setdefault(name, [at, at])[1] = at
    assert {"cadenza master gen 1", "cadenza master gen 3"} <= set(seen), seen   # the sampler saw them
    assert seen["cadenza master gen 1"][1] < seen["cadenza master gen 3"][0], \
        "BUG: generation 3 started while generation 1 still drained"
    assert answer(site) == "release r3" and status(site)["generation"] == 3
    assert systemd.show(UNIT, "NRestarts")["NRestarts"] == "0"
    assert set(hammer.check()) <= {"release r1", "release r2", "release r3"}


# ---- h. TTIN to a leaving generation ------------------------------------------------------

def test_ttin_to_a_leaving_generation_is_refused(systemd, site, hammer):
    slow, _, old = hand_over_holding(systemd, site, 4)
    kept = set(children(old))
    spawned = Sampler(lambda: {pid: title(pid) for pid in set(children(old)) - kept})
    refusal = re.compile(r"refused.*generation 1 is leaving")
    try:
        os.kill(old, signal.SIGTTIN)
        poll(lambda: spawned.samples and spawned.samples[-1][1] or refusal.search(journal(systemd)),
             what="a new worker of N, or N's refusal in the journal")
        answered_by(slow, "release r1")
        poll(lambda: not alive(old), timeout=20, what="master N gone")
    finally:
        new_workers = {pid: t for _, found in spawned.stop() for pid, t in found.items() if t}
    assert not new_workers, f"BUG: the leaving generation started worker(s) {new_workers}"
    assert refusal.search(journal(systemd)), journal(systemd)[-3000:]
    assert answer(site) == "release r2"
    assert set(hammer.check()) <= {"release r1", "release r2"}


# ---- f. a failed upgrade lets the new generation's requests finish ------------------------

@pytest.mark.parametrize("site", [{"upgrade_timeout": 6}], indirect=True, ids=["upgrade.timeout=6"])
def test_failed_upgrade_lets_requests_the_new_workers_hold_finish(systemd, site, hammer):
    stop, answers = threading.Event(), []

    def slow_loop():   # /slow?s=2 on new connections, until the reload returned
        while not stop.is_set():
            try:
                answers.append(get(site.port, "/slow?s=2", timeout=30))
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                answers.append((repr(exc), ""))
    loops = [CLIENTS.submit(slow_loop) for _ in range(4)]
    _, master = main_pid(systemd)
    # Worker 1 of r2 becomes ready and serves; worker 2 never does: the upgrade times out.
    site.deploy("r2", app_body='if os.environ.get("CADENZA_WORKER_ID") == "2":\n    time.sleep(60)')
    reload = CLIENTS.submit(systemd.systemctl, "reload", APP, timeout=90)
    try:
        poll(lambda: hammer.seen["release r2"], what="an answer from r2's first worker")
        # One request surely held by r2's worker when the upgrade fails: N's workers, stopped
        # around its accept(), cannot take it.
        mine = [pid for pid in children(master) if title(pid).startswith("cadenza worker")]
        for pid in mine:
            os.kill(pid, signal.SIGSTOP)
        try:
            held = slow_request(site.port, 6)
        finally:
            for pid in mine:
                os.kill(pid, signal.SIGCONT)
        reloaded = reload.result(timeout=90)
    finally:
        stop.set()
        for loop in loops:
            loop.result(timeout=60)
    answered_by(held, "release r2")   # r2's worker held it when the upgrade failed
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"BUG: {len(failed)} of {len(answers)} /slow requests failed: {failed[:5]}"
    assert reloaded.returncode != 0, "the reload of a release that never became ready succeeded"
    assert answer(site) == "release r1" and not status(site)["last_upgrade"]["ok"]
    poll(lambda: " gen 2 " not in " ".join(map(title, unit_procs(systemd).values())), timeout=30,
         what="generation 2 gone")
    props = systemd.show(UNIT, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "active", "NRestarts": "0"}, props
    assert set(hammer.check()) <= {"release r1", "release r2"}
