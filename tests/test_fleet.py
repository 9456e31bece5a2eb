"""The fleet rollout of deploy/ansible/ (DESIGN §10): a real ansible-playbook, run with the
example inventory, against three hosts that are real systemd 252 instances in network namespaces
of their own, reached over SSH, behind a real HAProxy with health checks, while a client through
HAProxy counts every failed request (tests/fleet.py builds all of it, once per module).

Each scenario deploys fresh release ids onto whatever the previous one left serving, and states
what it expects from the hosts' own view: `current`, the unit's MainPID / NRestarts /
InvocationID, the release the master says it serves, and the app's own answer on the host.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

import fleet as F
from handover_fixtures import Hammer

# Booting is quick; the ansible runs are not (about 8 s per host on 2 loaded cores).
pytestmark = pytest.mark.timeout(600)




@pytest.fixture(scope="module")
def fleet(_sdns_session, tmp_path_factory):
    """Three hosts with release 1 installed by the role itself (pin, units, socket enabled),
    HAProxy seeing every one of them UP."""
    missing = F.missing_tools()
    if missing:
        pytest.fail("the fleet tests need " + "; ".join(missing))
    built = F.Fleet(tmp_path_factory.mktemp("fleet"))
    # The serving generation's [upgrade] times a canary: every release says 3 s.
    built.config_extra = "canary_duration = 3\n"
    try:
        built.start()
        first = built.release_id()
        run = rollout(built, first, cadenza_serial=3)
        assert run.rc == 0, run
        for host in built.hosts:
            assert host.current() == f"releases/{first}", run
            assert host.unit()["ActiveState"] == "active", host.journal()
            assert host.ns.systemctl("is-enabled", f"{F.APP}.socket").stdout.strip() == "enabled"
        F.wait_until(built.haproxy.all_up, 15, f"every server UP in HAProxy\n{built.haproxy.log()[-2000:]}")
        yield built
    finally:
        built.stop()


def rollout(fleet: F.Fleet, release: str, **kw) -> F.Run:
    """rollout.yml for a new release; its health check asks the app to name the release."""
    kw.setdefault("cadenza_health_contains", f"release {release} on ")
    run = fleet.rollout(release, **kw)
    print(run)   # in full under "Captured stdout" when the test fails; assertions cut it short
    return run


def client(fleet: F.Fleet) -> Hammer:
    """GETs on new connections through HAProxy (the first scenario adds a keep-alive client)."""
    return Hammer(fleet.haproxy.port, keepalive=0)


def downs(fleet: F.Fleet) -> dict[str, int]:
    """How many times HAProxy's health checks took each server DOWN so far."""
    return {name: int(s["chkdown"]) for name, s in fleet.haproxy.servers().items()}


def web1_journal(fleet: F.Fleet) -> str:
    # Not `-u`: journald 252 may file a service's first lines under init.scope.
    return fleet.host("web1").ns.journal("-o", "cat")


def assert_serves(host: F.Host, release: str) -> None:
    """current names a complete release, the master serves it, and so does the app's port."""
    assert host.current() == f"releases/{release}", (host.name, host.current())
    assert host.complete(release), f"{host.name}: releases/{release} has no .cadenza-release"
    assert host.serving() == release, host.name
    assert host.answer() == f"release {release} on {host.name}", (host.name, host.journal())


