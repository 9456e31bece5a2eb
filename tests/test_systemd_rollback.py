"""The rollback window (DESIGN §4.5) under a real systemd 252 (tests/sdns.py), driven as an operator
does: deploy a release, switch `current`, `systemctl reload APP`, then the pinned
`ROOT/shared/bin/supervisorctl rollback`. Each release's cadenza.toml says
`[upgrade] rollback_window = W`, so a generation that handed over stays warm (its master, and with
preload its preloader, no worker) until a rollback makes it main again (MAINPID= goes back to
it), its window ends, a new upgrade dismisses it, or the service stops.

Each test keeps a client busy from the host (new connections from a few threads, and one
keep-alive connection) that must lose nothing. Pids: systemd and `supervisorctl status` report
the namespace's; /proc on the host is read through the unit's cgroup (handover_fixtures.unit_procs
maps the one to the other), and each process is told by its title ("cadenza master gen N [APP]",
"cadenza preloader gen N [APP]", "cadenza worker I gen N [APP]").
"""
from __future__ import annotations

import re
import shutil
import time
from typing import NamedTuple

from deploy import AppRoot
from handover_fixtures import (APP, UNIT, clients, journal_has, logged_at, poll, start_site, status,  # noqa: F401
                               title, unit_journal as journal, unit_procs, unit_state)
from procs import alive, free_port

COUNT = 2
WINDOW = 60
SIGKILLED = "with signal SIGKILL"   # systemd's "Killing process N (x) with signal SIGKILL."
TITLE = re.compile(rf"^cadenza (master|preloader|worker) (?:\d+ )?gen (\d+) \[{APP}\]")


class Proc(NamedTuple):
    ns: int
    host: int
    role: str | None         # "master", "preloader", "worker"; None: not a cadenza process of APP
    generation: int | None
    title: str


def processes(ns) -> list[Proc]:
    """Every live process of the unit's cgroup, with its role and generation read from its title."""
    found = []
    for nspid, host in sorted(unit_procs(ns).items()):
        text = title(host)
        match = TITLE.match(text)
        if text:   # "" once it has gone
            found.append(Proc(nspid, host, match and match.group(1), match and int(match.group(2)), text))
    return found


def of(procs: list[Proc], generation: int) -> list[Proc]:
    return [p for p in procs if p.generation == generation]


def roles(procs: list[Proc]) -> list[str]:
    return sorted(p.role or f"unknown: {p.title!r}" for p in procs)


def serving(preload: bool) -> list[str]:
    """The roles of a generation that serves with COUNT workers."""
    return sorted(["master", *(["preloader"] if preload else []), *["worker"] * COUNT])


def release(app: AppRoot, tag: str, window: float, preload: bool) -> None:
    """Releases TAG (not switched to), whose cadenza.toml keeps a generation that hands over warm
    for `window` seconds. (Appended text cannot add to [upgrade]: TOML forbids defining a table
    twice, so the key goes in after its header.)"""
    rel = app.release(tag, venv=False, **({"preload": True} if preload else {}))
    config = rel / "cadenza.toml"
    text = config.read_text()
    assert "[upgrade]\n" in text, text
    config.write_text(text.replace("[upgrade]\n", f"[upgrade]\nrollback_window = {window:g}\n", 1))


def rollback_site(ns, window: float, preload: bool) -> AppRoot:
    """APP serving r1 (COUNT workers, `[upgrade] rollback_window = window`) from its pinned
    launcher, socket-activated."""
    app = AppRoot(ns.state, APP, free_port(), count=COUNT)
    release(app, "r1", window, preload)
    app.switch("r1")
    return start_site(ns, app)


def reload_to(ns, app: AppRoot, tag: str, window: float, preload: bool) -> float:
    """Deploy TAG, switch `current` to it, `systemctl reload APP`; it must succeed. When it returned."""
    release(app, tag, window, preload)
    app.switch(tag)
    done = ns.systemctl("reload", APP, timeout=120)
    returned = time.monotonic()
    assert done.returncode == 0, f"reload to {tag}: rc {done.returncode}\n{done.stderr}\n{journal(ns, '-n', '60')}"
    return returned


