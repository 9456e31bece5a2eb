"""Zero-downtime upgrades under a real systemd 252 (tests/sdns.py), driven as an operator does:
deploy a release, switch `current`, `systemctl reload APP`, prune (DESIGN §1, §4).

Every test keeps two HTTP clients busy from the host (one opening a new connection per
request, one on a keep-alive connection) and asserts that not one request failed.
Pids: systemd reports the namespace's pids; /proc on the host is read through the unit's cgroup.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import time

import pytest

from handover_fixtures import (APP, UNIT, Hammer, answer, heir, journal_has, main_pid, poll,
                               slow_request, status, title, unit_procs)
from procs import alive, children, get

pytest_plugins = ("handover_fixtures",)   # the `site` and `hammer` fixtures

DATE = re.compile(r"\b\d{4}-\d\d-\d\d\b")


def test_five_deploys_each_reload_hands_over_and_prune_never_breaks_the_next(systemd, site, hammer):
    for n in range(2, 7):
        before, _ = main_pid(systemd)
        site.deploy(f"r{n}")
        reload = systemd.systemctl("reload", APP)
        assert reload.returncode == 0, systemd.journal("-o", "cat", "-n", "40")
        # `systemctl reload` blocks until the old generation drained: the very next request,
        # on a new connection, is answered by the new release.
        assert answer(site) == f"release r{n}"
        props = systemd.show(UNIT, "MainPID", "NRestarts", "ActiveState", "SubState")
        assert props["MainPID"] != before, props
        assert (props["ActiveState"], props["SubState"], props["NRestarts"]) == ("active", "running", "0")
        st = status(site)
        assert (st["generation"], st["release"]) == (n, str(site.path(f"r{n}"))), st
        assert st["last_upgrade"]["ok"], st
        # From r3 on this deletes the release gen 1 was started from (by ExecStart), then the
        # one each earlier generation came from, venv and all: the next reload must not care.
        site.prune(keep=2)
        assert site.releases() == [f"r{n - 1}", f"r{n}"]
    assert set(hammer.check()) == {f"release r{n}" for n in range(1, 7)}


@pytest.mark.parametrize("release, reason", [
    # gen 2's workers cannot load the app: it gives up at once, on their exit 3
    (dict(app_body='raise ImportError("the release lacks missing_dep")', ready_timeout=10),
     "ImportError: the release lacks missing_dep"),
    (dict(count="two"), "workers.count"),   # refused at pre-flight: the new config is invalid
], ids=["import-error", "invalid-config"])
def test_failed_upgrade_fails_the_reload_and_the_old_release_keeps_serving(systemd, site, hammer,
                                                                           release, reason):
    before, _ = main_pid(systemd)
    procs_before = set(unit_procs(systemd).values())
    site.deploy("r2", **release)
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
    # The operator fixes the release: the next reload works.
    site.deploy("r3")
    assert systemd.systemctl("reload", APP).returncode == 0
    assert answer(site) == "release r3"
    assert set(hammer.check()) == {"release r1", "release r3"}


@pytest.mark.parametrize("site", [{"upgrade_timeout": 60}], indirect=True)
def test_reload_to_a_release_whose_app_cannot_be_imported_fails_at_once(systemd, site, hammer):
    # upgrade.timeout and ready_timeout are 60 s: the reload fails on gen 2's workers' exit 3.
    before, _ = main_pid(systemd)
    procs_before = set(unit_procs(systemd).values())
    site.deploy("r2", app_body="import nosuch_dependency", ready_timeout=60)
    t0 = time.monotonic()
    reload = systemd.systemctl("reload", APP)
    took = time.monotonic() - t0
    assert reload.returncode != 0 and took < 20, (took, reload.stdout, reload.stderr)
    why = "exited with status 3 (the application could not be loaded): cannot load app 'app:app'"
    props = systemd.show(UNIT, "MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": before, "ActiveState": "active", "NRestarts": "0"}, props
    reason = "upgrade to generation 2 failed: generation 2 start failed: worker "
    journal_has(systemd, "ModuleNotFoundError: No module named 'nosuch_dependency'")
    shown = poll(lambda: reason in (out := systemd.systemctl("status", "-n", "20", UNIT).stdout) and out,
                 what="the reason in `systemctl status`")
    assert why in shown and "No module named 'nosuch_dependency'" in shown, shown
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    assert not last["ok"] and why in last["reason"], last
    poll(lambda: set(unit_procs(systemd).values()) == procs_before, what="gen 2 gone")
    assert set(hammer.check()) == {"release r1"}


@pytest.mark.parametrize("damage, reason", [
    (lambda bin_dir: (bin_dir / "cadenza").unlink(), "is unusable: No such file or directory"),
    (lambda bin_dir: (bin_dir / "cadenza").chmod(0o757), "is writable by others"),
    (lambda bin_dir: bin_dir.chmod(0o757), "is writable by others"),
], ids=["missing", "launcher o+w", "bin dir o+w"])
def test_unsafe_pinned_path_is_refused_before_anything_is_forked(systemd, site, hammer, damage, reason):
    site.deploy("r2")
    before, _ = main_pid(systemd)
    procs_before = set(unit_procs(systemd).values())
    damage(site.root / "shared" / "bin")
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode != 0, reload
    assert systemd.show(UNIT, "MainPID")["MainPID"] == before
    assert answer(site) == "release r1"
    last = status(site)["last_upgrade"]
    assert last["reason"].startswith("refused: pinned path") and reason in last["reason"], last
    assert last["pid"] == 0, last   # no pid: nothing was forked
    journal = journal_has(systemd, reason)
    assert "generation 2 started" not in journal and "gen 2" not in journal
    assert set(unit_procs(systemd).values()) == procs_before
    assert set(hammer.check()) == {"release r1"}


def test_new_master_killed_while_its_workers_boot_rolls_back(systemd, site, hammer):
    before, master = main_pid(systemd)
    workers = set(children(master))
    titles = []
    for n in (2, 3, 4):   # three rounds: what master N does after the kill is a race (see report)
        site.deploy(f"r{n}", app_body="time.sleep(5)")   # the window: gen 2 imports for 5 s
        reload = systemd.popen("systemctl", "reload", APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def booting_heir():
            new = heir(systemd, site)
            booting = [w for w in children(new) if title(w).startswith("cadenza worker")] if new else []
            return len(booting) == 2 and (new, booting)
        new, new_workers = poll(booting_heir, what="gen 2 master with 2 booting workers")
        titles.append(title(new))
        os.kill(new, signal.SIGKILL)
        assert reload.wait(timeout=30) != 0
        poll(lambda: " gen 2 " not in " ".join(map(title, unit_procs(systemd).values())), what="gen 2 gone")
        assert alive(master) and answer(site) == "release r1", (
            f"BUG: gen 1 died:\n{systemd.journal('-o', 'cat', '-n', '60')}")
        props = systemd.show(UNIT, "MainPID", "ActiveState", "NRestarts")
        assert props == {"MainPID": before, "ActiveState": "active", "NRestarts": "0"}, props
        last = status(site)["last_upgrade"]
        # The reason says "exited before it was main" or "closed the hand-off channel",
        # whichever master N notices first: the channel's EOF and the pidfd race.
        assert not last["ok"] and last["reason"].startswith("generation 2 "), last
        assert not [p for p in (new, *new_workers) if alive(p)]
        assert set(children(master)) == workers
    assert "internal error" not in systemd.journal("-o", "cat")
    assert set(hammer.check()) == {"release r1"}
    # Last, so that the rollback above is checked even while this fails.
    assert all(t.startswith(f"cadenza master gen 2 [{APP}]") for t in titles), f"BUG: titled {titles}"


def test_ten_usr2_within_100ms_start_exactly_one_generation(systemd, site, hammer):
    site.deploy("r2")
    before, master = main_pid(systemd)
    t0 = time.monotonic()
    for _ in range(10):
        os.kill(master, signal.SIGUSR2)
    assert time.monotonic() - t0 < 0.1
    new = poll(lambda: (pid := systemd.show(UNIT, "MainPID")["MainPID"]) != before and pid, what="MainPID")
    gen2 = unit_procs(systemd)[int(new)]
    # Settled: the old master drained and left; only gen 2's master and its workers remain.
    poll(lambda: not alive(master), what="gen 1 master exit")
    poll(lambda: set(unit_procs(systemd).values()) == {gen2, *children(gen2)} and len(children(gen2)) == 2,
         what="only gen 2 left")
    systemd.wait_for(UNIT, "ActiveState", "active")
    assert answer(site) == "release r2"
    journal = systemd.journal("-o", "cat")
    assert journal.count("starting generation 2") == 1 and "generation 3" not in journal, journal
    assert (status(site)["generation"], systemd.show(UNIT, "NRestarts")["NRestarts"]) == (2, "0")
    assert set(hammer.check()) == {"release r1", "release r2"}
    assert "gen 3" not in " ".join(map(title, unit_procs(systemd).values()))
    assert title(gen2).startswith(f"cadenza master gen 2 [{APP}]"), f"BUG: MainPID titled {title(gen2)!r}"


def test_requests_in_flight_on_the_old_generation_complete(systemd, site, hammer):
    site.deploy("r2")
    slow = [slow_request(site.port, 3) for _ in range(4)]   # held by gen 1's workers
    # A keep-alive response whose headers (without "Connection: close") are out when its worker
    # starts draining: the client may send its next request on that connection, and it must be
    # answered. The rest of the response waits for a gate the test opens once the drain began.
    gate = site.root / "run" / "gate"
    streaming = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    streaming.request("GET", f"/stream?gate={gate}")
    first = streaming.getresponse()
    assert first.status == 200 and first.getheader("connection") is None
    worker = first.readline().decode().split(" pid ")[1].strip()
    reload = systemd.popen("systemctl", "reload", APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal_has(systemd, f"[{worker}]: Shutting down")   # uvicorn's first word of its drain
    gate.touch()
    assert first.read() == b"end\n"
    try:
        streaming.request("GET", "/")
        resp = streaming.getresponse()
        follow_up = (resp.status, resp.read().decode().split(" pid")[0], resp.getheader("connection"))
    except OSError as exc:
        pytest.fail(f"BUG: the next request on a connection whose answer promised keep-alive: {exc!r}")
    assert follow_up == (200, "release r1", "close")
    assert reload.wait(timeout=30) == 0
    reloaded_at = time.monotonic()
    for answered in (s.result(timeout=30) for s in slow):
        assert answered["status"] == 200 and answered["body"].startswith("release r1 "), answered
        # The reload returns only once the old generation drained: its requests first.
        assert answered["at"] <= reloaded_at, answered
    assert answer(site) == "release r2"
    assert set(hammer.check()) == {"release r1", "release r2"}


def test_stop_during_an_upgrade_drains_both_generations(systemd, site, hammer):
    site.deploy("r2", app_body="time.sleep(10)")   # gen 2 stays "starting" until the stop
    assert systemd.systemctl("reload", "--no-block", APP).returncode == 0
    new = poll(lambda: heir(systemd, site), what="gen 2 master")
    poll(lambda: len(children(new)) == 2, what="gen 2 workers")
    seen = set(unit_procs(systemd).values())
    # DESIGN §5: the control socket is handed over with MAINPID; until then master N answers it.
    answered_by = {status(site)["generation"] for _ in range(20)}
    # The clients stop before the stop: with APP.socket still listening, their next connection
    # would (rightly) activate the service again. One slow request is in flight instead.
    assert set(hammer.check()) == {"release r1"}
    slow = slow_request(site.port, 1)
    stop = systemd.systemctl("stop", UNIT)
    stopped_at = time.monotonic()
    assert stop.returncode == 0, stop.stderr
    answered = slow.result(timeout=30)
    assert answered["status"] == 200 and answered["body"].startswith("release r1 "), answered
    assert answered["at"] <= stopped_at and answered["connection"] == "close", answered
    assert unit_procs(systemd) == {} and not [p for p in seen if alive(p)]
    journal = systemd.journal("-o", "cat")
    # Gen 2 stopped by itself, and nothing was left for systemd's final SIGKILL (KillMode=mixed).
    assert "generation 2 stopped" in journal and "with signal SIGKILL" not in journal
    assert "MAINPID handed over" not in journal   # the stop did come in the middle of the upgrade
    assert answered_by == {1}, "BUG: the new master answered the control socket before it was main"
    # An operator's stop ends inactive, not failed, though systemd SIGTERMs the ExecReload too.
    props = systemd.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props


def test_later_generations_log_to_the_journal_like_the_first(systemd, site, hammer):
    site.deploy("r2")
    assert systemd.systemctl("reload", APP).returncode == 0
    (site.root / "shared" / "bin").chmod(0o757)   # gen 2 now has an error to log: it refuses
    assert systemd.systemctl("reload", APP).returncode != 0
    journal_has(systemd, "refused: pinned path")
    # README: under journald each line has its <N> priority prefix and no timestamp of its own.
    lines = systemd.journal("-o", "cat", "-t", "cadenza").splitlines()
    assert not [line for line in lines if DATE.search(line)][:3]
    assert "refused: pinned path" in systemd.journal("-o", "cat", "-t", "cadenza", "-p", "err")
    assert set(hammer.check()) == {"release r1", "release r2"}


def test_old_master_killed_after_mainpid_leaves_a_defined_state(systemd, site, hammer):
    """SIGKILL of master N after MAINPID= went to N+1, while N still drains: N+1 is main and
    serves, N's workers drain by themselves (PDEATHSIG gives them SIGTERM), nothing fails."""
    old_inner, old_master = main_pid(systemd)
    site.deploy("r2")
    slow = [slow_request(site.port, 2) for _ in range(2)]   # keep generation 1 draining a while
    reload = systemd.popen("systemctl", "reload", APP, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    poll(lambda: systemd.show(UNIT, "MainPID")["MainPID"] != old_inner, what="MAINPID hand-over")
    os.kill(old_master, signal.SIGKILL)
    for answered in (s.result(timeout=30) for s in slow):
        assert answered["status"] == 200 and answered["body"].startswith("release r1 "), answered
    reload.wait(timeout=30)       # its connection died with master N: the exit code says nothing
    props = systemd.show(UNIT, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "active", "NRestarts": "0"}, systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r2"
    assert status(site)["generation"] == 2
    assert set(hammer.check()) <= {"release r1", "release r2"}


def test_old_master_killed_while_the_next_one_boots(systemd, site, hammer):
    """SIGKILL of master N between the fork and N+1's readiness: the main process is gone, so
    systemd kills the rest of the unit (N's workers with the requests they hold, and N+1) and
    Restart=on-failure starts it again from `current`, while the socket unit queues
    connections: none is refused."""
    old_inner, old_master = main_pid(systemd)
    site.deploy("r2", app_body="time.sleep(2)")
    assert systemd.systemctl("reload", "--no-block", APP).returncode == 0
    poll(lambda: heir(systemd, site), what="gen 2 master")
    os.kill(old_master, signal.SIGKILL)
    # A connection right after the kill waits in the socket's queue for the restarted service.
    status_code, body = get(site.port, timeout=60)
    assert status_code == 200 and body.startswith(("release r1 ", "release r2 ")), body
    systemd.wait_for(UNIT, "NRestarts", "1", timeout=30)
    systemd.wait_for(UNIT, "ActiveState", "active", timeout=30)
    assert answer(site) == "release r2"
    assert systemd.show(UNIT, "MainPID")["MainPID"] != old_inner
    lost_only_in_flight(hammer)


def lost_only_in_flight(hammer: Hammer) -> None:
    """After a crash: no connection refused, and at most the request each client had in flight."""
    failures = hammer.finish()
    assert not [f for f in failures if "Refused" in f] and len(failures) <= len(hammer.clients), failures
    assert "release r2" in hammer.seen and not any(k.startswith("HTTP") for k in hammer.seen), hammer.seen


def test_old_master_killed_before_the_fork_is_an_ordinary_crash(systemd, site, hammer):
    """SIGKILL of the master before an upgrade forked anything: an ordinary crash. systemd kills
    what is left of the unit (its workers, with the requests they hold: at most one per client
    here) and Restart=on-failure starts it again from `current`, while the socket unit queues new
    connections: none is refused. The restarted service then upgrades as usual."""
    old_inner, old_master = main_pid(systemd)
    os.kill(old_master, signal.SIGKILL)
    systemd.wait_for(UNIT, "NRestarts", "1", timeout=30)
    systemd.wait_for(UNIT, "ActiveState", "active", timeout=30)
    assert systemd.show(UNIT, "MainPID")["MainPID"] != old_inner
    assert answer(site) == "release r1"
    site.deploy("r2")
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode == 0, reload.stderr + systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r2"
    lost_only_in_flight(hammer)


# At import, each worker of a release writes its environment where the test reads it.
ENV_DUMP = """import json
_path = {out!r} + "/env-{tag}-" + str(os.getpid()) + ".json"
with open(_path + ".tmp", "w") as _file:
    json.dump(dict(os.environ), _file)
os.rename(_path + ".tmp", _path)
"""


def test_each_reload_gives_the_new_workers_their_release_s_workers_env(systemd, site, hammer):
    """[workers.env] and [http] come from each release's own cadenza.toml: the next generation's
    workers get the new values, and a key the new release no longer sets is gone from them (the
    masters pass it to their workers only, never keep it in their own environment)."""
    out = site.root / "run" / "env"
    out.mkdir()
    site.deploy("r2", app_body=ENV_DUMP.format(out=str(out), tag="r2"),
                config_extra='[workers.env]\nGREETING = "two"\nONLY_IN_R2 = "yes"\n')
    assert systemd.systemctl("reload", APP).returncode == 0, systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r2"
    site.deploy("r3", app_body=ENV_DUMP.format(out=str(out), tag="r3"),
                config_extra='[workers.env]\nGREETING = "three"\n[http]\nkeepalive = 3\n')
    assert systemd.systemctl("reload", APP).returncode == 0, systemd.journal("-o", "cat", "-n", "30")
    assert answer(site) == "release r3"
    envs = {tag: [json.loads(path.read_text()) for path in sorted(out.glob(f"env-{tag}-*.json"))]
            for tag in ("r2", "r3")}
    assert [len(envs["r2"]), len(envs["r3"])] == [2, 2], envs
    for env in envs["r2"]:
        assert (env["GREETING"], env["ONLY_IN_R2"], json.loads(env["CADENZA_HTTP"])["keepalive"]) == ("two", "yes", 5)
        assert env["CADENZA_GENERATION"] == "2"
    for env in envs["r3"]:
        assert env["GREETING"] == "three" and "ONLY_IN_R2" not in env, env
        assert json.loads(env["CADENZA_HTTP"])["keepalive"] == 3 and env["CADENZA_GENERATION"] == "3"
    assert set(hammer.check()) == {"release r1", "release r2", "release r3"}
