"""Metrics (DESIGN §9) under a real systemd 252 (tests/sdns.py), from the project's own units
rendered by `cadenza units` and hardened as shipped (ProtectSystem=strict, PrivateTmp=,
RuntimeDirectory=cadenza/APP ...): `[metrics] listen` scraped through three `systemctl reload`s
while a client is served, `supervisorctl metrics` through the pinned launcher,
PROMETHEUS_MULTIPROC_DIR under the unit's RuntimeDirectory= across reloads and a stop, and the
master's memory with metrics on.

One systemd serves the whole module; its /srv is a tmpfs of its own, where each test's app root
/srv/APP lives (outside /tmp and /home, which the hardened unit hides). Each test runs its own
app (unit, root, ports). The namespace shares the host's network: the test scrapes and sends
requests to 127.0.0.1 from the host. Pids: systemd reports the namespace's; its /proc is read
from the host through the namespace's root (SystemdNS.host_path).
"""
from __future__ import annotations

import collections
import http.client
import itertools
import json
import os
import re
import select
import socket
import sys
import threading
import time

import pytest

import sdns
from deploy import APP as RELEASE_APP
from handover_fixtures import CLIENTS, Hammer, poll
from procs import VENV_BIN, accepted, free_port
from test_metrics import COUNTING_APP, app_counter, families, samples, scrape_text, value

CADENZA = str(VENV_BIN / "cadenza")
SERIAL = itertools.count(1)   # the module's systemd keeps running: each app gets names of its own
COUNTERS = ("_total", "_bucket", "_sum", "_count")   # the sample names of counters and histograms


@pytest.fixture(scope="module")
def ns(_sdns_session):
    """One booted systemd for every test of this module, with a private /srv for the app roots."""
    with sdns.SystemdNS(net="host", extra_tmpfs=("/srv",)) as booted:
        yield booted


class Site:
    """/srv/NAME inside the namespace: releases/TAG (the app and cadenza.toml with `[metrics]
    listen`), `current`, shared/bin pinned with `cadenza pin --python` (the project's venv), and
    NAME.service / NAME.socket from `cadenza units`. Its control socket is the default one,
    /run/cadenza/NAME/control.sock, in the unit's RuntimeDirectory=."""

    def __init__(self, ns, source=None, app: str = "app:app", extra: str = ""):
        self.ns, self.app, self.extra = ns, app, extra
        self.source = source or (lambda tag: RELEASE_APP.format(body="", tag=tag))
        self.name = f"metrics-{next(SERIAL)}"
        self.root = f"/srv/{self.name}"            # inside the namespace
        self.host = ns.host_path(self.root)        # the same, from the host
        self.port = free_port()
        while (metrics_port := free_port()) == self.port:
            pass
        self.metrics_port = metrics_port
        self.unit = f"{self.name}.service"
        self.runtime = f"/run/cadenza/{self.name}"

    def release(self, tag: str) -> None:
        rel = self.host / "releases" / tag
        rel.mkdir(parents=True)
        (rel / f"{self.app.split(':')[0]}.py").write_text(self.source(tag))
        (rel / "cadenza.toml").write_text(
            f'[app]\nname = "{self.name}"\nroot = "{self.root}"\n'
            f'[workers]\ncount = 2\napp = "{self.app}"\nready_timeout = 30\ngraceful_timeout = 5\n'
            f'[upgrade]\ntimeout = 30\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n{self.extra}')

    def switch(self, tag: str) -> None:
        tmp = self.host / f".current.{tag}"
        tmp.symlink_to(f"releases/{tag}")
        os.replace(tmp, self.host / "current")

    def start(self) -> None:
        self.release("r1")
        self.switch("r1")
        self.ns.run(CADENZA, "pin", "--root", self.root, "--python", sys.executable, check=True)
        out = self.ns.state / f"rendered-{self.name}"
        self.ns.run(CADENZA, "units", "--name", self.name, "--root", self.root,
                    "--listen", f"127.0.0.1:{self.port}", "-o", str(out), check=True)
        for name in (self.unit, f"{self.name}.socket"):
            self.ns.write_unit(name, (out / name).read_text())
        # The shipped hardening hides /tmp, /var/tmp, /home and /root from the service; a checkout
        # (and so the venv the service runs from) that CI placed there is bound back in, read-only.
        if dropin := sdns.hardening_dropin():
            self.ns.write_unit(f"{self.unit}.d/checkout.conf", dropin)
        self.ns.systemctl("daemon-reload", check=True)
        started = self.ns.systemctl("start", f"{self.name}.socket", self.unit)
        assert started.returncode == 0, f"{started.stderr}\n{self.journal()}"

    def deploy_and_reload(self, tag: str) -> None:
        self.release(tag)
        self.switch(tag)
        done = self.ns.systemctl("reload", self.unit, timeout=120)
        assert done.returncode == 0, f"systemctl reload {self.unit} to {tag}: {done.stderr}\n{self.journal()}"

    def stop(self) -> None:
        self.ns.systemctl("stop", f"{self.name}.socket", self.unit)

    def journal(self) -> str:
        return self.ns.journal("-u", self.unit, "-o", "cat", "-n", "60")

    def ctl(self, *args: str):
        """The pinned supervisorctl, run inside the namespace (the control socket is there)."""
        return self.ns.run(f"{self.root}/shared/bin/supervisorctl", *args, timeout=60)

    def scrape(self) -> dict:
        return samples(scrape_text(self.metrics_port))

    def main_pid(self) -> int:
        return int(self.ns.show(self.unit, "MainPID")["MainPID"])

    def proc_status(self, pid: int) -> str:
        """/proc/PID/status of a namespace pid."""
        return self.ns.host_path(f"/proc/{pid}/status").read_text()