def exec_reload_said(ns, text: str) -> str:
    """The output of ExecReload's supervisorctl, once it contains `text` (journald reads streams
    asynchronously: a line written before systemctl returned may lag)."""
    return poll(lambda: text in (out := ns.journal("-o", "cat", "-t", "supervisorctl")) and out,
                what=f"ExecReload's supervisorctl saying {text!r}")


def ctl(ns, app: AppRoot, *args: str):
    """The pinned `supervisorctl ARGS`, run inside the namespace from `current`, as an operator does."""
    return ns.run(str(app.root / "shared" / "bin" / "supervisorctl"), *args, cwd=app.root / "current", timeout=60)


# ---- 1. a rollback inside the window, with preload ------------------------------------------------

def test_a_rollback_inside_the_window_makes_the_warm_preloaded_generation_main_again_within_a_second(
        systemd, clients):
    app = rollback_site(systemd, WINDOW, preload=True)
    first = unit_state(systemd)
    gen1 = int(first["MainPID"])
    client = clients(app.port)
    reload_to(systemd, app, "r2", WINDOW, preload=True)
    exec_reload_said(systemd, "generation 2 serves; generation 1 drained and is warm for a rollback")

    # `systemctl reload` returned: generation 1 is warm, its master and preloader only.
    procs = processes(systemd)
    warm = of(procs, 1)
    assert roles(warm) == ["master", "preloader"], procs
    assert [p.ns for p in warm if p.role == "master"] == [gen1], (gen1, procs)
    second = unit_state(systemd)
    assert second["MainPID"] != first["MainPID"] and (second["ActiveState"], second["NRestarts"]) == ("active", "0")
    gen2 = of(procs, 2)
    assert roles(gen2) == serving(True) and [p.ns for p in gen2 if p.role == "master"] == [int(second["MainPID"])]
    assert len(procs) == len(warm) + len(gen2), f"a process of no generation: {procs}"
    st = status(app)
    assert (st["generation"], st["pid"], st["release"]) == (2, int(second["MainPID"]), str(app.path("r2"))), st
    assert (st["warm"]["generation"], st["warm"]["release"]) == (1, str(app.path("r1"))), st["warm"]
    assert WINDOW - 30 < st["warm"]["expires_in"] <= WINDOW, st["warm"]

    # The operator's command, start to exit (nsenter and the launcher's interpreter included); a
    # `supervisorctl status --json` beside it says what starting one costs on this machine now.
    began = time.monotonic()
    ctl(systemd, app, "status", "--json")
    baseline = time.monotonic() - began
    began = time.monotonic()
    back = ctl(systemd, app, "rollback")
    returned = time.monotonic()
    took = returned - began
    assert back.returncode == 0, f"rc {back.returncode}\n{back.stdout}{back.stderr}\n{journal(systemd, '-n', '60')}"
    # The rollback itself, as the masters log it: from the request reaching the main master to
    # generation 1 serving alone (its workers forked, MAINPID=, generation 2 drained and gone).
    # The command around it adds its own start (nsenter, the launcher's interpreter).
    inside = logged_at(systemd, "the previous generation has gone") - logged_at(systemd, "control: rollback from")
    print(f"rollback (preload, {COUNT} workers): {inside:.3f}s in the masters; supervisorctl rollback "
          f"{took:.3f}s start to exit; supervisorctl status --json {baseline:.3f}s")
    assert inside <= 1.0, (f"the rollback took {inside:.2f}s (the command {took:.2f}s)\n"
                           f"{back.stdout}\n{journal(systemd, '-o', 'short-monotonic', '-n', '40')}")

    # Generation 1 is main again: MAINPID= went back to its master, and nothing of generation 2 runs.
    after = unit_state(systemd)
    assert after == first and after["NRestarts"] == "0", (first, after)
    assert not [p for p in gen2 if alive(p.host)], f"still running: {[p for p in gen2 if alive(p.host)]}"
    procs = processes(systemd)
    assert roles(procs) == serving(True) and {p.generation for p in procs} == {1}, procs
    assert [p.host for p in procs if p.role in ("master", "preloader")] == \
        [p.host for p in warm if p.role in ("master", "preloader")], (warm, procs)
    st = status(app)
    assert (st["generation"], st["pid"], st["release"], st["main"], st["warm"]) == \
        (1, gen1, str(app.path("r1")), True, None), st
    workers = {w["pid"] for w in st["workers"] if w["state"] == "ready"}
    assert len(workers) == COUNT == len(st["workers"]) and workers == {p.ns for p in procs if p.role == "worker"}, st
    client.wait_workers(returned, workers, "r1")
    client.check()
    assert set(client.releases_since(returned)) == {"r1"}, client.releases_since(returned)
    assert set(client.releases_since(0)) == {"r1", "r2"}, client.releases_since(0)
    text = journal_has(systemd, f"generation 1 (pid {gen1}) starts its workers")
    assert "rollback requested by supervisorctl" in text and SIGKILLED not in text, text[-3000:]


