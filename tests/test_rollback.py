"""The rollback window (DESIGN §4.5) with a real master outside systemd: a generation that handed
over stays warm (its master, with preload its preloader, and no worker) for
upgrade.rollback_window; `supervisorctl rollback` makes it main again the way an upgrade does;
the window's end, a pruned release, a new upgrade and a stop each end it as warm.py says."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import threading
import time

import pytest

from procs import alive, children, cmdline, wait
from test_canary import Load, site, status   # noqa: F401 - `site` is the fixture

PRELOAD = "preload = true\n"


def make(site, tag: str, window: float = 30, preload: bool = False):
    """A release whose [upgrade] keeps a generation that hands over warm for `window` seconds."""
    rel = site.make(tag, count=2, upgrade=f"rollback_window = {window}\n")
    if preload:
        config = rel / "cadenza.toml"
        config.write_text(config.read_text().replace("[workers]\n", "[workers]\n" + PRELOAD, 1))
    return rel


def start(site, window: float = 30, preload: bool = False):
    make(site, "r1", window, preload)
    return site.serve("r1")


def upgrade_to(site, tag: str, **kw):
    make(site, tag, **kw)
    site.switch(tag)
    return site.ctl("upgrade")


@pytest.fixture
def warm_site(site):
    """test_canary's site (its masters closed after the test), for the rollback window."""
    return site


@pytest.mark.parametrize("preload", [False, True], ids=["exec", "preload"])
def test_a_rollback_inside_the_window_makes_the_warm_generation_main_again(warm_site, preload):
    site = warm_site
    m = start(site, preload=preload)
    load = Load(site.port)
    proc = upgrade_to(site, "r2", preload=preload)
    assert proc.returncode == 0 and "warm for a rollback" in proc.stdout, proc.stdout + proc.stderr
    st = status(site)
    assert st["generation"] == 2 and st["warm"]["generation"] == 1 and st["warm"]["release"].endswith("/r1")
    # Warm: the master (and its preloader) only, no worker.
    assert alive(m.pid) and all("worker" not in cmdline(p) for p in children(m.pid))
    if preload:
        assert [cmdline(p) for p in children(m.pid)] == ["cadenza preloader gen 1 [ctl]"]
    new_main = st["pid"]
    began = time.monotonic()
    back = site.ctl("rollback")
    took = time.monotonic() - began
    load.stop()
    assert back.returncode == 0, back.stdout + back.stderr
    st = status(site)
    assert st["generation"] == 1 and st["pid"] == m.pid and st["release"].endswith("/r1") and st["main"]
    assert st["warm"] is None and not alive(new_main)
    assert load.errors == [] and [a for a in load.answers if a[1] != 200] == [], load.errors[:3]
    assert load.since(began)["r1"] > 0
    if preload:
        assert took <= 1.0, f"the rollback took {took:.2f}s"
    metrics = site.ctl("metrics").stdout
    assert 'cadenza_upgrades_total{outcome="rolled_back"} 1' in metrics and \
        'cadenza_upgrades_total{outcome="ok"} 1' in metrics, metrics


def test_the_window_expires_and_then_a_rollback_is_refused(warm_site):
    site = warm_site
    m = start(site, window=1)
    assert upgrade_to(site, "r2", window=1).returncode == 0
    wait(lambda: not alive(m.pid), timeout=10, what="the warm generation gone at the window's end")
    assert m.wait_exit(timeout=5) == 0
    assert "generation 1 leaves: its rollback window is over" in m.log()
    back = site.ctl("rollback")
    assert back.returncode == 1 and "no generation is warm" in back.stderr, back.stderr
    assert status(site)["generation"] == 2


