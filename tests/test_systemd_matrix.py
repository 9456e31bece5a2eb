"""THE FAULT MATRIX of the hand-over, under a real systemd 252 (DESIGN §4.1, §4.2, §8):
(step of an upgrade) x (what arrives there), one namespace per cell.

How each step is held open while the event arrives (N: the serving master, generation 1;
N+1: the master the upgrade starts, generation 2):

  pre-flight  the upgrade is refused: the pinned launcher is made o+w; it stays so during the event
  fork        the upgrade's fork fails: a real pids limit (osfaults.TaskLimit) at the unit's task
              count; it stays during the event (lifted where the event needs it lifted, said so)
  booting     N+1 runs, its workers wait at a gate at import (no N+1 worker accepts yet)
  barrier     N has sent MAINPID=N+1 (the "MAINPID=" line of `supervisorctl upgrade`), systemd is
              SIGSTOPped before reading it (handover_fixtures.frozen): N committed, N+1 appointed
  main        N+1 is systemd's MainPID, N drains a /slow?s=4 request it holds (N+1 taking over)
  gone        the upgrade is over: N exited, N+1 serves alone

Events: stop (`systemctl stop`; SIGTERM to systemd's MainPID, N, while systemd is stopped), kill N
(SIGKILL), kill N+1 (SIGKILL), scale (SIGTTIN to N and to N+1, where each exists), HUP (to N and to
N+1), upgrade (a second `supervisorctl upgrade`, SIGUSR2 to N and to N+1), OS fault (fork EAGAIN
under a real pids limit, at what that step forks).

Every cell runs the Hammer (a new connection per request and a keep-alive one) from before the
step until the end, and samples the unit's masters all along (never more than 2 generations).
A stop cell ends the Hammer right before the stop (APP.socket would start the service again for
its next connection) and places a /slow request instead, which must be answered. Then it checks
the end state the cell's Expect names: ActiveState (a stopped unit: Result=success, exit 0,
nothing SIGKILLed, no restart, and ExecMainPID = the last main), MainPID, NRestarts, the release
that answers, the generation on the control socket and its ready workers, the exit codes of the
upgrades, the journal's "... refused: generation G is ..." lines, and what the clients lost.

MATRIX below is the whole expectation, one entry per (step, event); a cell that does not apply is
a NotApplicable entry with the reason, and is not generated. `also` names an older test of the
same cell; the matrix exercises every applicable cell itself all the same.

The releases serve an ASGI app (matrix_support.ASGI) that needs no thread per request, so that a
pids limit refuses only the forks under test. The barrier window lasts at most BARRIER_TIMEOUT
(2 s) from N's MAINPID=; a cell checks that its event landed inside it (N's own log order), and
one that landed too late (a starved test machine) is run again in a new namespace, at most
ATTEMPTS times, with a warning: that is a miss of the test, never a pass for the master.
With MATRIX_DUMP=DIR each cell's journal is written to DIR/STEP-EVENT.log.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import warnings
from dataclasses import dataclass

import pytest

import sdns
from handover_fixtures import (APP, UNIT, Hammer, answer, frozen, main_pid, poll, slow_request, status,
                               title, unit_procs)
from matrix_support import (ArmedUpgrade, Census, Gate, KernelLimit, Upgrade, deploy, host_pid, make_site, threads,
                            zombies)
from osfaults import TaskLimit
from procs import alive, children

STEPS = ("pre-flight", "fork", "booting", "barrier", "main", "gone")
EVENTS = ("stop", "kill N", "kill N+1", "scale", "HUP", "upgrade", "OS fault")


@dataclass(frozen=True)
class Expect:
    why: str                          # what happens, in words
    unit: str = "active"              # ActiveState at the end
    main: str = "N+1"                 # MainPID at the end: N, N+1, N+2, or "restarted" (a new instance);
                                      # for an inactive unit, ExecMainPID: the last main process
    restarts: int = 0                 # NRestarts
    serves: str | None = "r2"         # the release that answers at the end
    gen: int | None = 2               # the generation that answers the control socket at the end
    workers: int = 2                  # its ready workers
    lost: str = "nothing"             # or "in flight": none refused, at most one per client, and the
                                      # /slow request may be cut
    rc: int | tuple | None = 0        # exit code (or the codes allowed) of the step's `supervisorctl upgrade`
    rc2: int | None = None            # exit code of the event's own upgrade (or reload), if it has one
    refused: tuple[str, ...] = ()     # the table's refusals, as logged
    logged: tuple[str, ...] = ()      # other lines the journal must show
    replaced: bool | None = None      # whether the serving generation's workers are all new at the end
    also: str = ""                    # an older test of the same cell


@dataclass(frozen=True)
class NotApplicable:
    why: str


EAGAIN = "Resource temporarily unavailable"
STOPPED = {"unit": "inactive", "serves": None, "gen": None}   # a stopped unit answers nothing
OLD = {"main": "N", "serves": "r1", "gen": 1}                 # N is still the one that serves
CRASH = {"main": "restarted", "restarts": 1, "serves": "r2", "gen": 1, "lost": "in flight"}   # `current` is r2

# (step, event) -> what must happen.  README "If master N is SIGKILLed" promises the kill-N cells.
MATRIX: dict[tuple[str, str], Expect | NotApplicable] = {
    # ---- pre-flight: `supervisorctl upgrade` refused (pinned launcher o+w), nothing forked ----------
    ("pre-flight", "stop"): Expect(
        "the refusal changed nothing: N drains (the /slow request is answered), the unit ends cleanly",
        **STOPPED, main="N", rc=1),
    ("pre-flight", "kill N"): Expect(
        "an ordinary crash: systemd kills the rest of the unit, Restart=on-failure starts it again from "
        "`current` (r2; systemd's ExecStart= does not check the launcher's mode); the socket queues "
        "connections meanwhile", **CRASH, rc=1,
        also="test_systemd_upgrade::test_old_master_killed_before_the_fork_is_an_ordinary_crash"),
    ("pre-flight", "kill N+1"): NotApplicable("pre-flight forks nothing: there is no N+1"),
    ("pre-flight", "scale"): Expect("TTIN to N is obeyed (there is no N+1): 3 workers", **OLD, workers=3, rc=1),
    ("pre-flight", "HUP"): Expect("HUP to N: a rolling restart replaces both workers", **OLD, rc=1, replaced=True),
    ("pre-flight", "upgrade"): Expect(
        "a second `supervisorctl upgrade` and SIGUSR2 to N, the launcher still o+w, are refused the same "
        "way; with the launcher fixed, a third upgrade hands over to r2", rc=1, rc2=1,
        logged=("upgrade requested by SIGUSR2 refused: pinned path",)),
    ("pre-flight", "OS fault"): NotApplicable(
        "pre-flight forks nothing, so no fork can fail there (EAGAIN first applies at the fork, next row)"),

    # ---- fork: the upgrade's fork fails (EAGAIN at a real pids limit); the limit stays on -----------
    ("fork", "stop"): Expect("a stop needs no fork: N drains under the limit, the unit ends cleanly",
                             **STOPPED, main="N", rc=1),
    ("fork", "kill N"): Expect(
        "an ordinary crash, as at pre-flight; the limit is lifted right before the kill so that the "
        "restarted unit is not held by it", **CRASH, rc=1),
    ("fork", "kill N+1"): NotApplicable("the fork failed: there is no N+1"),
    ("fork", "scale"): Expect(
        "TTIN to N: the third worker's fork fails (EAGAIN) and is retried with backoff while N serves "
        "2/3; once the limit is lifted it starts: 3/3", **OLD, workers=3, rc=1,
        logged=(f"worker 3 could not be started: fork failed: {EAGAIN}",)),
    ("fork", "HUP"): Expect(
        "HUP to N: make-before-break, the first replacement cannot fork, the rolling restart is abandoned "
        "and the old workers keep serving; a HUP once the limit is lifted replaces both",
        **OLD, rc=1, replaced=True, logged=("worker 1 could not be replaced: fork failed", "rolling restart abandoned")),
    ("fork", "upgrade"): Expect(
        "a second `supervisorctl upgrade` and SIGUSR2 to N fail the same way, at once; with the limit "
        "lifted, a third hands over", rc=1, rc2=1, logged=(f"could not start generation 2: {EAGAIN}",),
        also="test_systemd_os_faults::test_fork_failure_at_upgrade_start_fails_the_reload_and_the_service_carries_on"),
    ("fork", "OS fault"): Expect(
        "the limit one task higher: the double fork's first fork succeeds and its second (N+1 itself) "
        "fails; the upgrade fails with that reason, the middle process is reaped, N serves",
        **OLD, rc=1, rc2=1, logged=(f"the next master could not be forked: {EAGAIN}",)),

    # ---- booting: N+1's workers wait at a gate (N upgrading, N+1 starting) ----------------------------
    ("booting", "stop"): Expect(
        "N tells N+1 to stop (its workers, still importing, end) and drains (the /slow request is "
        "answered); the upgrade fails; the unit ends cleanly", **STOPPED, main="N", rc=1,
        logged=("upgrade to generation 2 failed: the service is stopping",),
        also="test_systemd_upgrade::test_stop_during_an_upgrade_drains_both_generations"),
    ("booting", "kill N"): Expect(
        "README: after the fork, before N+1 is ready, an ordinary crash; N+1 goes with the unit, which "
        "restarts from `current` (r2); `supervisorctl upgrade` lost its master (exit 3)", **CRASH, rc=3,
        also="test_systemd_upgrade::test_old_master_killed_while_the_next_one_boots"),
    ("booting", "kill N+1"): Expect(
        "N sees N+1 gone before it was ready: the upgrade fails (READY=1 follows), N+1's workers go, "
        "N serves on", **OLD, rc=1, logged=("upgrade to generation 2 failed: generation 2 ",),
        also="test_systemd_upgrade::test_new_master_killed_while_its_workers_boot_rolls_back"),
    ("booting", "scale"): Expect(
        "refused by both (N upgrading, N+1 starting); after the hand-over N+1 has its configured 2",
        refused=("add a worker refused: generation 1 is upgrading", "add a worker refused: generation 2 is starting")),
    ("booting", "HUP"): Expect(
        "refused by both (N upgrading, N+1 starting); N+1's workers are the ones that booted",
        replaced=False,
        refused=("rolling restart refused: generation 1 is upgrading",
                 "rolling restart refused: generation 2 is starting")),
    ("booting", "upgrade"): Expect(
        "a second `supervisorctl upgrade` and SIGUSR2 to N join the running upgrade, and succeed with it; "
        "SIGUSR2 to N+1 is refused; one generation 2, no 3", rc2=0,
        refused=("upgrade refused: generation 2 is starting",),
        logged=("joining the upgrade to generation 2 already running",)),
    ("booting", "OS fault"): Expect(
        "an N+1 worker dies at the gate and its respawn's fork fails (EAGAIN): N+1 retries with "
        "backoff; once the limit is lifted the slot fills and the hand-over completes",
        logged=(f"could not be started: fork failed: {EAGAIN}",)),

    # ---- barrier: MAINPID=N+1 sent, systemd stopped before reading it (N committed, N+1 appointed) ----
    ("barrier", "stop"): Expect(
        "SIGTERM to N (systemd's MainPID still) is forwarded: the hand-over completes, then N+1 stops "
        "once N drained; the /slow request is answered; ExecMainPID is N+1. N's loop meets the stop in "
        "the same wakeup as systemd's answer to BARRIER=1 (N is held with SIGSTOP until systemd took "
        "MAINPID=): whichever it dispatches first, the stop must reach N+1 (before 88eb8cc it handed "
        "over without 'stop' and then ignored the stop as leaving: the unit stayed active)",
        **STOPPED, main="N+1",
        also="test_systemd_handover::test_stop_inside_the_barrier_window_completes_the_hand_over_then_both_drain"),
    ("barrier", "kill N"): Expect(
        "README: after MAINPID=, N+1 is main and serves, N's workers drain (PDEATHSIG); nothing fails; "
        "`supervisorctl upgrade` lost its master (exit 3)", rc=3,
        also="test_systemd_handover::test_old_master_killed_inside_the_barrier_window_leaves_the_new_one_main"),
    ("barrier", "kill N+1"): Expect(
        "N+1 dies after MAINPID= went out, before systemd read it (N, committed, sees it die on its "
        "pidfd): systemd refuses that MAINPID= ('does not exist or is a zombie') and N is still its "
        "main process, so N says MAINPID=itself and READY=1 and serves on with its workers; the "
        "upgrade fails with the reason (exit 1)",
        **OLD, rc=1, logged=("exited after MAINPID= named it; generation 1 serves on",)),
    ("barrier", "scale"): Expect(
        "refused by both (N committed, phrased 'leaving'; N+1 not main yet); after the hand-over N+1 "
        "has 2 workers",
        refused=("add a worker refused: generation 1 is leaving", "add a worker refused: generation 2 is not main")),
    ("barrier", "HUP"): Expect(
        "refused by both (N committed, N+1 not main yet)", replaced=False,
        refused=("rolling restart refused: generation 1 is leaving",
                 "rolling restart refused: generation 2 is not main")),
    ("barrier", "upgrade"): Expect(
        "a second `supervisorctl upgrade` (N, committed, still answers the control socket) and SIGUSR2 "
        "to N join the upgrade and succeed with it; SIGUSR2 to N+1 is refused (not main)", rc2=0,
        refused=("upgrade refused: generation 2 is not main",),
        logged=("joining the upgrade to generation 2 already running",)),
    ("barrier", "OS fault"): Expect(
        "an N+1 worker ends in the window (SIGTERM: it finishes what it holds) and its respawn's fork "
        "fails (EAGAIN; pids.max written while systemd is stopped); systemd stays stopped past "
        "BARRIER_TIMEOUT until N has exited: N+1 was told 'main' without systemd's answer, then "
        "systemd takes MAINPID=; lifted, the slot fills",
        logged=(f"could not be started: fork failed: {EAGAIN}",)),

    # ---- main: N+1 is MainPID, N drains a /slow request (N+1 taking over, N leaving) ----------------
    ("main", "stop"): Expect(
        "N+1 waits for N: the /slow request is answered, both drain, nothing for SIGKILL",
        **STOPPED, main="N+1",
        also="test_systemd_handover::test_stop_while_the_old_generation_drains_waits_for_it"),
    ("main", "kill N"): Expect(
        "README: N's workers get SIGTERM (PDEATHSIG) and finish the /slow request; N+1 serves alone; "
        "`supervisorctl upgrade` lost its master (exit 3)", rc=3,
        also="test_systemd_upgrade::test_old_master_killed_after_mainpid_leaves_a_defined_state"),
    ("main", "kill N+1"): Expect(
        "the main process crashed: systemd SIGKILLs the rest of the unit (KillMode=mixed), N and its "
        "/slow request included, and restarts it from `current`; none refused", **CRASH, rc=3),
    ("main", "scale"): Expect(
        "TTIN to N refused (leaving), to N+1 obeyed: 3 workers; the /slow request is answered",
        workers=3, refused=("add a worker refused: generation 1 is leaving",),
        also="test_systemd_handover::test_ttin_to_a_leaving_generation_is_refused"),
    ("main", "HUP"): Expect(
        "HUP to N refused (leaving), to N+1 a rolling restart", replaced=True,
        refused=("rolling restart refused: generation 1 is leaving",)),
    ("main", "upgrade"): Expect(
        "`supervisorctl upgrade` (to r3) and SIGUSR2 to N+1 wait until N has gone, then start one "
        "generation 3; SIGUSR2 to N is refused (leaving)", main="N+2", serves="r3", gen=3, rc2=0,
        refused=("upgrade refused: generation 1 is leaving",),
        logged=("waiting until generation 1 has drained",),
        also="test_systemd_handover::test_second_upgrade_waits_until_the_predecessor_is_gone"),
    ("main", "OS fault"): Expect(
        "TTIN to N+1 at the unit's task limit: the third worker's fork fails (EAGAIN) and is retried "
        "while N+1 serves 2/3 and N drains (its /slow request is answered); lifted, 3/3", workers=3,
        logged=(f"worker 3 could not be started: fork failed: {EAGAIN}",)),

    # ---- gone: N exited, N+1 serves alone -------------------------------------------------------
    ("gone", "stop"): Expect("an ordinary stop of generation 2 (the /slow request is answered)",
                             **STOPPED, main="N+1"),
    ("gone", "kill N"): NotApplicable("N has exited"),
    ("gone", "kill N+1"): Expect("an ordinary crash of the main process: restarted from `current`", **CRASH),
    ("gone", "scale"): Expect("TTIN to N+1: 3 workers", workers=3),
    ("gone", "HUP"): Expect("HUP to N+1: a rolling restart", replaced=True),
    ("gone", "upgrade"): Expect(
        "`supervisorctl upgrade` (to r3) and SIGUSR2 to N+1: one of them starts generation 3, the other "
        "joins it", main="N+2", serves="r3", gen=3, rc2=0,
        logged=("joining the upgrade to generation 3 already running",)),
    ("gone", "OS fault"): Expect(
        "fork EAGAIN at the next upgrade of a generation that got the service by a hand-over: "
        "`systemctl reload` fails at once and the unit is active again (N+1's READY=1 was taken)", rc2=1,
        logged=(f"could not start generation 3: {EAGAIN}",)),
}


def test_the_matrix_names_every_cell():
    assert set(MATRIX) == {(s, e) for s in STEPS for e in EVENTS}, set(MATRIX) ^ {(s, e) for s in STEPS for e in EVENTS}


CELLS = [pytest.param(step, event, id=f"{step}/{event}".replace(" ", "-"))
         for (step, event), want in MATRIX.items() if isinstance(want, Expect)]


# ---- one cell's world -------------------------------------------------------------------------

class Cell:
    def __init__(self, ns, step: str, event: str):
        self.ns, self.step, self.event = ns, step, event
        self.site = make_site(ns)
        n_ns, n = main_pid(ns)
        self.pids = {"N": (n_ns, n)}          # name -> (namespace pid, host pid)
        self.upgrade: Upgrade | None = None   # the step's
        self.rc: int | None = None
        self.rc2: int | None = None
        self.slow: list = []                  # requests that must be answered (unless lost is "in flight")
        self.limit: TaskLimit | None = None
        self.kernel_limit: KernelLimit | None = None   # the same limit, for a window with systemd stopped
        self.second: Upgrade | None = None             # the event's own `supervisorctl upgrade`
        self.gate: Gate | None = None
        self.frozen = False
        self.held_n = False                   # N stopped with SIGSTOP by the event
        self.workers_before: set[int] | None = None
        self.hammer = Hammer(self.site.port)  # last: close() ends them
        self.census = Census(ns)

    def host(self, who: str) -> int | None:
        return self.pids.get(who, (None, None))[1]

    def known(self, who: str) -> str | None:
        return self.pids.get(who, (None, None))[0]

    def journal(self) -> str:
        return self.ns.journal("-o", "cat")

    def lift(self) -> None:
        if self.limit is None:
            return
        if self.ns.show(UNIT, "ControlGroup")["ControlGroup"]:
            self.limit.set(None)
        else:   # the unit stopped: a later start must not inherit the limit
            self.ns.systemctl("set-property", "--runtime", UNIT, "TasksMax=infinity", check=True)

    def release_n(self) -> None:
        if self.held_n:
            self.held_n = False
            os.kill(self.host("N"), signal.SIGCONT)

    def close(self) -> None:
        self.release_n()
        self.hammer.finish()
        self.census.stop()
        if self.limit is not None:
            self.limit.close()


def workers_of(pid: int) -> set[int]:
    return {w for w in children(pid) if title(w).startswith("cadenza worker")}


def refused_upgrade(cell: Cell, text: str) -> None:
    rc, out = cell.upgrade.finish(20)
    assert rc == 1 and text in out, f"setup: the upgrade was not refused/failed with {text!r}: rc {rc}\n{out}"
    cell.rc = rc


# ---- the steps: each brings the upgrade there and holds it while the event arrives ---------------

@contextlib.contextmanager
def at_preflight(cell: Cell):
    deploy(cell.site, "r2")
    launcher = cell.site.root / "shared" / "bin" / "cadenza"
    launcher.chmod(0o757)
    cell.upgrade = Upgrade(cell.ns, cell.site)
    refused_upgrade(cell, "refused: pinned path")
    try:
        yield
    finally:
        launcher.chmod(0o755)


@contextlib.contextmanager
def at_fork(cell: Cell):
    deploy(cell.site, "r2")
    cell.limit = TaskLimit(cell.ns, UNIT)
    cell.limit.set(cell.limit.current())   # N's next fork gets EAGAIN
    cell.upgrade = Upgrade(cell.ns, cell.site)
    refused_upgrade(cell, EAGAIN)
    assert cell.limit.failures() >= 1, "setup: the limit refused no fork"
    try:
        yield
    finally:
        cell.lift()


def start_gated(cell: Cell) -> None:
    cell.gate = Gate(cell.site, "r2")
    cell.upgrade = Upgrade(cell.ns, cell.site)
    new_ns = cell.upgrade.started()
    cell.gate.wait()
    cell.pids["N+1"] = (new_ns, host_pid(cell.ns, new_ns))


@contextlib.contextmanager
def at_booting(cell: Cell):
    start_gated(cell)
    try:
        yield
    finally:
        cell.gate.open()


@contextlib.contextmanager
def at_barrier(cell: Cell):
    start_gated(cell)
    with frozen(cell.ns):
        cell.gate.open()
        committed = cell.upgrade.committed()
        assert str(committed) == cell.known("N+1"), f"setup: MAINPID={committed}, not N+1"
        cell.frozen = True
        try:
            yield
        finally:
            cell.frozen = False


@contextlib.contextmanager
def at_main(cell: Cell):
    start_gated(cell)
    cell.slow.append(slow_request(cell.site.port, 4))   # held by N: N+1's workers are at the gate
    mine = workers_of(cell.host("N"))
    cell.gate.open()
    poll(lambda: cell.ns.show(UNIT, "MainPID")["MainPID"] == cell.known("N+1"), what="MainPID = N+1")
    # N drains: its idle worker has gone, reaped (no more a task of the unit), the other holds /slow.
    poll(lambda: sum(os.path.exists(f"/proc/{w}") for w in mine) == 1, what="N's idle worker gone")
    assert not cell.slow[0].done(), "setup: the /slow request ended before N began to drain"
    yield


@contextlib.contextmanager
def at_gone(cell: Cell):
    deploy(cell.site, "r2")
    cell.upgrade = Upgrade(cell.ns, cell.site)
    cell.rc, out = cell.upgrade.finish(40)
    assert cell.rc == 0, f"setup: the upgrade failed\n{out}"
    poll(lambda: not alive(cell.host("N")), what="N gone")
    new_ns, new = main_pid(cell.ns)
    cell.pids["N+1"] = (new_ns, new)
    yield


STEP_HOLDS = {"pre-flight": at_preflight, "fork": at_fork, "booting": at_booting, "barrier": at_barrier,
              "main": at_main, "gone": at_gone}


# ---- the events: act() while the step is held, after() once it is let go ----------------------

def to_masters(cell: Cell, sig: int, *who: str) -> int:
    """Signal those of `who` that exist; how many were signalled."""
    sent = 0
    for name in who:
        pid = cell.host(name)
        if pid is not None and alive(pid):
            os.kill(pid, sig)
            sent += 1
    return sent


def wait_journal(cell: Cell, *texts: str, timeout: float = 15) -> None:
    poll(lambda: all(t in cell.journal() for t in texts), timeout, f"journal lines {texts}")


def serving_workers(cell: Cell) -> set[int]:
    """Host pids of the workers of the generation that will serve at the end (N before a hand-over
    that the step cannot reach, else N+1)."""
    who = "N+1" if "N+1" in cell.pids else "N"
    return workers_of(cell.host(who))


def stop(cell: Cell) -> None:
    # The clients end before the stop: APP.socket would start the service again for them.
    assert not cell.hammer.finish(), f"before the stop: {cell.hammer.failures[:5]}"
    if cell.step != "main":   # at "main", N's /slow request is in flight already
        cell.slow.append(slow_request(cell.site.port, 2))
    if cell.frozen:
        # What systemd's stop sends to its MainPID, N, which has sent MAINPID=N+1 and BARRIER=1. N
        # is held (SIGSTOP, as a busy machine would) until systemd has answered the barrier: N's
        # loop then wakes with the stop and the answer at once, and must still forward the stop.
        os.kill(cell.host("N"), signal.SIGSTOP)
        cell.held_n = True
        os.kill(cell.host("N"), signal.SIGTERM)
    else:
        done = cell.ns.systemctl("stop", UNIT, timeout=60)
        assert done.returncode == 0, done.stderr


def stop_after(cell: Cell) -> None:
    if cell.held_n:   # systemd, let go, has read MAINPID= and BARRIER=1 (one batch, before any request)
        poll(lambda: cell.ns.show(UNIT, "MainPID")["MainPID"] == cell.known("N+1"), what="MainPID = N+1")
        if cell.upgrade.seen("MAINPID handed over"):   # N is stopped: only a line written before that
            cell.release_n()
            raise WindowMissed("N handed over (BARRIER_TIMEOUT) before the stop reached it")
        cell.release_n()


def kill_n(cell: Cell) -> None:
    if cell.step == "fork":
        cell.lift()
    os.kill(cell.host("N"), signal.SIGKILL)


def kill_n1(cell: Cell) -> None:
    os.kill(cell.host("N+1"), signal.SIGKILL)
    if cell.frozen:   # N learns it (pidfd) before systemd reads MAINPID=
        wait_journal(cell, f"generation 2 (pid {cell.known('N+1')}) exited")


def scale(cell: Cell) -> None:
    to_masters(cell, signal.SIGTTIN, "N", "N+1")
    if cell.step == "fork":   # the new slot's fork is refused, then it fills once possible
        poll(lambda: "worker 3 could not be started: fork failed" in cell.journal(), what="the refused fork")
        assert answer(cell.site) == "release r1"
        cell.lift()


def hup(cell: Cell) -> None:
    cell.workers_before = serving_workers(cell)
    to_masters(cell, signal.SIGHUP, "N", "N+1")
    if cell.step == "fork":   # abandoned: the old workers stay; once the limit is lifted, again
        wait_journal(cell, "rolling restart abandoned")
        assert serving_workers(cell) == cell.workers_before, "BUG: a worker left before its replacement"
        cell.lift()
        os.kill(cell.host("N"), signal.SIGHUP)


def upgrade(cell: Cell) -> None:
    if cell.step in ("pre-flight", "fork"):   # the step is over at once: no window to hit
        cell.rc2, out = Upgrade(cell.ns, cell.site).finish(20)
        os.kill(cell.host("N"), signal.SIGUSR2)
        expected = "refused: pinned path" if cell.step == "pre-flight" else EAGAIN
        assert expected in out, out
        wait_journal(cell, "upgrade requested by SIGUSR2")
        if cell.step == "fork":
            poll(lambda: cell.journal().count(f"could not start generation 2: {EAGAIN}") >= 3,
                 what="three failed forks")
        return
    if cell.step in ("main", "gone"):
        deploy(cell.site, "r3")
    cell.second.fire()   # armed in prepare(): it connects at once
    sent = to_masters(cell, signal.SIGUSR2, "N", "N+1")
    # Each reached its master while the step still holds (the caller checks the hold).
    poll(lambda: (j := cell.journal()).count("upgrade requested by supervisorctl") >= 2 and
         j.count("SIGUSR2") >= sent, timeout=10, what="the second upgrade and the SIGUSR2s at the masters")


def upgrade_after(cell: Cell) -> None:
    if cell.step in ("pre-flight", "fork"):   # the fault is gone: the next upgrade works
        third = Upgrade(cell.ns, cell.site)
        cell.pids["N+1"] = (third.started(), None)
        rc, out = third.finish(40)
        assert rc == 0, out
    else:
        cell.rc2, out = cell.second.finish(60)
        if cell.step in ("main", "gone"):
            cell.pids["N+2"] = (str(status(cell.site)["pid"]), None)


def os_fault(cell: Cell) -> None:
    ns = cell.ns
    if cell.step == "fork":
        cell.limit.set(cell.limit.current() + 1)   # room for the middle process, none for N+1
        failures = cell.limit.failures()
        cell.rc2, out = Upgrade(ns, cell.site).finish(20)
        assert "could not be forked" in out and cell.limit.failures() > failures, out
        poll(lambda: not zombies(ns), what="the middle process reaped")
        return
    if cell.step == "gone":
        cell.limit = TaskLimit(ns, UNIT)
        cell.limit.set(cell.limit.current())
        deploy(cell.site, "r3")
        t0 = time.monotonic()
        done = ns.systemctl("reload", APP, timeout=30)
        cell.rc2 = done.returncode
        assert time.monotonic() - t0 < 10, "the failed reload took too long"
        props = ns.show(UNIT, "ActiveState", "SubState")
        assert props == {"ActiveState": "active", "SubState": "running"}, f"right after the failed reload: {props}"
        cell.lift()
        return
    limit = cell.kernel_limit if cell.frozen else cell.limit
    # A worker just gone (N's idle one, at "main") counts until it is reaped: then there would be room.
    poll(lambda: not zombies(ns), what="no zombie in the unit")
    if cell.step == "main":   # N+1 is main: a worker more, whose fork is refused
        limit.set(limit.current())
        os.kill(cell.host("N+1"), signal.SIGTTIN)
        poll(lambda: limit.failures() >= 1, what="a refused fork")
        limit.set(None)
        return
    # booting, barrier: a worker of N+1 ends and its respawn's fork is refused. At the gate (booting)
    # it holds nothing and is SIGKILLed; at the barrier it serves already, so it is told to stop
    # (SIGTERM: it finishes what it holds, as a worker ending by itself does).
    victim = min(workers_of(cell.host("N+1")))
    limit.set(limit.current() - threads(victim))
    os.kill(victim, signal.SIGKILL if cell.step == "booting" else signal.SIGTERM)
    poll(lambda: limit.failures() >= 1, what="a refused respawn")
    if cell.frozen:   # past BARRIER_TIMEOUT, until N has gone, with systemd still stopped
        poll(lambda: not alive(cell.host("N")), timeout=20, what="N gone while systemd is stopped")
    limit.set(None)


class WindowMissed(Exception):
    """The event reached the masters only after the step it was meant for was over (the barrier
    window is BARRIER_TIMEOUT, 2 s, from N's MAINPID=; on a starved machine the test can be
    slower than that): not a verdict on the master; the cell runs again in a new namespace."""


# What N logs when the event reaches it, committed or not: in N's own stream, it must come before
# N's "handed over" line for the event to have hit the barrier window.
N_REACTS = {"scale": "add a worker refused", "HUP": "rolling restart refused", "upgrade": "SIGUSR2",
            "kill N+1": ") exited"}


def n_lines(cell: Cell) -> list[str]:
    mine = f"master[{cell.known('N')}]: "
    return [line for line in cell.journal().splitlines() if line.startswith(mine)]


def still_held(cell: Cell) -> None:
    """The event arrived at the step it is meant for, or WindowMissed."""
    if cell.step == "main" and cell.event not in ("stop", "kill N+1") and cell.slow[0].done():
        raise WindowMissed("N's /slow request ended before the event was done")
    if cell.step != "barrier" or cell.event in ("OS fault", "stop"):   # stop: checked in stop_after()
        return
    if cell.event == "kill N":
        if cell.upgrade.seen("MAINPID handed over"):
            raise WindowMissed("N handed over before it was killed")
        return
    wait_journal(cell, N_REACTS[cell.event])
    lines = n_lines(cell)
    reacted = next(i for i, line in enumerate(lines) if N_REACTS[cell.event] in line)
    handed = next((i for i, line in enumerate(lines) if "handed over to generation 2" in line), len(lines))
    if handed < reacted:
        raise WindowMissed(f"N handed over before the event reached it: {lines[handed:reacted + 1]}")


EVENT_ACTS = {"stop": stop, "kill N": kill_n, "kill N+1": kill_n1, "scale": scale, "HUP": hup,
              "upgrade": upgrade, "OS fault": os_fault}
EVENT_AFTER = {"stop": stop_after, "upgrade": upgrade_after}


def prepare(cell: Cell) -> None:
    """What must exist before the step: a pids limit for the OS faults of the later steps."""
    if cell.event == "upgrade" and cell.step not in ("pre-flight", "fork"):
        cell.second = ArmedUpgrade(cell.ns, cell.site)
    if cell.event == "OS fault" and cell.step in ("booting", "barrier", "main"):
        cell.limit = TaskLimit(cell.ns, UNIT)   # no limit yet: `TasksMax=infinity` until the event
        cell.kernel_limit = KernelLimit(cell.limit)


# ---- the end state -------------------------------------------------------------------------

SIGKILLED = "with signal SIGKILL"


def check(cell: Cell, want: Expect) -> None:
    ns = cell.ns
    where = f"[{cell.step} x {cell.event}]"

    def fail(what: str) -> str:
        return f"{where} {what}\n--- journal ---\n{cell.journal()[-4000:]}"

    if cell.rc is None and cell.upgrade is not None:
        cell.rc, _ = cell.upgrade.finish(60)
    rcs = want.rc if isinstance(want.rc, tuple) else (want.rc,)
    assert want.rc is None or cell.rc in rcs, fail(f"`supervisorctl upgrade` exited {cell.rc}, not {want.rc}: "
                                                       f"{cell.upgrade.lines}")
    assert want.rc2 is None or cell.rc2 == want.rc2, fail(f"the event's upgrade exited {cell.rc2}, not {want.rc2}")

    for request in cell.slow:
        try:
            answered = request.result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - a cut request, told apart below
            answered = {"status": repr(exc), "body": ""}
        if want.lost == "nothing":
            assert answered["status"] == 200 and answered["body"].startswith(("release r1 ", "release r2 ")), \
                fail(f"BUG: the /slow request in flight was not answered: {answered}")

    if want.unit == "inactive":
        try:
            poll(lambda: ns.show(UNIT, "ActiveState")["ActiveState"] == "inactive", timeout=25, what="inactive")
        except AssertionError:
            props = ns.show(UNIT, "ActiveState", "SubState", "MainPID")
            raise AssertionError(fail(f"BUG: not stopped 25 s after the stop: {props}")) from None
        props = ns.show(UNIT, "ActiveState", "Result", "NRestarts", "ExecMainPID", "ExecMainStatus")
        expected = {"ActiveState": "inactive", "Result": "success", "NRestarts": "0",
                    "ExecMainPID": cell.known(want.main), "ExecMainStatus": "0"}
        assert props == expected, fail(f"stopped unit: {props}, wanted {expected}")
        text = cell.journal()
        assert SIGKILLED not in text and "Scheduled restart job" not in text, fail("something was SIGKILLed")
        assert unit_procs(ns) == {}, fail(f"left over: {unit_procs(ns)}")
    else:
        def settled_unit():
            if want.restarts and "Deactivated successfully" in cell.journal():
                return "ended as a success"   # the restart that should follow never comes
            return ns.show(UNIT, "ActiveState", "SubState", "NRestarts") == {
                "ActiveState": "active", "SubState": "running", "NRestarts": str(want.restarts)}
        try:
            outcome = poll(settled_unit, timeout=30, what="active/running")
        except AssertionError:
            outcome = None
        props = ns.show(UNIT, "ActiveState", "SubState", "NRestarts")
        assert outcome != "ended as a success", fail(
            f"BUG: the unit ended as a success (its main process exited 0), so Restart=on-failure did not "
            f"start it again (a later connection to the socket unit may have): {props}")
        assert outcome, fail(f"not active/running with NRestarts={want.restarts}: {props}")
        props = ns.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts")
        if want.main == "restarted":
            assert props["MainPID"] not in {pid for pid, _ in cell.pids.values()}, fail(f"not restarted: {props}")
        else:
            assert props["MainPID"] == cell.known(want.main), fail(f"MainPID {props['MainPID']}, wanted {want.main} "
                                                                   f"({cell.known(want.main)}); {cell.pids}")
        assert answer(cell.site) == f"release {want.serves}", fail("another release answers")

        def settled():
            st = status(cell.site)
            ready = [w for w in st["workers"] if w["state"] == "ready"]
            return (st["generation"], len(ready), st["target_workers"]) == (want.gen, want.workers, want.workers) and st
        try:
            st = poll(settled, timeout=20, what="the serving generation settled")
        except AssertionError:
            st = status(cell.site)
            raise AssertionError(fail(f"generation {st['generation']} with workers {st['workers']}, "
                                      f"wanted {want.gen} with {want.workers} ready")) from None
        if want.replaced is not None:
            now = {unit_procs(ns).get(w["pid"]) for w in st["workers"]}
            if want.replaced:
                poll(lambda: not ({unit_procs(ns).get(w["pid"]) for w in status(cell.site)["workers"]}
                                  & cell.workers_before) and len(status(cell.site)["workers"]) == want.workers,
                     timeout=20, what="every worker replaced")
            else:
                assert now == cell.workers_before, fail(f"workers {now}, before {cell.workers_before}")

    for text in (*want.refused, *want.logged):
        try:
            wait_journal(cell, text, timeout=10)
        except AssertionError:
            raise AssertionError(fail(f"the journal has no line with {text!r}")) from None
    for line in want.refused:
        assert re.search(r"refused: generation \d is ", line), f"{where} table: {line!r} is no refusal"

    failures = cell.hammer.finish()
    if want.lost == "nothing":
        if want.unit == "active":
            cell.hammer.check()
        assert not failures, fail(f"BUG: {len(failures)} failed request(s): {failures[:5]}")
    else:
        refused = [f for f in failures if "Refused" in f]
        assert not refused and len(failures) <= len(cell.hammer.clients), \
            fail(f"lost more than what was in flight: {failures}")
    stopped_at = time.monotonic()
    samples = cell.census.stop()
    assert samples and stopped_at - samples[-1][0] < 1, fail("the census of masters stopped sampling early")
    most = max((found for _, found in samples), key=len, default=set())
    assert len(most) <= 2, fail(f"BUG: {len(most)} masters at once: {sorted(most)}")
    if want.gen == 3:   # generation 3 started only once generation 1 was gone
        last1 = max((at for at, found in samples if "cadenza master gen 1" in found), default=0)
        first3 = min((at for at, found in samples if "cadenza master gen 3" in found), default=float("inf"))
        assert last1 < first3, fail("BUG: generation 3 ran beside generation 1")
    assert "internal error" not in cell.journal(), fail("an internal error was logged")


# ---- the matrix -----------------------------------------------------------------------------

ATTEMPTS = 3   # of a cell whose event missed its window (WindowMissed); any other failure counts at once


@pytest.mark.parametrize("step, event", CELLS)
def test_cell(_sdns_session, step, event):
    missed = []
    for _ in range(ATTEMPTS):
        with sdns.SystemdNS(net="host") as ns:
            try:
                run_cell(ns, step, event)
            except WindowMissed as exc:
                missed.append(str(exc))
                continue
        if missed:
            warnings.warn(f"{step} x {event}: held at the {len(missed) + 1}th attempt; missed: {missed}")
        return
    pytest.fail(f"setup: the event missed its window in {ATTEMPTS} attempts: {missed}")


def run_cell(ns, step: str, event: str) -> None:
    cell = Cell(ns, step, event)
    try:
        prepare(cell)
        with STEP_HOLDS[step](cell):
            EVENT_ACTS[event](cell)
            still_held(cell)
        EVENT_AFTER.get(event, lambda c: None)(cell)
        check(cell, MATRIX[step, event])
    finally:
        cell.close()
        if os.environ.get("MATRIX_DUMP"):
            with open(os.path.join(os.environ["MATRIX_DUMP"], f"{step}-{event}.log".replace(" ", "_")), "w") as f:
                f.write(ns.journal("-o", "short-precise"))