@pytest.fixture
def make_site(ns):
    """make_site(**Site settings) -> a started Site; its units are stopped after the test."""
    made: list[Site] = []

    def make(**kw) -> Site:
        made.append(Site(ns, **kw))
        made[-1].start()
        return made[-1]
    yield make
    for site in made:
        site.stop()


def get(port: int, path: str = "/") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (path, resp.status, body)
        return body
    finally:
        conn.close()


def until(probe, what, timeout: float = 20.0) -> None:
    """Until probe() is true; `what()` says, at the deadline, what was wanted and what there is."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what()}"
        time.sleep(0.02)


def main_generations(found: dict) -> list[str]:
    return [dict(labels)["generation"] for (name, labels), v in found.items()
            if name == "cadenza_generation_main" and v == 1]


def generations(found: dict) -> set[str]:
    return {dict(labels)["generation"] for (name, labels), _ in found.items() if name == "cadenza_generation_info"}


def generation_series(found: dict) -> dict:
    """The per-generation and upgrade series of a scrape, for a failure's message."""
    return {f"{name}{dict(labels)}": v for (name, labels), v in found.items()
            if name.startswith(("cadenza_generation", "cadenza_upgrades_total"))}


class Scraper:
    """GET /metrics every ~50 ms from a thread until stop(); every answer parsed (prometheus_client's
    parser), every failure kept with its time."""

    def __init__(self, port: int):
        self.port, self.scrapes, self.failures = port, [], []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.scrapes.append(samples(scrape_text(self.port)))
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"{time.strftime('%T')}: {exc!r}")

    def stop(self) -> list[dict]:
        self._done.set()
        self._thread.join(30)
        return self.scrapes


# ---- 1. scrapes through three reloads -----------------------------------------------------------

