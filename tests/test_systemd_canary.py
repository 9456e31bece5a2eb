"""Canary upgrades (DESIGN §4.5) under a real systemd 252 (tests/sdns.py), driven as an operator
does: deploy a release, switch `current`, `systemctl reload APP`. The running release's
cadenza.toml says `[upgrade] canary = 1` with count = 4, so ExecReload's pinned
`supervisorctl upgrade` starts generation N+1 with one worker while N keeps three, both accepting
from the socket unit's listener; after canary_duration the gate promotes N+1 or rolls it back.

Each test keeps a client busy from the host (new connections from a few threads, and one
keep-alive connection) that must lose nothing but the canary's own 5xx: a gate that fails, a
promotion, a `systemctl stop` while the canary is judged, and the canary's master killed.
Pids: systemd and `supervisorctl status` report the namespace's; /proc on the host is read through
the unit's cgroup (handover_fixtures.unit_procs maps the one to the other).
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

from deploy import AppRoot
from handover_fixtures import (APP, CLIENTS, UNIT, clients, journal_has, logged_at, poll, start_site,  # noqa: F401
                               status, title, unit_journal as journal, unit_procs, unit_state)
from procs import alive, free_port
from test_canary import APP as CANARY_APP   # "release TAG pid PID"; FAIL_EVERY = n: one request in n is a 500

COUNT = 4
SIGKILLED = "with signal SIGKILL"   # systemd's "Killing process N (x) with signal SIGKILL."
FIGURES = (r"generation (\d+) answered (\d+) of (\d+) requests with 5xx \((\d+\.\d) %\) "
           r"and had (\d+) worker crash\(es\)")
GATE_FAILED = re.compile(rf"canary failed: {FIGURES}; {FIGURES}; the limit is generation 1's rate \+ 1\.0 % "
                         r"\(upgrade\.canary_max_error_rate\)")
GATE_PASSED = re.compile(rf"canary passed: {FIGURES}; {FIGURES}; the limit is generation 1's rate")


def release(app: AppRoot, tag: str, duration: float, fail_every: int = 0) -> None:
    """Releases TAG (not switched to) of the canary app, whose cadenza.toml asks for a canary of one
    worker judged after `duration` seconds. (Appended text cannot add to [upgrade]: TOML forbids
    defining a table twice, so the keys go in after its header.)"""
    rel = app.release(tag, app="canaryapp:app", venv=False)
    (rel / "canaryapp.py").write_text(CANARY_APP.format(fail_every=fail_every))
    config = rel / "cadenza.toml"
    text = config.read_text()
    assert "[upgrade]\n" in text, text
    config.write_text(text.replace("[upgrade]\n", f"[upgrade]\ncanary = 1\ncanary_duration = {duration:g}\n", 1))


def canary_site(ns, duration: float) -> AppRoot:
    """APP serving r1 (4 workers, `[upgrade] canary = 1`) from its pinned launcher, socket-activated."""
    app = AppRoot(ns.state, APP, free_port(), count=COUNT)
    release(app, "r1", duration)
    app.switch("r1")
    return start_site(ns, app)


def ctl_status(ns, app: AppRoot) -> dict:
    """`supervisorctl status --json` of the pinned launcher, run inside the namespace from `current`."""
    proc = ns.run(str(app.root / "shared" / "bin" / "supervisorctl"), "status", "--json",
                  cwd=app.root / "current", timeout=30)
    assert proc.returncode == 0, f"supervisorctl status: rc {proc.returncode}\n{proc.stderr}"
    return json.loads(proc.stdout)


def running_canary(ns, app: AppRoot) -> dict:
    """The first `supervisorctl status --json` that shows the canary being judged."""
    return poll(lambda: (st := ctl_status(ns, app))["canary"] and st["canary"]["judging_in"] is not None and st,
                timeout=30, what="`supervisorctl status --json` showing the canary")


def background_reload(ns):
    """`systemctl reload APP`, returning at once: a Future of its CompletedProcess."""
    return CLIENTS.submit(ns.systemctl, "reload", APP, timeout=120)


def served_by_one_generation(ns, app: AppRoot, generation: int) -> dict[int, int] | None:
    """{namespace pid: host pid} of the unit's processes once they are one master of `generation`
    (systemd's MainPID) and its COUNT ready workers, and nothing else (no other generation's
    process, no worker draining)."""
    st = status(app)
    procs = unit_procs(ns)
    ready = {w["pid"] for w in st["workers"] if w["state"] == "ready"}
    if (st["generation"], st["target_workers"], len(st["workers"]), len(ready)) != (generation, COUNT, COUNT, COUNT):
        return None
    main = int(ns.show(UNIT, "MainPID")["MainPID"])
    return set(procs) == ready | {main} and st["pid"] == main and procs


def assert_all_from(procs: dict[int, int], app: AppRoot, tag: str, generation: int) -> None:
    """Every process of the unit runs generation `generation` of release TAG (title and cwd)."""
    where = os.path.realpath(app.path(tag))
    seen = {}
    for host in procs.values():
        try:
            seen[host] = (title(host), os.path.realpath(f"/proc/{host}/cwd"))
        except OSError:
            seen[host] = (title(host), "gone")
    assert all(f" gen {generation} [{APP}]" in t and cwd == where for t, cwd in seen.values()), (where, seen)


# ---- 1. the gate fails: N+1 is stopped, N grows back, the reload fails with the figures ----------

def test_a_canary_failing_30_percent_fails_the_reload_and_the_old_release_serves_on(systemd, clients):
    app = canary_site(systemd, duration=2)
    before = unit_state(systemd)
    client = clients(app.port)
    release(app, "r2", duration=2, fail_every=3)
    app.switch("r2")
    reload = systemd.systemctl("reload", APP, timeout=120)
    returned = time.monotonic()
    assert reload.returncode != 0, f"the reload succeeded:\n{journal(systemd, '-n', '60')}"
    # The reason, with both generations' figures, is what ExecReload's supervisorctl printed.
    text = poll(lambda: GATE_FAILED.search(out := systemd.journal("-o", "cat", "-t", "supervisorctl")) and out,
                what="the gate's reason in the failed ExecReload's output")
    new = GATE_FAILED.search(text).groups()
    (gen2, errors2, responses2, rate2, crashes2), (gen1, errors1, responses1, rate1, crashes1) = (
        (int(new[0]), int(new[1]), int(new[2]), float(new[3]), int(new[4])),
        (int(new[5]), int(new[6]), int(new[7]), float(new[8]), int(new[9])))
    assert (gen2, gen1, crashes2, crashes1, errors1) == (2, 1, 0, 0, 0), text
    # One worker of r2 fails its 3rd, 6th, ... request; N's three never fail.
    # (Up to 4 requests in flight when the worker reported: the 1-in-3 may be off by 2.)
    assert responses2 >= 3 and abs(errors2 - responses2 / 3) <= 2 and responses1 > 0, text
    assert abs(rate2 - 100 * errors2 / responses2) <= 0.051 and rate1 == 0.0, text
    last = status(app)["last_upgrade"]
    assert not last["ok"] and last["reason"].startswith("canary failed: generation 2 answered"), last
    assert GATE_FAILED.search(last["reason"]).groups() == new, last

    # The old generation, as it was: same MainPID, active, four ready workers, all from r1.
    procs = poll(lambda: served_by_one_generation(systemd, app, 1), what="generation 1 alone with 4 ready workers")
    assert unit_state(systemd) == before and before["ActiveState"] == "active", (before, unit_state(systemd))
    assert_all_from(procs, app, "r1", 1)
    client.wait_answers(since=returned)
    client.stop(failing="r2")

    assert client.errors == [], f"{len(client.errors)} failed request(s): {client.errors[:10]}"
    assert client.failures("r2") == [], client.failures("r2")[:10]
    # The gate counted only what this client sent: no more than it saw from each release.
    seen = client.seen()
    assert 0 < errors2 <= seen["r2", 500] and responses2 <= seen["r2", 500] + seen["r2", 200], (seen, text)
    assert responses1 <= seen["r1", 200], (seen, text)
    after = client.seen(returned)
    assert set(after) == {("r1", 200)}, f"answers of requests sent after the reload returned: {after}"
    assert SIGKILLED not in journal(systemd)


# ---- 2. the gate passes: N+1 grows to its count, MAINPID= moves, N drains -------------------------

def test_a_healthy_canary_is_promoted_and_the_reload_succeeds(systemd, clients):
    app = canary_site(systemd, duration=2)
    before = unit_state(systemd)
    client = clients(app.port)
    release(app, "r2", duration=2)
    app.switch("r2")
    reload = background_reload(systemd)
    # While it is judged: the pinned supervisorctl shows the canary, and N kept count - K workers.
    st = running_canary(systemd, app)
    canary = st["canary"]
    assert (canary["generation"], canary["workers"], canary["state"]) == (2, 1, "running a canary"), canary
    assert 0 <= canary["judging_in"] <= 2, canary
    assert (st["generation"], st["target_workers"]) == (1, COUNT - 1), st
    # The K workers N stopped may still be finishing what they hold ("stopping").
    assert [w["state"] for w in st["workers"] if w["state"] != "stopping"] == ["ready"] * (COUNT - 1), st["workers"]
    assert st["upgrading"]["generation"] == 2 and st["upgrading"]["pid"] == canary["pid"], st["upgrading"]
    host = unit_procs(systemd)[canary["pid"]]
    assert title(host).startswith(f"cadenza master gen 2 [{APP}]"), title(host)

    done = reload.result(timeout=120)
    returned = time.monotonic()
    assert done.returncode == 0, f"{done.stderr}\n{journal(systemd, '-n', '60')}"
    # `systemctl reload` returned: N drained, only generation 2 runs, with its full count, from r2.
    procs = served_by_one_generation(systemd, app, 2)
    assert procs, (status(app), unit_procs(systemd))
    assert_all_from(procs, app, "r2", 2)
    after = unit_state(systemd)
    assert after["MainPID"] != before["MainPID"] and after["MainPID"] == str(canary["pid"]), (before, after)
    assert (after["ActiveState"], after["NRestarts"]) == ("active", "0"), after
    last = status(app)
    assert (last["generation"], last["release"], last["last_upgrade"]["ok"]) == (2, str(app.path("r2")), True), last
    # The gate judged evidence: the canary had answered requests, none of them 5xx.
    text = journal_has(systemd, "canary passed: generation 2 answered")
    passed = GATE_PASSED.search(text)
    assert passed and passed.group(1) == "2" and int(passed.group(3)) > 0 and passed.group(2) == "0", text
    client.wait_answers(since=returned)
    client.stop()

    assert client.errors == [] and client.failures(None) == [], (client.errors[:10],
                                                                          client.failures(None)[:10])
    # While the canary was judged (from N's line that it serves to its verdict), both releases
    # answered new connections, the canary about its K/count share.
    during = client.seen(logged_at(systemd, "canary: generation 2 serves with 1 worker(s)"),
                         logged_at(systemd, "canary passed: generation 2"), fresh_only=True)
    share = during["r2", 200] / max(sum(during.values()), 1)
    assert during["r1", 200] and during["r2", 200] and 0.05 <= share <= 0.6, during
    assert set(client.seen(returned)) == {("r2", 200)}, client.seen(returned)
    assert SIGKILLED not in journal(systemd)


# ---- 3. `systemctl stop` while the canary is judged ---------------------------------------------

def test_a_stop_while_the_canary_is_judged_stops_both_generations_cleanly(systemd, clients):
    app = canary_site(systemd, duration=30)
    main = unit_state(systemd)["MainPID"]
    client = clients(app.port)
    release(app, "r2", duration=30)
    app.switch("r2")
    reload = background_reload(systemd)
    st = running_canary(systemd, app)
    client.wait_answers(since=0, n=5, release="r2")   # the canary serves
    procs = unit_procs(systemd)
    titles = [title(host) for host in procs.values()]
    # Beside ExecReload's supervisorctl: N's master and 3 workers, the canary's master and worker.
    assert int(main) in procs and st["canary"]["pid"] in procs, (procs, titles)
    assert [sum(f" gen {g} [{APP}]" in t for t in titles) for g in (1, 2)] == [1 + (COUNT - 1), 1 + 1], titles
    # The client stops first: APP.socket would start the service again for its next connection.
    client.stop()
    assert client.errors == [] and client.failures(None) == [], (client.errors[:10],
                                                                          client.failures(None)[:10])
    assert {tag for tag, _ in client.seen()} == {"r1", "r2"}, client.seen()

    stop = systemd.systemctl("stop", UNIT, timeout=60)
    assert stop.returncode == 0, stop.stderr
    done = reload.result(timeout=60)
    assert done.returncode != 0, f"the reload succeeded:\n{done.stdout}{done.stderr}"
    props = systemd.show(UNIT, "ActiveState", "Result", "NRestarts", "ExecMainPID", "ExecMainStatus")
    text = journal(systemd)
    assert props == {"ActiveState": "inactive", "Result": "success", "NRestarts": "0",
                     "ExecMainPID": main, "ExecMainStatus": "0"}, f"{props}\n{text[-3000:]}"
    # N waited for the canary to drain before it exited: systemd had nothing left to kill.
    assert SIGKILLED not in text and "Scheduled restart job" not in text, text[-3000:]
    assert "generation 2 stopped" in text and "generation 1 stopped" in text, text[-3000:]
    assert unit_procs(systemd) == {} and not any(alive(host) for host in procs.values()), procs


# ---- 4. the canary's master is killed --------------------------------------------------------------

def test_a_killed_canary_master_fails_the_reload_and_the_old_generation_grows_back(systemd, clients):
    app = canary_site(systemd, duration=30)
    before = unit_state(systemd)
    client = clients(app.port)
    release(app, "r2", duration=30)
    app.switch("r2")
    reload = background_reload(systemd)
    st = running_canary(systemd, app)
    pid = st["canary"]["pid"]
    host = unit_procs(systemd)[pid]
    assert title(host).startswith(f"cadenza master gen 2 [{APP}]"), title(host)
    client.wait_answers(since=0, n=5, release="r2")   # the canary serves
    os.kill(host, signal.SIGKILL)

    done = reload.result(timeout=60)
    assert done.returncode != 0, f"the reload succeeded:\n{journal(systemd, '-n', '60')}"
    reason = f"canary failed: generation 2 (pid {pid}) exited while it was the canary"
    poll(lambda: reason in systemd.journal("-o", "cat", "-t", "supervisorctl"),
         what="the reason in the failed ExecReload's output")
    last = status(app)["last_upgrade"]
    assert not last["ok"] and last["reason"].startswith(reason), last
    # N grew back to 4 workers; the canary's orphaned worker drained and went.
    procs = poll(lambda: served_by_one_generation(systemd, app, 1), what="generation 1 alone with 4 ready workers")
    gone = time.monotonic()
    assert unit_state(systemd) == before and before["ActiveState"] == "active", (before, unit_state(systemd))
    assert_all_from(procs, app, "r1", 1)
    client.wait_answers(since=gone)
    client.stop()

    assert client.errors == [] and client.failures(None) == [], (client.errors[:10],
                                                                          client.failures(None)[:10])
    assert {tag for tag, _ in client.seen()} == {"r1", "r2"}, client.seen()
    assert set(client.seen(gone)) == {("r1", 200)}, client.seen(gone)
