"""The rollback window (DESIGN §4.5) with a real master outside systemd: a generation that handed
over stays warm (its master, with preload its preloader, and no worker) for
upgrade.rollback_window; `supervisorctl rollback` makes it main again the way an upgrade does;
the window's end, a pruned release, a new upgrade and a stop each end it as warm.py says."""

from __future__ import annotations

import os
import shutil
import signal
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
    site.switch("r1")
    site.pin()
    from procs import Master
    m = Master(site.path.parent, cwd=site.path / "current")
    site.masters.append(m)
    m.wait_ready()
    return m


def upgrade_to(site, tag: str, **kw):
    make(site, tag, **kw)
    site.switch(tag)
    return site.ctl("upgrade")


@pytest.fixture
def warm_site(site):
    site.masters = []
    yield site
    for m in site.masters:
        m.close()


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
    assert "leaves: its rollback window is over" in m.log()
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