def test_scrapes_through_three_reloads_are_all_answered_and_no_counter_goes_back(make_site):
    site = make_site()
    client = Hammer(site.port)
    scraper = Scraper(site.metrics_port)
    try:
        poll(lambda: len(scraper.scrapes) >= 3, what="3 scrapes of generation 1")
        for n in (2, 3, 4):
            site.deploy_and_reload(f"r{n}")
            # Answered by the new main master before the next reload: every generation is scraped.
            poll(lambda: scraper.scrapes and main_generations(scraper.scrapes[-1]) == [str(n)],
                 what=f"a scrape with generation {n} main")
        # A worker reports its count at most once a second (worker/report.py), and a generation
        # here may be main for less: wait, with the client still running, for generation 4's report.
        poll(lambda: value(scraper.scrapes[-1], "cadenza_http_requests_total", generation="4") > 0,
             timeout=10, what="a scrape counting a request of generation 4")
    finally:
        scrapes = scraper.stop()
        client.finish()
    assert scraper.failures == [], f"{len(scraper.failures)} of {len(scrapes) + len(scraper.failures)} " \
                                   f"scrapes failed: {scraper.failures[:5]}\n{site.journal()}"
    seen = client.check()
    assert {"release r1", "release r4"} <= set(seen) <= {f"release r{n}" for n in range(1, 5)}, seen
    # No scrape named two main generations, and each of the four was main in some. (A scrape that
    # the leaving master answers names none; the last test of this module makes that on purpose.)
    mains = [main_generations(found) for found in scrapes]
    several = [(i, generation_series(found)) for i, found in enumerate(scrapes) if len(mains[i]) > 1]
    assert several == [], f"{len(several)} of {len(scrapes)} scrapes named several main generations: {several[:3]}"
    assert {m[0] for m in mains if m} == {"1", "2", "3", "4"}, collections.Counter(map(tuple, mains))

    # Once generation 3 is gone its series end: the scrape speaks of generation 4 alone.
    final = {}

    def settled() -> bool:
        nonlocal final
        final = site.scrape()
        return generations(final) == {"4"}
    poll(settled, timeout=10, what="a scrape naming generation 4 alone")
    scrapes.append(final)
    assert value(final, "cadenza_upgrades_total", outcome="ok") == 3, final
    for outcome in ("failed", "refused", "rolled_back"):
        assert value(final, "cadenza_upgrades_total", outcome=outcome) == 0, (outcome, final)
    assert value(final, "cadenza_upgrade_duration_seconds_count") == 3
    assert value(final, "cadenza_generation_main", generation="4") == 1
    assert value(final, "cadenza_generation_info", generation="4", release="r4", state="serving") == 1
    assert value(final, "cadenza_generations_total") == 4
    assert value(final, "cadenza_generation_workers", generation="4", state="ready") == 2
    assert value(final, "cadenza_http_requests_total", generation="4") > 0, final

    # Every counter, bucket, sum and count seen in two consecutive scrapes went up or stayed.
    compared, backwards = 0, []
    for i, (a, b) in enumerate(itertools.pairwise(scrapes)):
        for key, before in a.items():
            if key[0].endswith(COUNTERS) and key in b:
                compared += 1
                if b[key] < before:
                    backwards.append((i, main_generations(a), main_generations(b), key, before, b[key]))
    assert compared > 100, compared
    assert backwards == [], f"{len(backwards)} counter(s) went backwards (scrape, mains, series, " \
                            f"before, after): {backwards[:10]}"

    # The pinned supervisorctl prints the same families (its figures are a moment later).
    printed = site.ctl("metrics")
    assert printed.returncode == 0, printed.stdout + printed.stderr
    assert families(printed.stdout) == families(scrape_text(site.metrics_port)), printed.stdout[:2000]
    assert value(samples(printed.stdout), "cadenza_generations_total") == 4


# ---- 2. PROMETHEUS_MULTIPROC_DIR under RuntimeDirectory= -----------------------------------------