def test_example_inventory_names_the_fleet(tmp_path):
    """The example inventory is the one the tests roll out with: its hosts, addresses and app."""
    if not F.ANSIBLE_INVENTORY.exists():
        pytest.fail(f"{F.ANSIBLE_INVENTORY} is missing: {sys.executable} -m pip install ansible-core")
    (tmp_path / "ansible.cfg").write_text("")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}, "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(tmp_path), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
           "ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg")}
    proc = subprocess.run([str(F.ANSIBLE_INVENTORY), "-i", str(F.EXAMPLE_INVENTORY), "--list"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hostvars = json.loads(proc.stdout)["_meta"]["hostvars"]
    assert {name: v["ansible_host"] for name, v in hostvars.items()} == F.HOSTS
    for v in hostvars.values():
        assert (v["cadenza_app"], v["cadenza_root"], int(v["cadenza_port"])) == (F.APP, F.ROOT, F.PORT)


def test_good_release_rolls_out_host_by_host_with_no_failed_request(fleet):
    before, down = fleet.snapshot(), downs(fleet)
    old = {name: s["current"].split("/")[1] for name, s in before.items()}
    release = fleet.release_id()
    hammer = Hammer(fleet.haproxy.port)
    run = rollout(fleet, release)
    seen = hammer.check()
    assert run.rc == 0, run
    assert set(run.recap) == set(F.HOSTS), run
    assert all(r["failed"] == r["unreachable"] == 0 and r["changed"] > 0 for r in run.recap.values()), run
    after = fleet.snapshot()
    for host in fleet.hosts:
        b, a = before[host.name], after[host.name]
        assert_serves(host, release)
        assert a["MainPID"] != b["MainPID"], (host.name, b, a)               # a new generation
        assert (a["NRestarts"], a["InvocationID"], a["ActiveState"]) == \
            (b["NRestarts"], b["InvocationID"], "active"), (host.name, b, a)  # no restart
        assert len(a["releases"]) <= 3 and release in a["releases"], a     # pruned to keep_releases
        top = host.path(f"{F.ROOT}/releases/{release}")                       # root's, not the builder's
        owners = {p.relative_to(top).as_posix(): p.lstat().st_uid for p in (top, *top.rglob("*"))}
        assert set(owners.values()) == {0}, owners
        # Through HAProxy the client met both releases on every host.
        assert seen[f"release {release} on {host.name}"] > 0, seen
        assert seen[f"release {old[host.name]} on {host.name}"] > 0, seen
    # serial: 1 -- a host's current was switched before the next host's release venv was built.
    for done, nxt in zip(fleet.hosts, fleet.hosts[1:]):
        switched = os.lstat(done.path(f"{F.ROOT}/current")).st_mtime
        built = os.stat(nxt.path(f"{F.ROOT}/releases/{release}/.venv/pyvenv.cfg")).st_mtime
        assert switched < built, (done.name, switched, nxt.name, built)
    assert downs(fleet) == down and fleet.haproxy.all_up(), (fleet.haproxy.servers(), fleet.haproxy.log()[-2000:])


def test_release_that_fails_to_import_stops_the_rollout_at_the_first_host(fleet):
    before, down = fleet.snapshot(), downs(fleet)
    old = {name: s["current"].split("/")[1] for name, s in before.items()}
    release = fleet.release_id()
    hammer = client(fleet)
    run = rollout(fleet, release, app_body="import cadenza_fleet_no_such_module")
    seen = hammer.check()
    assert run.rc != 0, run
    # web1 failed; the play stopped there: web2 and web3 were never reached.
    assert set(run.recap) == {"web1"} and run.recap["web1"]["failed"] == 1, run
    assert "systemctl reload demo.service failed" in run.output, run
    assert "No module named 'cadenza_fleet_no_such_module'" in run.output, run
    assert f"current points at releases/{old['web1']} again" in run.output, run
    after = fleet.snapshot()
    for host in fleet.hosts:
        b, a = before[host.name], after[host.name]
        assert_serves(host, old[host.name])                                  # the old release, still
        assert {k: a[k] for k in ("MainPID", "NRestarts", "InvocationID")} == \
            {k: b[k] for k in ("MainPID", "NRestarts", "InvocationID")}, (host.name, b, a)
    assert fleet.host("web1").complete(release)       # kept for a look; the next prune removes it
    for name in ("web2", "web3"):
        assert after[name]["releases"] == before[name]["releases"], (name, after[name])
    assert not any(key.startswith(f"release {release} ") for key in seen), seen
    assert downs(fleet) == down and fleet.haproxy.all_up(), fleet.haproxy.servers()


def test_release_whose_venv_lacks_cadenza_stops_the_rollout_before_any_switch(fleet):
    """The role's own venv step (`python -m venv`, then its requirements.txt, here none): the
    venv has no bin/cadenza, so the release is never marked complete and current never moves."""
    before = fleet.snapshot()
    release = fleet.release_id()
    hammer = client(fleet)
    run = rollout(fleet, release, cadenza_venv_command="", cadenza_venv_python=F.base_python())
    seen = hammer.check()
    assert run.rc != 0, run
    assert set(run.recap) == {"web1"} and run.recap["web1"]["failed"] == 1, run
    assert f"/srv/demo/releases/{release}/.venv has no bin/cadenza" in run.output, run
    web1 = fleet.host("web1")
    assert web1.path(f"{F.ROOT}/releases/{release}/.venv/bin/python").exists()   # the venv was built
    assert not web1.complete(release)
    after = fleet.snapshot()
    for name in F.HOSTS:
        assert {k: v for k, v in after[name].items() if k != "releases"} == \
            {k: v for k, v in before[name].items() if k != "releases"}, (name, before[name], after[name])
    for name in ("web2", "web3"):
        assert after[name]["releases"] == before[name]["releases"], (name, after[name])
    assert not any(key.startswith(f"release {release} ") for key in seen), seen


def test_release_failing_its_health_check_is_reloaded_back_and_stops_the_rollout(fleet):
    """The new release starts and serves, but answers 503 on the health URL: the role reloads
    the previous release back on that host, and the rollout stops there."""
    before, down = fleet.snapshot(), downs(fleet)
    old = {name: s["current"].split("/")[1] for name, s in before.items()}
    release = fleet.release_id()
    hammer = client(fleet)
    run = rollout(fleet, release, health="503 Service Unavailable")
    seen = hammer.check()
    assert run.rc != 0, run
    assert set(run.recap) == {"web1"}, run
    assert run.recap["web1"]["failed"] == run.recap["web1"]["rescued"] == 1, run
    assert "Status code was 503" in run.output, run
    assert f"(releases/{old['web1']} serves again)" in run.output, run
    after = fleet.snapshot()
    for host in fleet.hosts:
        assert_serves(host, old[host.name])
        assert after[host.name]["NRestarts"] == before[host.name]["NRestarts"]
        assert after[host.name]["InvocationID"] == before[host.name]["InvocationID"]
    # web1 went to the new release and back: two upgrades, each a new generation.
    assert after["web1"]["MainPID"] != before["web1"]["MainPID"]
    for name in ("web2", "web3"):
        assert after[name] == before[name], (name, before[name], after[name])
    assert not any(key.startswith(f"release {release} on web") and not key.endswith("web1") for key in seen), seen
    assert downs(fleet) == down and fleet.haproxy.all_up(), fleet.haproxy.servers()


def test_canary_rolled_back_by_its_gate_stops_the_rollout(fleet):
    """cadenza_canary: 1 runs the pinned `supervisorctl upgrade --canary 1` instead of the reload;
    a release whose answers are all 500 is rolled back by the gate, and the rollout stops there."""
    before = fleet.snapshot()
    old = {name: s["current"].split("/")[1] for name, s in before.items()}
    release = fleet.release_id()
    hammer = client(fleet)
    run = rollout(fleet, release, cadenza_canary=1, status="500 Internal Server Error")
    failures = hammer.finish()
    assert run.rc != 0, run
    assert set(run.recap) == {"web1"} and run.recap["web1"]["failed"] == 1, run
    assert "supervisorctl upgrade --canary 1 failed" in run.output, run
    assert "canary failed" in run.output, run                       # the gate's figures
    assert f"current points at releases/{old['web1']} again" in run.output, run
    after = fleet.snapshot()
    for host in fleet.hosts:
        b, a = before[host.name], after[host.name]
        assert_serves(host, old[host.name])
        assert {k: a[k] for k in ("MainPID", "NRestarts", "InvocationID")} == \
            {k: b[k] for k in ("MainPID", "NRestarts", "InvocationID")}, (host.name, b, a)
    for name in ("web2", "web3"):
        assert release not in fleet.host(name).releases()
    assert not failures, failures               # the canary's 500s are answers, not lost requests
    assert hammer.seen["HTTP 500"] > 0, hammer.seen   # the canary took its share of the traffic
    assert set(hammer.seen) <= {"HTTP 500", *(f"release {old[n]} on {n}" for n in F.HOSTS)}, hammer.seen
    # A good release passes the gate and is promoted (here on web1 alone: a partial rollout).
    good = fleet.release_id()
    canaries = web1_journal(fleet).count("judged in 3s")
    assert canaries > 0
    hammer = client(fleet)
    run = rollout(fleet, good, cadenza_canary=1, cadenza_hosts="web1")
    seen = hammer.check()
    assert run.rc == 0 and set(run.recap) == {"web1"}, run
    assert web1_journal(fleet).count("judged in 3s") == canaries + 1, run    # through the canary
    web1 = fleet.host("web1")
    assert_serves(web1, good)
    now = web1.unit()
    assert now["MainPID"] != after["web1"]["MainPID"], (after["web1"], now)
    assert (now["NRestarts"], now["InvocationID"]) == (after["web1"]["NRestarts"], after["web1"]["InvocationID"])
    assert seen[f"release {good} on web1"] > 0, seen


def test_rerun_of_the_same_release_changes_and_reloads_nothing(fleet):
    release = fleet.release_id()
    run = rollout(fleet, release, cadenza_serial=3)           # all hosts in one batch
    assert run.rc == 0, run
    before, down = fleet.snapshot(), downs(fleet)
    reloads = {h.name: h.ns.journal("-o", "cat", "-u", F.UNIT).count("Reloading") for h in fleet.hosts}
    assert all(reloads.values()), reloads            # the journal does show reloads
    hammer = client(fleet)
    again = rollout(fleet, release, cadenza_serial=3)
    seen = hammer.check()
    assert again.rc == 0, again
    assert set(again.recap) == set(F.HOSTS), again
    assert all(r["changed"] == r["failed"] == r["unreachable"] == 0 for r in again.recap.values()), again
    assert fleet.snapshot() == before                # MainPID, InvocationID, current, releases ...
    for host in fleet.hosts:
        assert host.ns.journal("-o", "cat", "-u", F.UNIT).count("Reloading") == reloads[host.name]
        assert seen[f"release {release} on {host.name}"] > 0, seen
    assert set(seen) == {f"release {release} on {name}" for name in F.HOSTS}, seen
    assert downs(fleet) == down


def test_host_unreachable_mid_rollout_stops_the_play_and_nothing_is_half_switched(fleet):
    before, down = fleet.snapshot(), downs(fleet)
    old = {name: s["current"].split("/")[1] for name, s in before.items()}
    release = fleet.release_id()
    web2 = fleet.host("web2")
    cut: list[str] = []

    def cut_web2() -> None:
        # web1 is done (serial: 1) once web2's release directory appears; stopping sshd ends
        # every session too, so the task running on web2 dies with its connection.
        F.wait_until(lambda: web2.path(f"{F.ROOT}/releases/{release}").exists(), 180,
                     f"web2's releases/{release}")
        cut.append(web2.current())
        web2.stop_sshd()

    hammer = client(fleet)
    watcher = threading.Thread(target=cut_web2)
    watcher.start()
    try:
        run = rollout(fleet, release)
        watcher.join(200)
        seen = hammer.check()
        assert cut == [f"releases/{old['web2']}"], (cut, run)
        assert run.rc != 0, run
        assert run.recap["web2"]["unreachable"] == 1, run
        assert run.recap["web1"]["failed"] == run.recap["web1"]["unreachable"] == 0, run
        # The playbook's guard stopped the play before web3's batch, on the controller.
        assert run.recap["web3"] == {**run.recap["web3"], "ok": 0, "changed": 0, "failed": 1}, run
        assert "the rollout stops before web3, which are left as they are: web2 failed" in run.output, run
        after = fleet.snapshot()
        assert_serves(fleet.host("web1"), release)
        assert after["web1"]["MainPID"] != before["web1"]["MainPID"]
        for name in ("web2", "web3"):
            assert_serves(fleet.host(name), old[name])
            assert after[name]["MainPID"] == before[name]["MainPID"], (name, before[name], after[name])
        assert not web2.complete(release)                     # cut off while it was being unpacked
        assert release not in after["web3"]["releases"]
        assert seen[f"release {release} on web1"] > 0 and not any(
            key.startswith(f"release {release} on web") and not key.endswith("web1") for key in seen), seen
        assert downs(fleet) == down, fleet.haproxy.servers()   # the apps served on throughout
    finally:
        watcher.join(200)
        web2.start_sshd()
    # With web2 reachable again, the same release finishes the rollout (here in one batch): web2's
    # cut-off copy of the release is replaced, web1 is left as it is.
    hammer = client(fleet)
    again = rollout(fleet, release, cadenza_serial=3)
    hammer.check()
    assert again.rc == 0, again
    assert again.recap["web1"]["changed"] == 0 and again.recap["web2"]["changed"] > 0, again
    for host in fleet.hosts:
        assert_serves(host, release)


def test_second_app_with_a_shared_venv_is_installed_then_reloaded(fleet):
    """Releases without a venv of their own (cadenza_venv: false), pinned to a shared venv's
    Python (cadenza_pin_python), as with the Debian package's /opt/venvs/cadenza: a second app on
    web1, installed by the role (pin, units, socket) and reloaded to its next release, while the
    first app serves on untouched."""
    web1 = fleet.host("web1")
    solo = dict(cadenza_hosts="web1", cadenza_app="solo", cadenza_root="/srv/solo", cadenza_port=8001,
                cadenza_listen=["127.0.0.1:8001"], cadenza_venv=False, cadenza_pin_python=sys.executable,
                cadenza_health_url="http://127.0.0.1:8001/health", app="solo")
    demo = web1.unit()
    hammer = client(fleet)
    first = fleet.release_id()
    run = rollout(fleet, first, **solo)
    assert run.rc == 0 and set(run.recap) == {"web1"}, run
    launcher = web1.path("/srv/solo/shared/bin/cadenza").read_text()
    assert f"exec {sys.executable} -m cadenza" in launcher, launcher
    assert not web1.path(f"/srv/solo/releases/{first}/.venv").exists()
    assert web1.ns.systemctl("is-enabled", "solo.socket").stdout.strip() == "enabled"
    assert (web1.serving("solo"), web1.answer("solo")) == (first, f"release {first} on web1")
    started = web1.unit("solo")
    second = fleet.release_id()
    run = rollout(fleet, second, **solo)
    hammer.check()
    assert run.rc == 0 and run.recap["web1"]["changed"] > 0, run
    after = web1.unit("solo")
    assert after["MainPID"] != started["MainPID"], (started, after)
    assert (after["NRestarts"], after["InvocationID"]) == (started["NRestarts"], started["InvocationID"])
    assert web1.current("solo") == f"releases/{second}"
    assert (web1.serving("solo"), web1.answer("solo")) == (second, f"release {second} on web1")
    assert web1.unit() == demo                 # the first app: same generation, same invocation