# ---- 2. the window expires ------------------------------------------------------------------------

def test_at_the_window_s_end_nothing_of_the_warm_generation_remains_and_a_rollback_is_refused(
        systemd, clients):
    window = 2
    app = rollback_site(systemd, window, preload=True)
    first = unit_state(systemd)
    gen1 = processes(systemd)
    assert roles(gen1) == serving(True) and {p.generation for p in gen1} == {1}, gen1
    client = clients(app.port)
    reload_to(systemd, app, "r2", window, preload=True)
    exec_reload_said(systemd, "generation 1 drained and is warm for a rollback")
    warm_at = logged_at(systemd, f"generation 1 is warm for a rollback for {window}s")

    poll(lambda: not [p for p in gen1 if alive(p.host)] and not of(processes(systemd), 1), timeout=window + 15,
         what="nothing of generation 1 in the unit's cgroup")
    left_at = logged_at(systemd, "generation 1 leaves: its rollback window is over")
    # journald's reception times: the window's own length, give or take the log lines' lag.
    assert window - 0.5 <= left_at - warm_at <= window + 8, f"warm for {left_at - warm_at:.2f}s"

    # Only generation 2: its master (MainPID), its preloader, its workers.
    main = unit_state(systemd)
    procs = processes(systemd)
    assert roles(procs) == serving(True) and {p.generation for p in procs} == {2}, procs
    assert [p.ns for p in procs if p.role == "master"] == [int(main["MainPID"])], (main, procs)
    assert main["MainPID"] != first["MainPID"] and (main["ActiveState"], main["NRestarts"]) == ("active", "0"), main
    assert status(app)["warm"] is None

    refused = time.monotonic()
    back = ctl(systemd, app, "rollback")
    assert back.returncode == 1 and "no generation is warm" in back.stderr, \
        f"rc {back.returncode}\n{back.stdout}{back.stderr}"
    assert unit_state(systemd) == main
    st = status(app)
    assert (st["generation"], st["pid"], st["warm"]) == (2, int(main["MainPID"]), None), st
    client.wait_workers(refused, {p.ns for p in procs if p.role == "worker"}, "r2")
    client.check()
    assert set(client.releases_since(refused)) == {"r2"}, client.releases_since(refused)


# ---- 3. a reload while a generation is warm, then a stop ------------------------------------------