def test_a_rollback_to_a_pruned_release_is_refused_before_anything_changes(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    shutil.rmtree(site.path / "releases" / "r1")
    before = status(site)
    back = site.ctl("rollback")
    assert back.returncode == 1 and "is gone (pruned)" in back.stderr, back.stderr
    after = status(site)
    assert (after["generation"], after["pid"]) == (before["generation"], before["pid"]) and alive(m.pid)
    assert after["warm"]["generation"] == 1          # still warm: the window decides its end


def test_a_new_upgrade_ends_the_warm_generation_first(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    second = status(site)["pid"]
    proc = upgrade_to(site, "r3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # When the reload returns, nothing of generation 1 runs, and generation 2 is the warm one.
    assert not alive(m.pid)
    st = status(site)
    assert st["generation"] == 3 and st["warm"]["generation"] == 2 and alive(second)


def test_a_reload_returns_only_once_the_warm_generation_it_told_to_leave_has_gone(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    second = status(site)["pid"]
    m.signal(signal.SIGSTOP)          # a warm generation slow to go (its preloader stuck, say)
    try:
        make(site, "r3")
        site.switch("r3")
        done: dict = {}
        upgrading = threading.Thread(target=lambda: done.update(proc=site.ctl("upgrade", timeout=60)))
        upgrading.start()
        wait(lambda: status(site)["generation"] == 3 and not children(second), timeout=30,
             what="generation 3 main and generation 2 drained")
        # Pruning r1 right after the reload must be safe: generation 1 still runs, so no answer yet.
        upgrading.join(1.0)
        assert upgrading.is_alive(), done["proc"].stdout + done["proc"].stderr
    finally:
        m.signal(signal.SIGCONT)
    upgrading.join(60)
    assert done["proc"].returncode == 0, done["proc"].stdout + done["proc"].stderr
    assert not alive(m.pid)
    assert "generation 1 leaves: the main generation told it to leave (an upgrade starts)" in m.log()
    st = status(site)
    assert st["generation"] == 3 and st["warm"]["generation"] == 2 and alive(second)


def test_a_warm_generation_that_hangs_when_told_to_leave_is_killed_after_its_bound(warm_site):
    # graceful_timeout (1 s here) + LEAVE_MARGIN: the reload waits that long for it, no longer.
    site = warm_site
    m = start(site)
    rel = make(site, "r2")
    config = rel / "cadenza.toml"
    config.write_text(config.read_text().replace("graceful_timeout = 5", "graceful_timeout = 1", 1))
    site.switch("r2")
    assert site.ctl("upgrade").returncode == 0
    second = status(site)["pid"]
    m.signal(signal.SIGSTOP)          # hung for good: it will never read "expire"
    proc = upgrade_to(site, "r3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m.wait_exit(timeout=5) == -signal.SIGKILL
    st = status(site)
    assert st["generation"] == 3 and st["warm"]["generation"] == 2 and alive(second)
    assert "was told to leave 6s ago and is still there; killing it" in m.log()


@pytest.mark.parametrize("fault", ["stuck worker", "preloader killed"])
def test_a_generation_that_lost_its_preloader_while_it_drained_can_still_be_rolled_back_to(warm_site, fault):
    # With preload, a warm generation keeps its preloader. A worker stuck past graceful_timeout
    # must cost it only that worker, and a preloader lost while it drained is started again.
    site = warm_site
    rel = make(site, "r1", preload=True)
    config = rel / "cadenza.toml"
    config.write_text(config.read_text().replace("graceful_timeout = 5", "graceful_timeout = 2", 1))
    m = site.serve("r1")
    preloader = children(m.pid)[0]
    stuck = children(preloader)[0]
    os.kill(stuck, signal.SIGSTOP)        # a worker whose loop hangs: only the SIGKILL ends it
    make(site, "r2", preload=True)
    site.switch("r2")
    done: dict = {}
    upgrading = threading.Thread(target=lambda: done.update(proc=site.ctl("upgrade", timeout=60)))
    upgrading.start()
    wait(lambda: status(site)["generation"] == 2, timeout=30, what="generation 2 main, generation 1 draining")
    if fault == "preloader killed":
        os.kill(preloader, signal.SIGKILL)
    upgrading.join(60)
    assert done["proc"].returncode == 0 and "warm for a rollback" in done["proc"].stdout, done["proc"].stderr
    assert not alive(stuck)
    assert alive(preloader) == (fault == "stuck worker"), m.log()[-3000:]
    back = site.ctl("rollback")
    assert back.returncode == 0, back.stdout + back.stderr + m.log()[-3000:]
    st = status(site)
    assert st["generation"] == 1 and st["pid"] == m.pid and st["release"].endswith("/r1"), st
    wait(lambda: len([p for p in children(children(m.pid)[0]) if "worker" in cmdline(p)]) == 2, timeout=15,
         what="generation 1's two workers, forked by its preloader")


def test_a_stop_ends_the_warm_generation_too(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    main = status(site)["pid"]
    os.kill(main, signal.SIGTERM)
    wait(lambda: not alive(main) and not alive(m.pid), timeout=20, what="both masters gone")


def test_requests_to_a_warm_master_are_refused(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    for sig in (signal.SIGTTIN, signal.SIGHUP, signal.SIGUSR2):
        m.signal(sig)
    wait(lambda: m.log().count("is warm: kept for a rollback") >= 3, what="three refusals")
    assert all("worker" not in cmdline(p) for p in children(m.pid))
    assert status(site)["warm"]["generation"] == 1


def test_a_refused_upgrade_leaves_the_warm_generation_warm(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    (site.make("bad", count=2, upgrade="rollback_window = 30\n") / "cadenza.toml").write_text("")
    site.switch("bad")
    refused = site.ctl("upgrade")
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
    assert status(site)["warm"]["generation"] == 1 and alive(m.pid)


def test_after_a_rollback_the_next_upgrade_takes_a_new_generation_number(warm_site):
    site = warm_site
    start(site)
    assert upgrade_to(site, "r2").returncode == 0
    assert site.ctl("rollback").returncode == 0
    proc = upgrade_to(site, "r3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = status(site)
    # Generation 2 was used (and rolled back): the next one is 3, and so are its series.
    assert st["generation"] == 3 and st["release"].endswith("/r3")
    assert "cadenza_generations_total 3" in site.ctl("metrics").stdout


# ---- the warm state against a crash, a second request and a release that no longer starts ------

def test_a_rollback_whose_workers_cannot_start_fails_and_the_main_generation_serves_on(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    main = status(site)["pid"]
    load = Load(site.port)
    # After the hand-over, r1's code is broken in place: its workers (no preload) cannot import it.
    (site.path / "releases" / "r1" / "canaryapp.py").write_text("raise RuntimeError('r1 broke after it went warm')\n")
    back = site.ctl("rollback")
    load.stop()
    assert back.returncode == 1 and "r1 broke after it went warm" in back.stderr, back.stdout + back.stderr
    st = status(site)
    assert (st["generation"], st["pid"], st["main"]) == (2, main, True) and st["warm"] is None
    # The warm generation was told to stop when its rollback failed; generation 2 served throughout.
    wait(lambda: not alive(m.pid), timeout=20, what="the failed warm generation gone")
    assert load.errors == [] and {a[2] for a in load.answers} == {"r2"}, (load.errors[:3], load.since(0))
    assert 'cadenza_upgrades_total{outcome="failed"} 1' in site.ctl("metrics").stdout


def test_a_killed_warm_master_is_forgotten_and_a_rollback_is_then_refused(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    os.kill(m.pid, signal.SIGKILL)
    wait(lambda: status(site)["warm"] is None, what="the main generation noticing its warm one gone")
    back = site.ctl("rollback")
    assert back.returncode == 1 and "no generation is warm" in back.stderr, back.stderr
    assert status(site)["generation"] == 2


def test_a_killed_main_master_ends_its_warm_predecessor_too(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    os.kill(status(site)["pid"], signal.SIGKILL)
    # Nothing of generation 1 may serve alone from an old release: under systemd the unit restarts.
    assert m.wait_exit(timeout=20) == 0
    assert "generation 1 leaves: the main generation has gone" in m.log()


def test_a_second_rollback_while_one_runs_is_refused(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    with open(site.path / "releases" / "r1" / "canaryapp.py", "a") as app:   # its workers start slowly
        app.write("\nimport time\ntime.sleep(1.5)\n")
    first = {}
    thread = threading.Thread(target=lambda: first.update(proc=site.ctl("rollback", timeout=60)))
    thread.start()
    wait(lambda: "rollback requested by" in m.log() or "starts its workers again" in m.log(),
         what="the first rollback under way")
    second = site.ctl("rollback")
    thread.join()
    assert second.returncode == 1 and "rollback refused" in second.stderr, second.stderr
    assert first["proc"].returncode == 0, first["proc"].stdout + first["proc"].stderr
    assert status(site)["generation"] == 1


def test_a_preloader_kept_for_a_window_that_will_not_be_leaves_with_its_master(warm_site):
    """Generation 1 hands over keeping its preloader for the window, but generation 2 dies while
    generation 1 still drains a request: nothing is warm to roll back from, so generation 1
    exits, and its preloader with it (not left behind)."""
    site = warm_site
    rel = make(site, "r1", preload=True)
    with open(rel / "canaryapp.py", "a") as app:    # /slow holds generation 1's worker for 3 s
        app.write("\n_plain = app\ndef app(environ, start_response):\n"
                  "    if environ['PATH_INFO'] == '/slow':\n        import time; time.sleep(3)\n"
                  "    return _plain(environ, start_response)\n")
    m = site.serve("r1")
    preloader = [p for p in children(m.pid) if "preloader" in cmdline(p)][0]
    held = {}

    def slow():
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=20)
        conn.request("GET", "/slow")
        held["status"] = conn.getresponse().status
    thread = threading.Thread(target=slow)
    thread.start()
    wait(lambda: "GET /slow" in m.log() or any("worker" in cmdline(p) for p in children(preloader)),
         what="the slow request under way")
    make(site, "r2", preload=True)
    site.switch("r2")
    upgrading = threading.Thread(target=lambda: site.ctl("upgrade", timeout=60))
    upgrading.start()
    new_main = wait(lambda: (s := status(site))["generation"] == 2 and s["pid"], what="generation 2 main")
    os.killpg(new_main, signal.SIGKILL)
    thread.join()
    upgrading.join()
    assert held.get("status") == 200, held
    assert m.wait_exit(timeout=20) == 0
    # The master reaped it before it exited: nothing of r1 runs once generation 1's master is gone.
    assert not alive(preloader), f"generation 1's preloader (pid {preloader}) outlived its master"


def test_a_rollback_to_a_warm_generation_already_told_to_leave_is_refused(warm_site):
    site = warm_site
    m = start(site)
    assert upgrade_to(site, "r2").returncode == 0
    m.signal(signal.SIGSTOP)          # a warm master slow to go: it has not read "expire" yet
    try:
        (site.make("r3", count=2, upgrade="rollback_window = 30\n") / "canaryapp.py").write_text(
            "raise RuntimeError('r3 cannot start')\n")
        site.switch("r3")
        upgrading = threading.Thread(target=lambda: site.ctl("upgrade", timeout=60))
        upgrading.start()
        # The upgrade fails (r3 cannot import), and generation 2 serves again; the warm one, told to
        # leave when the upgrade started, is still there (stopped).
        st = wait(lambda: (s := status(site))["state"] == "serving" and s["warm"] and s["warm"]["leaving"] and s,
                  timeout=30, what="the upgrade failed, the warm generation told to leave")
        assert st["warm"]["leaving"] == "an upgrade starts", st["warm"]
        back = site.ctl("rollback")
        assert back.returncode == 1 and "told to leave (an upgrade starts)" in back.stderr, back.stderr
    finally:
        m.signal(signal.SIGCONT)
    upgrading.join()
    assert m.wait_exit(timeout=20) == 0
    st = status(site)
    assert st["generation"] == 2 and st["warm"] is None


# ---- PROMETHEUS_MULTIPROC_DIR across the window ------------------------------------------------

def counting(site, tag: str, preload: bool = False):
    """A release of test_metrics' COUNTING_APP (its own prometheus_client counter, multiprocess)."""
    from test_metrics import COUNTING_APP
    rel = make(site, tag, preload=preload)
    (rel / "canaryapp.py").write_text(COUNTING_APP)
    config = rel / "cadenza.toml"
    config.write_text(config.read_text() + "[metrics]\nmultiprocess = true\n")
    return rel


def app_hits(site) -> float | None:
    from test_metrics import app_counter
    return app_counter(site.port)


def test_the_application_s_counter_holds_through_the_window_a_rollback_and_a_stop(warm_site):
    from test_metrics import http_get
    site = warm_site
    counting(site, "r1")
    m = site.serve("r1")
    base = site.socket.parent / "metrics"
    for _ in range(10):
        http_get(site.port, "/")
    wait(lambda: app_hits(site) == 10, what="10 requests counted by generation 1")
    counting(site, "r2")
    site.switch("r2")
    assert site.ctl("upgrade").returncode == 0
    # The reload returns once generation 2 knows 1 is warm (its last merges done first): a
    # rollback may follow at once.
    assert status(site)["warm"]["generation"] == 1
    # Warm generation 1 writes nothing any more: its counts are generation 2's from now on.
    wait(lambda: sorted(os.listdir(base)) == ["gen-2"], what="gen-1 folded into gen-2 while 1 is warm")
    assert {app_hits(site) for _ in range(5)} - {None} == {10}
    for _ in range(5):
        http_get(site.port, "/")
    assert site.ctl("rollback").returncode == 0
    # Back on generation 1, with its directory made again; once 2 has gone, its counts join.
    wait(lambda: sorted(os.listdir(base)) == ["gen-1"], timeout=20, what="gen-2 folded into gen-1")
    wait(lambda: app_hits(site) == 15, what="all 15 requests counted after the rollback")
    assert alive(m.pid)
    counting(site, "r3")
    site.switch("r3")
    assert site.ctl("upgrade").returncode == 0      # generation 1 warm again, its counts with 3
    # Generation 3 follows generation 1 (not 2): the warm one, and the directory folded, are 1's.
    st = wait(lambda: (s := status(site))["warm"] and s, what="generation 1 warm again")
    assert (st["generation"], st["warm"]["generation"]) == (3, 1), st["warm"]
    wait(lambda: sorted(os.listdir(base)) == ["gen-3"], what="gen-1 folded into gen-3")
    wait(lambda: app_hits(site) == 15, what="the 15 requests counted by generation 3")
    main = status(site)["pid"]
    os.kill(main, signal.SIGTERM)
    wait(lambda: not alive(main) and not alive(m.pid), timeout=20, what="both masters gone")
    try:
        wait(lambda: os.listdir(base) == [], timeout=10, what=f"nothing left in {base}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {os.listdir(base)}\n{m.log()[-5000:]}") from None


def test_a_warm_preloader_that_dies_is_started_again_with_its_metrics_directory(warm_site):
    """The warm generation's directory was folded into the main one's; a new preloader (which
    creates the application's multiprocess metrics at import) gets it made again."""
    from test_metrics import http_get
    site = warm_site
    counting(site, "r1", preload=True)
    m = site.serve("r1")
    for _ in range(4):
        http_get(site.port, "/")
    counting(site, "r2", preload=True)
    site.switch("r2")
    assert site.ctl("upgrade").returncode == 0
    first = [p for p in children(m.pid) if "preloader" in cmdline(p)][0]
    os.kill(first, signal.SIGKILL)
    again = wait(lambda: [p for p in children(m.pid) if "preloader" in cmdline(p) and p != first],
                 timeout=20, what="a new preloader for the warm generation")[0]
    wait(lambda: "preloader (pid %d) ready" % again in m.log(), timeout=20, what="the new preloader ready")
    assert site.ctl("rollback").returncode == 0
    http_get(site.port, "/")
    wait(lambda: app_hits(site) == 5, timeout=20, what="all 5 requests counted after the rollback")
