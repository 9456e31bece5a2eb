"""Metrics (DESIGN §9) from a real master outside systemd: `[metrics] listen` and `supervisorctl
metrics`, read back with prometheus_client's own parser; counters across worker deaths, recycles
and upgrades; what scrapes cost the master; and PROMETHEUS_MULTIPROC_DIR owned across generations."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from procs import Master, alive, children, free_port, wait
from test_control import Root

STATUS_APP = '''
import os

def app(environ, start_response):
    path = environ["PATH_INFO"]
    code = {"/500": "500 Internal Server Error", "/404": "404 Not Found", "/302": "302 Found"}.get(path, "200 OK")
    if path == "/raise":
        raise RuntimeError("a failing view")
    start_response(code, [("Content-Type", "text/plain")])
    return [f"pid {os.getpid()}".encode()]
'''

# Counts its own requests with prometheus_client in multiprocess mode, as an application would.
COUNTING_APP = '''
import os
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

HITS = Counter("app_hits", "requests the application served")

def app(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        HITS.inc()
        body = f"pid {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
'''


def scrape_text(port: int, path: str = "/metrics") -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read().decode()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    return body


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of every sample, as prometheus_client parses them;
    a family's type is checked against what its name says."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_total") or family.type == "counter":
            assert family.type == "counter", family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_until(port: int, predicate, what: str) -> dict:
    """The first scrape whose samples satisfy `predicate` (a worker reports within a second)."""
    found = {}

    def check():
        nonlocal found
        found = samples(scrape_text(port))
        return predicate(found)
    wait(check, what=what)
    return found


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(found: dict, name: str, **labels) -> float:
    matches = [v for (n, ls), v in found.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items())]
    return sum(matches)


def hit(port: int, path: str = "/", n: int = 1) -> None:
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        conn.getresponse().read()
        conn.close()


@pytest.fixture
def site(tmp_path):
    """A pinned root whose release serves STATUS_APP, metrics on a loopback port."""
    socket_dir = Path(tempfile.mkdtemp(prefix="cadenza-metrics-", dir="/var/tmp"))
    root = Root(tmp_path, free_port(), socket_dir)
    root.metrics_port = free_port()
    root.metrics_listen = f"127.0.0.1:{root.metrics_port}"

    def release(tag: str, extra: str = "", app_text: str = STATUS_APP, app: str = "statusapp:app", workers: str = ""):
        rel = root.release(tag, extra=f'[metrics]\nlisten = "{root.metrics_listen}"\n{extra}', app=app)
        config = rel / "cadenza.toml"
        config.write_text(config.read_text().replace("[workers]\n", "[workers]\n" + workers, 1))
        (rel / (app.split(":")[0] + ".py")).write_text(app_text)
        return rel
    root.make = release

    def start(extra: str = "", **kw):
        release("r1", extra, **kw)
        return root.serve("r1")
    root.start = start
    yield root
    root.close()
    shutil.rmtree(socket_dir, ignore_errors=True)


def upgrade(root, tag: str, **kw) -> subprocess.CompletedProcess:
    root.make(tag, **kw)
    root.switch(tag)
    return root.ctl("upgrade")


# ---- the exposition ---------------------------------------------------------------------------

def test_a_scrape_names_every_family_and_counts_responses_by_class(site):
    site.start()
    for path, n in (("/", 5), ("/404", 3), ("/500", 2), ("/raise", 1), ("/302", 1)):
        hit(site.port, path, n)
    found = scrape_until(site.metrics_port, lambda s: value(s, "cadenza_http_requests_total") == 12,
                         "12 requests counted")
    assert value(found, "cadenza_http_responses_total", code="2xx") == 5
    assert value(found, "cadenza_http_responses_total", code="3xx") == 1
    assert value(found, "cadenza_http_responses_total", code="4xx") == 3
    assert value(found, "cadenza_http_responses_total", code="5xx") == 3      # the raising view is uvicorn's 500
    assert value(found, "cadenza_http_request_duration_seconds_count") == 12
    assert value(found, "cadenza_http_request_duration_seconds_bucket", le="+Inf") == 12
    assert value(found, "cadenza_generation_workers", state="ready") == 2
    assert value(found, "cadenza_generation_info", generation="1", release="r1", state="serving") == 1
    assert value(found, "cadenza_generation_main", generation="1") == 1
    assert 0 < value(found, "cadenza_generation_ready_seconds") < 15
    assert abs(value(found, "cadenza_generation_start_time_seconds") - time.time()) < 120
    text = scrape_text(site.metrics_port)
    from cadenza.daemon.metrics import FAMILIES
    assert families(text) == {name.removesuffix("_total"): kind for name, kind in FAMILIES.items()}
    # supervisorctl prints the same families (its figures are a moment later: compare the names).
    printed = site.ctl("metrics")
    assert printed.returncode == 0, printed.stderr
    assert families(printed.stdout) == families(text)
    for path in ("/", "/metrics"):
        assert scrape_text(site.metrics_port, path)
    conn = http.client.HTTPConnection("127.0.0.1", site.metrics_port, timeout=5)
    conn.request("GET", "/other")
    assert conn.getresponse().status == 404


def test_counters_never_go_backwards_across_deaths_recycles_and_upgrades(site):
    m = site.start()
    scrapes = []

    def scrape_after(step: str) -> dict:
        found = samples(scrape_text(site.metrics_port))
        scrapes.append((step, found))
        return found
    hit(site.port, "/", 20)
    hit(site.port, "/500", 4)
    wait(lambda: value(samples(scrape_text(site.metrics_port)), "cadenza_http_requests_total") == 24,
         what="24 requests counted")
    scrape_after("served")
    os.kill(children(m.pid)[0], signal.SIGKILL)
    m.wait_status("2/2 workers ready")
    hit(site.port, "/", 10)
    found = scrape_until(site.metrics_port, lambda s: value(s, "cadenza_http_requests_total") == 34,
                         "34 requests counted")
    assert value(found, "cadenza_worker_restarts_total", cause="signal") == 1
    scrape_after("a worker killed")
    assert site.ctl("restart").returncode == 0
    found = scrape_after("a rolling restart")
    assert value(found, "cadenza_worker_restarts_total", cause="restart") == 2
    assert value(found, "cadenza_http_requests_total") == 34      # the replaced workers' counts stay
    for n in (2, 3):
        proc = upgrade(site, f"r{n}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # The old master has exited; the new one notices through its pidfd, a moment later.
        scrape_until(site.metrics_port, lambda s: value(s, "cadenza_generation_info", generation=str(n),
                                                        release=f"r{n}", state="serving") == 1, "serving alone")
        found = scrape_after(f"upgrade to generation {n}")
        assert value(found, "cadenza_upgrades_total", outcome="ok") == n - 1
        assert value(found, "cadenza_upgrade_duration_seconds_count") == n - 1
        assert value(found, "cadenza_generations_total") == n
        assert value(found, "cadenza_worker_restarts_total", cause="restart") == 2   # carried on
    failed = upgrade(site, "bad", app="statusapp:missing")
    assert failed.returncode == 1, failed.stdout
    found = scrape_after("a failed upgrade")
    assert value(found, "cadenza_upgrades_total", outcome="failed") == 1
    assert value(found, "cadenza_upgrade_duration_seconds_count") == 3
    # Every counter, bucket and sum of every series seen twice went up or stayed.
    for (step_a, a), (step_b, b) in zip(scrapes, scrapes[1:]):
        for key, before in a.items():
            name = key[0]
            if key in b and (name.endswith(("_total", "_bucket", "_sum", "_count"))):
                assert b[key] >= before, (step_a, step_b, key, before, b[key])


def test_scrapes_during_an_upgrade_are_all_answered(site):
    site.start()
    failures, answered, stop = [], [], threading.Event()

    def scraper():
        while not stop.is_set():
            try:
                answered.append(families(scrape_text(site.metrics_port)))
            except Exception as exc:   # noqa: BLE001 - the test reports any failure
                failures.append(repr(exc))
            time.sleep(0.02)
    thread = threading.Thread(target=scraper)
    thread.start()
    proc = upgrade(site, "r2")
    stop.set()
    thread.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert failures == [] and len(answered) > 10, failures[:3]


def test_idle_exposition_costs_no_wake_ups_and_the_master_stays_small(site):
    m = site.start()
    scrape_text(site.metrics_port)
    time.sleep(1.5)      # the workers' last report is in; from here nothing happens

    def switches() -> int:
        text = Path(f"/proc/{m.pid}/status").read_text()
        return sum(int(x) for x in re.findall(r"ctxt_switches:\s+(\d+)", text))
    before = switches()
    time.sleep(3)
    assert switches() == before, "the master woke up while nobody scraped"
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{m.pid}/status").read_text()).group(1))
    assert rss_kb <= 20 * 1024, f"master RSS {rss_kb} kB with metrics on"


def test_stalled_and_crowding_scrapers_cost_the_master_nothing(site):
    m = site.start()
    idle = [socket.create_connection(("127.0.0.1", site.metrics_port)) for _ in range(40)]
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    reader.connect(("127.0.0.1", site.metrics_port))
    reader.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")    # and never reads
    cpu = lambda: sum(map(int, Path(f"/proc/{m.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
    before = cpu()
    time.sleep(1)
    assert cpu() - before <= 5, "the master spun on stalled scrapers"           # clock ticks (10 ms)
    # The crowd beyond MAX_CLIENTS was closed at once; control and serving are unaffected.
    closed = 0
    for sock in idle:
        sock.settimeout(0.5)
        try:
            closed += sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            pass
    assert closed >= 40 - 16
    assert site.ctl("status").returncode == 0
    for sock in idle:
        sock.close()
    wait(lambda: samples(scrape_text(site.metrics_port)), what="a scrape answered")
    reader.close()


def test_a_unix_socket_exposition(site):
    path = site.socket.parent / "metrics.sock"
    site.metrics_listen = f"unix:{path}"
    site.start()
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and "cadenza_generation_info" in families(body.decode())


def test_a_metrics_address_that_cannot_be_bound_fails_the_start_with_its_reason(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    (tmp_path / "cadenza.toml").write_text(
        f'[app]\nname = "mx"\n[listen]\naddresses = ["127.0.0.1:{free_port()}"]\n[workers]\n'
        f'app = "cadenza.demo:app"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[control]\nsocket = "{tmp_path}/control.sock"\n')
    os.chmod(tmp_path, 0o700)
    m = Master(tmp_path, "-c", "cadenza.toml")
    try:
        assert m.wait_exit() == 71
        assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in m.log()
    finally:
        m.close()
        busy.close()


# ---- PROMETHEUS_MULTIPROC_DIR -----------------------------------------------------------------

def test_the_application_s_own_counter_survives_100_recycles_and_3_upgrades(site):
    # max_requests = 1: each request makes its worker due, and the next request waits for the
    # recycle, so that there are 100 of them. Preload: a recycle is a fork (the counter's values
    # of the preloader, made at import, are there too).
    config = dict(extra="multiprocess = true\n", app_text=COUNTING_APP, app="countapp:app",
                  workers="max_requests = 1\npreload = true\n")
    m = site.start(**config)
    base = site.socket.parent / "metrics"
    sent = recycles = 0
    most = [0]

    def app_hits() -> float | None:
        return app_counter(site.port)

    def recycled() -> float:
        return value(samples(scrape_text(site.metrics_port)), "cadenza_worker_restarts_total", cause="recycled")

    def settle(generation: int):
        wait(lambda: sorted(os.listdir(base)) == [f"gen-{generation}"], timeout=30,
             what=f"gen-{generation} alone in {base}")
        wait(lambda: app_hits() == sent, timeout=30, what=f"the application's counter at {sent}")
        # Merges follow the exits by a tool's run (a batch at a time): the files come down to the
        # archive, the live workers' and the preloader's, and the lock.
        wait(lambda: len(os.listdir(base / f"gen-{generation}")) <= 6, timeout=20,
             what=f"the files of gen-{generation} merged: {sorted(os.listdir(base / f'gen-{generation}'))}")
        most[0] = max(most[0], len(os.listdir(base / f"gen-{generation}")))
    for generation, tag in ((1, "r2"), (2, "r3"), (3, "r4")):
        goal = {1: 34, 2: 68, 3: 100}[generation]     # recycles in all, by the end of this generation
        while recycles < goal:
            before = recycled()
            pid = int(http_get(site.port, "/").split()[1])
            sent += 1
            # The worker that answered is recycled, or it was one already replaced and draining
            # (the kernel may queue a connection to it in the moment before it stops accepting).
            try:
                wait(lambda: recycled() > before or not alive(pid), timeout=20, what=f"recycle {recycles + 1}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the master's log ends:\n{m.log()[-6000:]}") from None
            recycles = int(recycled())
            most[0] = max(most[0], len(os.listdir(base / f"gen-{generation}")))
        settle(generation)
        proc = upgrade(site, tag, **config)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    settle(4)
    assert recycles >= 100 and sent > 0, (sent, recycles)   # and the app counted every request sent (settle)
    # Bounded by the exits of one tool's run (about 0.3 s of recycles here), not by their number.
    assert most[0] <= 30, f"{most[0]} files in a generation's directory at most"


def app_counter(port: int, name: str = "app_hits_total") -> float | None:
    """The application's own counter (COUNTING_APP's /metrics), or None when that scrape failed:
    prometheus_client's collector lists the directory, then reads each file, and a merge that
    replaced a file in between makes it fail with a 500 (the race cadenza/tools/multiproc.py and
    the README describe). A caller polls again."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    return value(samples(body), name) if response.status == 200 else None


def http_get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


def test_a_failed_upgrade_s_directory_is_set_aside_before_its_failure_is_answered(site):
    """A retry of the upgrade takes the same generation number, and starts gen-N afresh: the fold
    of the failed attempt's gen-N must not be still to run in the same directory by then."""
    config = dict(extra="multiprocess = true\n", app_text=COUNTING_APP, app="countapp:app")
    site.start(**config)
    base = site.socket.parent / "metrics"
    for _ in range(3):
        http_get(site.port, "/")
    for attempt in range(3):
        proc = upgrade(site, f"bad{attempt}", extra="multiprocess = true\n", app_text="raise SystemExit(3)\n",
                       app="countapp:app")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "gen-2" not in os.listdir(base), os.listdir(base)
    proc = upgrade(site, "good", **config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait(lambda: sorted(os.listdir(base)) == ["gen-2"], timeout=20, what=f"gen-2 alone in {base}")
    wait(lambda: app_counter(site.port) == 3, what="the 3 requests counted")