def test_a_reload_while_a_generation_is_warm_dismisses_it_first_and_a_stop_ends_the_warm_one_too(
        systemd, clients):
    app = rollback_site(systemd, WINDOW, preload=False)
    gen1 = processes(systemd)
    assert roles(gen1) == serving(False) and {p.generation for p in gen1} == {1}, gen1
    client = clients(app.port)
    reload_to(systemd, app, "r2", WINDOW, preload=False)
    gen2 = int(unit_state(systemd)["MainPID"])
    assert roles(of(processes(systemd), 1)) == ["master"], processes(systemd)

    returned = reload_to(systemd, app, "r3", WINDOW, preload=False)
    # The second reload returned: generation 1 (warm) was told to leave and has gone, generation 2
    # is the warm one (its master only), generation 3 is main.
    procs = processes(systemd)
    state = unit_state(systemd)
    assert not [p for p in gen1 if alive(p.host)] and of(procs, 1) == [], (gen1, procs)
    assert [(p.role, p.ns) for p in of(procs, 2)] == [("master", gen2)], procs
    gen3 = of(procs, 3)
    assert roles(gen3) == serving(False) and [p.ns for p in gen3 if p.role == "master"] == [int(state["MainPID"])]
    assert len(procs) == 1 + len(gen3), f"a process of no generation: {procs}"
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0"), state
    st = status(app)
    assert (st["generation"], st["pid"]) == (3, int(state["MainPID"])), st
    assert (st["warm"]["generation"], st["warm"]["release"]) == (2, str(app.path("r2"))), st["warm"]
    journal_has(systemd, "generation 1 (warm) is told to leave: an upgrade starts")
    exec_reload_said(systemd, "generation 3 serves; generation 2 drained and is warm for a rollback")
    client.wait_workers(returned, {p.ns for p in gen3 if p.role == "worker"}, "r3")

    # The client stops first: APP.socket would start the service again for its next connection.
    client.check()
    assert set(client.releases_since(returned)) == {"r3"}, client.releases_since(returned)
    assert set(client.releases_since(0)) == {"r1", "r2", "r3"}, client.releases_since(0)
    stop = systemd.systemctl("stop", UNIT, timeout=60)
    assert stop.returncode == 0, stop.stderr
    props = systemd.show(UNIT, "ActiveState", "Result", "NRestarts")
    text = journal_has(systemd, "generation 3 stopped")
    assert props == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0"}, f"{props}\n{text[-3000:]}"
    assert unit_procs(systemd) == {} and not [p for p in procs if alive(p.host)], procs
    # The warm generation left before the main one ended: systemd had nothing left to kill.
    text = journal_has(systemd, "generation 2 (warm) is told to leave: the service stops")
    assert SIGKILLED not in text and "Scheduled restart job" not in text, text[-3000:]


# ---- 4. a rollback to a pruned release ------------------------------------------------------------

def test_a_rollback_to_a_pruned_release_is_refused_and_changes_nothing(systemd, clients):
    app = rollback_site(systemd, WINDOW, preload=True)
    gen1 = int(unit_state(systemd)["MainPID"])
    client = clients(app.port)
    reload_to(systemd, app, "r2", WINDOW, preload=True)
    before = unit_state(systemd)
    procs = processes(systemd)
    assert roles(of(procs, 1)) == ["master", "preloader"] and roles(of(procs, 2)) == serving(True), procs

    shutil.rmtree(app.path("r1"))
    refused = time.monotonic()
    back = ctl(systemd, app, "rollback")
    assert back.returncode == 1, f"rc {back.returncode}\n{back.stdout}{back.stderr}\n{journal(systemd, '-n', '40')}"
    assert f"generation 1's release {app.path('r1')} is gone (pruned)" in back.stderr, back.stdout + back.stderr

    # Nothing changed: generation 2 main (same MainPID), generation 1 still warm and without workers.
    assert unit_state(systemd) == before and before["MainPID"] != str(gen1), (before, unit_state(systemd))
    st = status(app)
    assert (st["generation"], st["pid"], st["warm"]["generation"]) == (2, int(before["MainPID"]), 1), st
    after = processes(systemd)
    assert [p.host for p in after] == [p.host for p in procs], (procs, after)
    assert "refused: generation 1's release" in journal_has(systemd, "is gone (pruned)")
    client.wait_workers(refused, {p.ns for p in of(procs, 2) if p.role == "worker"}, "r2")
    client.check()
    assert set(client.releases_since(refused)) == {"r2"}, client.releases_since(refused)