def test_multiprocess_counter_is_whole_after_two_reloads_and_the_stop_leaves_nothing(make_site):
    site = make_site(source=lambda tag: COUNTING_APP, app="countapp:app", extra="multiprocess = true\n")
    base = site.ns.host_path(f"{site.runtime}/metrics")

    def dirs() -> list[str]:
        try:
            return sorted(os.listdir(base))
        except FileNotFoundError:
            return []

    def app_hits() -> float | None:
        return app_counter(site.port)

    sent = 0
    for n in (1, 2, 3):
        if n > 1:
            site.deploy_and_reload(f"r{n}")
        # The predecessor's directory is folded into this generation's once it is gone.
        until(lambda: dirs() == [f"gen-{n}"], lambda: f"gen-{n} alone in {site.runtime}/metrics: {dirs()}")
        until(lambda: app_hits() == sent,
              lambda: f"the application's counter at {sent} in generation {n}: it says {app_hits()}")
        for _ in range(10):
            get(site.port)
        sent += 10
    until(lambda: app_hits() == sent, lambda: f"the application's counter at {sent}: it says {app_hits()}")
    assert dirs() == ["gen-3"], dirs()
    # The live workers write into this generation's directory (prometheus_client names a file
    # by the process's pid; the workers' environ is not readable, setproctitle overwrites it).
    status = site.ctl("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    workers = {w["pid"] for w in json.loads(status.stdout)["workers"]}
    written = {int(m.group(1)) for name in os.listdir(base / "gen-3")
               if (m := re.fullmatch(r"counter_(\d+)\.db", name))}
    assert len(workers) == 2 and workers <= written, (workers, sorted(os.listdir(base / "gen-3")))

    stopped = site.ns.systemctl("stop", site.unit)
    assert stopped.returncode == 0, stopped.stderr + site.journal()
    props = site.ns.show(site.unit, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, f"{props}\n{site.journal()}"
    assert not site.ns.host_path(site.runtime).exists(), \
        f"left after the stop: {sorted(p.name for p in site.ns.host_path(site.runtime).rglob('*'))}"


# ---- 3. the master's memory ---------------------------------------------------------------------

def rss_kb(site: Site, pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", site.proc_status(pid)).group(1))


def test_the_master_stays_under_20_mb_with_metrics_on(make_site, record_property):
    site = make_site(extra="multiprocess = true\n")
    figures = {}
    for n in (1, 2):
        if n > 1:
            site.deploy_and_reload(f"r{n}")
        for _ in range(20):
            get(site.port)
        poll(lambda: value(site.scrape(), "cadenza_http_requests_total", generation=str(n)) == 20,
             what=f"20 requests of generation {n} counted")
        for _ in range(5):
            found = site.scrape()
        assert main_generations(found) == [str(n)], found
        pid = site.main_pid()
        figures[f"generation {n} (pid {pid})"] = kb = rss_kb(site, pid)
        assert kb <= 20 * 1024, f"generation {n}'s master (pid {pid}): VmRSS {kb} kB with metrics on"
    record_property("master_rss_kb", figures)
    print(f"\nmaster VmRSS with metrics on: {figures}")


# ---- 4. scrapes accepted by the main master whose request comes after the hand-over --------------

def send_scrape(sock: socket.socket) -> bytes:
    """GET /metrics on a connection opened earlier; all it gets back until the server closes. A
    master that exited answered before it went: what it wrote is read first (writing to a closed
    connection would be answered with a reset, which discards it)."""
    data = b""
    if select.select([sock], [], [], 0)[0]:
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        return data
    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def test_scrapes_accepted_by_the_main_master_before_the_hand_over_are_answered_by_a_main_one(make_site):
    """A scraper connects, then sends its request: the master that accepted the connection may
    have handed over meanwhile (A), or even drained and exited (B). Each is still answered, and
    the answer names exactly one main generation, as every scrape of the service does."""
    site = make_site()
    assert main_generations(site.scrape()) == ["1"]
    held = {}
    for which in ("A", "B"):
        held[which] = socket.create_connection(("127.0.0.1", site.metrics_port), timeout=20)
        poll(lambda: accepted(site.metrics_port, held[which].getsockname()[1]),
             what=f"scrape {which} accepted by generation 1")
    # A response that waits for a gate keeps generation 1 leaving until the test lets it go.
    gate = f"{site.root}/gate"
    stream = socket.create_connection(("127.0.0.1", site.port), timeout=30)
    stream.sendall(f"GET /stream?gate={gate} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    streamed = b""
    while b"release r1" not in streamed:
        chunk = stream.recv(4096)
        assert chunk, f"the stream ended before its first line: {streamed!r}"
        streamed += chunk
    reload = CLIENTS.submit(site.deploy_and_reload, "r2")
    try:
        poll(lambda: main_generations(site.scrape()) == ["2"], what="generation 2 main")
        answers = {"A": send_scrape(held["A"])}           # generation 1 is leaving
    finally:
        site.ns.host_path(gate).touch()
    while chunk := stream.recv(4096):
        streamed += chunk
    stream.close()
    reload.result(timeout=60)                             # generation 1 drained and exited
    answers["B"] = send_scrape(held["B"])
    assert streamed.startswith(b"HTTP/1.1 200") and streamed.endswith(b"end\n\r\n0\r\n\r\n"), streamed
    wrong = []
    for which, data in answers.items():
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 OK"):
            wrong.append(f"scrape {which} was not answered: it got {data[:200]!r}")
        elif len(main_generations(found := samples(body.decode()))) != 1:
            wrong.append(f"scrape {which} names no main generation: {generation_series(found)}")
    assert wrong == [], "\n".join(wrong) + f"\n{site.journal()}"
