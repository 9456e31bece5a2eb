"""Real frameworks served by cadenza under a real systemd 252 (tests/sdns.py), each deployed the
Capistrano way (tests/deploy.py) and upgraded with `systemctl reload` while clients count every
request they send: Django and Flask (WSGI) and FastAPI (ASGI) on the built-in worker, gunicorn
and Node.js as command workers. The applications live in tests/frameworks/; each answers with the
name of the release it was loaded from.

One systemd serves the whole module; each test runs its own app (unit, root and port).
Pids: systemd reports the namespace's pids; /proc on the host is read through the unit's cgroup.
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import sdns
import tally
from deploy import AppRoot
from handover_fixtures import CLIENTS, poll, slow_request, title
from procs import alive, free_port

FRAMEWORKS = Path(__file__).resolve().parent / "frameworks"
SERIAL = itertools.count(1)   # the module's systemd keeps running: each app gets names of its own
BIG = bytes(range(256)) * 4096   # what the Django app's /big answers: 1 MiB
GUNICORN = "#!{python}\nimport sys\nfrom gunicorn.app.wsgiapp import run\nsys.exit(run())\n"


@pytest.fixture(scope="module")
def ns(_sdns_session):
    """One booted systemd for every test of this module."""
    with sdns.SystemdNS(net="host") as booted:
        yield booted


class Site(AppRoot):
    """An app root whose releases hold tests/frameworks/FIXTURE, served by NAME-N.socket and
    NAME-N.service, N unique in the module."""

    def __init__(self, ns, name: str, fixture: str | None):
        # Generous bounds, only reached when something hangs: a loaded 2-core machine takes
        # seconds to import a framework in each of a generation's workers at once.
        super().__init__(ns.state, f"{name}-{next(SERIAL)}", free_port(), ready_timeout=60,
                         upgrade_timeout=90)
        self.ns, self.fixture, self.unit = ns, fixture, f"{self.name}.service"

    def release(self, tag: str, **kw) -> Path:
        rel = super().release(tag, **kw)
        if self.fixture:
            shutil.copytree(FRAMEWORKS / self.fixture, rel, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        return rel

    def start(self) -> None:
        self.pin()
        for name, text in self.units().items():
            self.ns.write_unit(name, text)
        self.ns.systemctl("daemon-reload", check=True)
        started = self.ns.systemctl("start", f"{self.name}.socket", self.unit)
        assert started.returncode == 0, f"{started.stderr}\n{self.journal()}"

    def stop(self) -> None:
        self.ns.systemctl("stop", f"{self.name}.socket", self.unit)

    def reload(self) -> None:
        done = self.ns.systemctl("reload", self.unit, timeout=180)
        assert done.returncode == 0, f"systemctl reload {self.unit}: {done.stderr}\n{self.journal()}"

    def reload_in_background(self) -> subprocess.Popen:
        return self.ns.popen("systemctl", "reload", self.unit, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)

    def journal(self, lines: int = 60) -> str:
        return "--- journal ---\n" + self.ns.journal("-o", "cat", "-u", self.unit, "-n", str(lines))

    def procs(self) -> dict[int, str]:
        """{host pid: title} of every live process in the unit's cgroup."""
        cgroup = self.ns.show(self.unit, "ControlGroup")["ControlGroup"]   # "" once stopped
        try:
            pids = (self.ns.cgroup / cgroup.lstrip("/") / "cgroup.procs").read_text().split() if cgroup else []
        except OSError:   # the unit's cgroup is going
            return {}
        return {int(pid): title(int(pid)) for pid in pids if alive(int(pid))}

    def worker_pids(self, generation: int) -> set[int]:
        """Pids, as the namespace (and the application) sees them, of a generation's workers."""
        found = set()
        for pid, name in self.procs().items():
            if name.startswith("cadenza worker ") and f" gen {generation} [{self.name}]" in name:
                with contextlib.suppress(OSError, IndexError):   # it exited while we looked
                    nspids = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0]
                    found.add(int(nspids.split()[-1]))
        return found


@pytest.fixture
def new_site(ns):
    """new_site(name, fixture): a Site, stopped (socket and service) when the test ends."""
    made: list[Site] = []

    def make(name: str, fixture: str | None) -> Site:
        made.append(Site(ns, name, fixture))
        return made[-1]

    yield make
    for site in made:
        site.stop()


@pytest.fixture
def make_site(new_site):
    """make_site(name, fixture, **workers): a Site serving release r1, started."""
    def make(name: str, fixture: str, **workers) -> Site:
        site = new_site(name, fixture)
        site.deploy("r1", **workers)
        site.start()
        return site
    return make


# ---- HTTP clients ---------------------------------------------------------------------------

class Answer:
    def __init__(self, resp: http.client.HTTPResponse):
        self.status, self.headers, self.body = resp.status, resp.msg, resp.read()

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def release(self) -> str:
        """Which release answered: X-Release, or the start of a "release TAG pid PID" body."""
        tag = self.headers.get("X-Release")
        if tag:
            return tag
        match = re.match(r"release (\S+) ", self.text)
        if not match:
            raise AssertionError(f"no release in the answer: HTTP {self.status} {self.text[:200]!r}")
        return match.group(1)


def fetch(port: int, path: str = "/", method: str = "GET", body: bytes | str | None = None,
          headers: dict[str, str] | None = None, timeout: float = 15,
          conn: http.client.HTTPConnection | None = None) -> Answer:
    """One request, on a new connection unless `conn` is given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Answer(conn.getresponse())
    except Exception:
        conn.close()   # a keep-alive connection starts afresh after a failure
        raise
    finally:
        if own:
            conn.close()


def ok(answer: Answer, what: str) -> Answer:
    if answer.status != 200:
        raise AssertionError(f"{what}: HTTP {answer.status} {answer.text[:300]!r}")
    return answer


def plain_get(port: int, path: str = "/"):
    """A client step: GET on a new connection."""
    def step(count) -> str:
        count()
        return ok(fetch(port, path), f"GET {path}").release
    return step


def keepalive_get(port: int, path: str = "/"):
    """A client step: GET on one keep-alive connection (http.client reconnects after a close)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)

    def step(count) -> str:
        count()
        return ok(fetch(port, path, conn=conn), f"keep-alive GET {path}").release
    return step


class Load:
    """One client per step, each repeating its step until stop(). A step makes one or more
    requests, calling count() before each; every request sent is counted, and a step that
    raises loses one request, whose reason is kept. Each answered step records (time, release)."""

    def __init__(self, **steps):
        self.sent = self.answered = 0
        self.lost: list[str] = []
        self.answers: list[tuple[float, str]] = []
        self._lock, self._done = threading.Lock(), threading.Event()
        self._clients = [CLIENTS.submit(self._run, name, step) for name, step in steps.items()]
        poll(lambda: len(self.answers) >= 2 * len(steps) or self.lost, what="first answers of the load")

    def _run(self, name: str, step) -> None:
        while not self._done.wait(0.005):   # only pacing, so that the masters get CPU
            made = [0]

            def count() -> None:
                made[0] += 1
            try:
                release = step(count)
            except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                with self._lock:
                    self.sent += made[0]
                    self.answered += made[0] - 1
                    self.lost.append(f"{name} at {time.strftime('%T')}: {exc!r}")
                continue
            with self._lock:
                self.sent += made[0]
                self.answered += made[0]
                self.answers.append((time.monotonic(), release))

    def stop(self) -> "Load":
        if not self._done.is_set():
            self._done.set()
            for client in self._clients:
                client.result(timeout=60)
            tally.add(self.answered, self.sent - self.answered)
        return self

    def releases(self) -> collections.Counter:
        return collections.Counter(release for _, release in self.answers)

    def check(self, releases: set[str]) -> None:
        """Nothing lost, and the clients were answered by exactly `releases`."""
        self.stop()
        summary = f"sent {self.sent}, answered {self.answered}, lost {self.sent - self.answered}"
        assert not self.lost and self.sent == self.answered, f"{summary}: {self.lost[:10]}"
        assert set(self.releases()) == releases, f"{summary}; answered by {dict(self.releases())}"


@pytest.fixture
def loads():
    """Loads started by the test are stopped even when it fails."""
    started: list[Load] = []

    def start(**steps) -> Load:
        started.append(Load(**steps))
        return started[-1]

    yield start
    for load in started:
        load.stop()


# ---- Django (WSGI) --------------------------------------------------------------------------

DJANGO = dict(app="proj.wsgi:application", count=2, graceful_timeout=5,
              config_extra='[workers.env]\nDJANGO_SETTINGS_MODULE = "proj.settings"\n')


def csrf_post(port: int, value: str, count=lambda: None) -> Answer:
    """GET the form, then POST it back with the csrftoken cookie and the hidden field."""
    count()
    form = ok(fetch(port, "/form"), "GET /form")
    cookies = SimpleCookie()
    for header in form.headers.get_all("Set-Cookie") or ():
        cookies.load(header)
    if "csrftoken" not in cookies:
        raise AssertionError(f"GET /form set no csrftoken cookie: {form.headers.get_all('Set-Cookie')}")
    field = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    if not field:
        raise AssertionError(f"GET /form: no csrfmiddlewaretoken field in {form.text!r}")
    count()
    return fetch(port, "/form", "POST", urllib.parse.urlencode({"csrfmiddlewaretoken": field.group(1), "value": value}),
                 {"Content-Type": "application/x-www-form-urlencoded",
                  "Cookie": f"csrftoken={cookies['csrftoken'].value}"})


def django_steps(port: int) -> dict:
    def form(count) -> str:
        answer = ok(csrf_post(port, "hello form", count), "POST /form")
        if answer.text != "echo hello form\n":
            raise AssertionError(f"POST /form echoed {answer.text!r}")
        return answer.release

    def stream(count) -> str:
        count()
        answer = ok(fetch(port, "/stream?n=8"), "GET /stream")
        if answer.text != "".join(f"chunk {i}\n" for i in range(8)):
            raise AssertionError(f"GET /stream: {answer.text!r}")
        return answer.release

    def big(count) -> str:
        count()
        answer = ok(fetch(port, "/big"), "GET /big")
        if answer.body != BIG:
            raise AssertionError(f"GET /big: {len(answer.body)} bytes, not the 1 MiB sent")
        return answer.release

    return dict(form=form, stream=stream, big=big, index=keepalive_get(port))


def test_django_csrf_form_streaming_and_a_1mb_response(make_site):
    site = make_site("django", "django", **DJANGO)
    port = site.port
    # CSRF: the form's token and cookie let the POST through; without them Django refuses it.
    posted = csrf_post(port, "grüße & <tags>")
    assert (posted.status, posted.text) == (200, "echo grüße & <tags>\n"), (posted.status, posted.text)
    refused = fetch(port, "/form", "POST", "value=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert refused.status == 403, (refused.status, refused.text[:300])
    # Streaming: the first chunk arrives while the view still waits for the gate, the rest after it.
    gate = site.root / "run" / "stream-gate"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", f"/stream?n=6&gate={gate}")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") is None, resp.getheaders()
    assert resp.readline() == b"chunk 0\n"
    gate.touch()
    assert resp.read() == b"".join(f"chunk {i}\n".encode() for i in range(1, 6))
    conn.close()
    # 1 MiB, byte for byte.
    big = fetch(port, "/big")
    assert (big.status, big.release) == (200, "r1"), (big.status, big.text[:300])
    assert big.body == BIG, f"{len(big.body)} bytes; first difference at " \
                            f"{next((i for i, (a, b) in enumerate(zip(big.body, BIG)) if a != b), None)}"


def test_django_reload_under_a_client_loop_loses_nothing(make_site, loads):
    site = make_site("django", "django", **DJANGO)
    load = loads(**django_steps(site.port))
    site.deploy("r2", **DJANGO)
    site.reload()
    # `systemctl reload` returned: the old generation is gone, the next answer is the new release's.
    assert ok(fetch(site.port), "GET /").release == "r2"
    poll(lambda: load.releases()["r2"] >= 8, what="answers from r2")
    load.check({"r1", "r2"})


# ---- Flask (WSGI) ---------------------------------------------------------------------------

FLASK = dict(app="app:app", count=2, graceful_timeout=10)


def test_flask_5s_request_started_before_the_reload_completes(make_site, loads):
    site = make_site("flask", "flask", **FLASK)
    site.deploy("r2", **FLASK)
    load = loads(new=plain_get(site.port), keepalive=keepalive_get(site.port))
    sent = time.monotonic()
    slow = slow_request(site.port, 5)   # accepted by a worker of generation 1
    started = time.monotonic()
    site.reload()
    reloaded = time.monotonic()
    answer = slow.result(timeout=30)
    assert answer["status"] == 200, answer
    head = answer["body"].split("\n", 1)[0]
    assert head.startswith("release r1 ") and head.endswith(" slept 5s"), head
    assert len(answer["body"]) == 256 * 1024 and answer["body"].endswith("end\n"), len(answer["body"])
    # The reload waited for it (the old generation drained), and the clients were answered meanwhile.
    assert sent + 5 <= answer["at"] <= reloaded, (sent, answer["at"], reloaded)
    during = collections.Counter(r for at, r in load.answers if started < at < answer["at"])
    assert sum(during.values()) >= 20, f"clients answered while r1 held the slow request: {dict(during)}"
    assert ok(fetch(site.port), "GET /").release == "r2"
    load.check({"r1", "r2"})


# ---- FastAPI (ASGI) -------------------------------------------------------------------------

FASTAPI = dict(app="app:app", count=2, graceful_timeout=5)


def test_fastapi_lifespan_state_reaches_the_routes(make_site):
    site = make_site("fastapi", "fastapi", **FASTAPI)
    state = fetch(site.port, "/state")
    assert state.status == 200 and re.fullmatch(r"started r1 \d+\n", state.text), \
        f"HTTP {state.status} {state.text[:300]!r}\n{site.journal(30)}"
    site.deploy("r2", **FASTAPI)
    site.reload()
    state = fetch(site.port, "/state")
    assert state.status == 200 and re.fullmatch(r"started r2 \d+\n", state.text), (state.status, state.text)


def test_fastapi_shutdown_hook_runs_when_the_old_generation_drains(make_site, loads):
    site = make_site("fastapi", "fastapi", **FASTAPI)
    load = loads(new=plain_get(site.port), keepalive=keepalive_get(site.port))
    workers = poll(lambda: len(found := site.worker_pids(1)) == FASTAPI["count"] and found,
                   what="generation 1's workers")
    site.deploy("r2", **FASTAPI)
    site.reload()
    # `systemctl reload` returned: generation 1 left, each of its workers through the shutdown hook.
    run = site.root / "run"
    markers = {int(p.name.rsplit("-", 1)[1]): p.read_text() for p in run.glob("shutdown-*")}
    assert markers == {pid: f"started r1 {pid}\n" for pid in workers}, \
        f"shutdown markers {sorted(p.name for p in run.glob('shutdown-*'))}, generation 1's workers " \
        f"{sorted(workers)}\n{site.journal(40)}"
    assert ok(fetch(site.port), "GET /").release == "r2"
    load.check({"r1", "r2"})


def test_fastapi_websocket_is_closed_with_a_close_frame_on_drain(make_site, loads):
    site = make_site("fastapi", "fastapi", **FASTAPI)
    url = f"ws://127.0.0.1:{site.port}/ws"
    load = loads(new=plain_get(site.port))
    with connect(url, open_timeout=10, close_timeout=5, proxy=None) as ws:
        assert ws.recv(timeout=10).startswith("release r1 pid ")
        ws.send("ping")
        assert ws.recv(timeout=10) == "ping"
        site.deploy("r2", **FASTAPI)
        reload = site.reload_in_background()
        try:
            got = ws.recv(timeout=120)   # the close comes once generation 2 is ready
        except ConnectionClosed as exc:
            closed = exc
        else:
            pytest.fail(f"the WebSocket received {got!r} instead of being closed on drain")
        output, _ = reload.communicate(timeout=180)
        assert reload.returncode == 0, f"{output}\n{site.journal()}"
    # A close frame with "service restart" (1012) or "going away" (1001), not a reset or a bare EOF.
    assert closed.rcvd is not None and closed.rcvd.code in (1012, 1001), f"{closed!r}\n{site.journal(30)}"
    with connect(url, open_timeout=10, close_timeout=5, proxy=None) as ws:
        assert ws.recv(timeout=10).startswith("release r2 pid ")
        ws.send("pong")
        assert ws.recv(timeout=10) == "pong"
    load.check({"r1", "r2"})


# ---- gunicorn as a command worker -----------------------------------------------------------

def gunicorn_release(site: Site, tag: str, graceful_timeout: float = 5, gunicorn_graceful: float = 3) -> Path:
    """Release TAG (the plain WSGI app of tests/deploy.py), served by the gunicorn of its own venv,
    as `pip install gunicorn` would have put it there.

    gunicorn takes its listener from LISTEN_FDS/LISTEN_PID (sd_listen_fds), which cadenza sets
    for each worker as systemd would: no --bind. `--bind fd://3` on top of that makes gunicorn 27
    adopt fd 3 twice; the first adoption closes it and the second fails with EBADF."""
    launcher = site.path(tag) / ".venv" / "bin" / "gunicorn"
    command = [str(launcher), "--workers", "2", "--graceful-timeout", f"{gunicorn_graceful:g}",
               "--name", f"{site.name}-{tag}", "app:app"]
    rel = site.release(tag, command=command, count=1, graceful_timeout=graceful_timeout, ready="notify")
    launcher.write_text(GUNICORN.format(python=rel / ".venv" / "bin" / "python"))
    launcher.chmod(0o755)
    site.switch(tag)
    return rel


def gunicorn_procs(site: Site, tag: str) -> dict[int, str]:
    return {pid: t for pid, t in site.procs().items()
            if t.startswith("gunicorn: ") and t.endswith(f"[{site.name}-{tag}]")}


def test_gunicorn_command_worker_upgrade_under_load_leaves_no_old_gunicorn(new_site, loads):
    site = new_site("gunicorn", None)
    gunicorn_release(site, "r1")
    site.start()
    assert ok(fetch(site.port), "GET /").release == "r1", site.journal()
    old = poll(lambda: len(found := gunicorn_procs(site, "r1")) == 3 and found,
               what="gunicorn's arbiter and its 2 workers")
    load = loads(new=plain_get(site.port), keepalive=keepalive_get(site.port))
    gunicorn_release(site, "r2")
    site.reload()
    assert ok(fetch(site.port), "GET /").release == "r2"
    # Generation 1 left: none of its gunicorn processes is alive, in the unit or anywhere.
    left = {pid: t for pid, t in old.items() if alive(pid)}
    assert not left, f"gunicorn processes of r1 still alive: {left}\nunit: {site.procs()}\n{site.journal()}"
    assert not [t for t in site.procs().values() if t.endswith("-r1]")], site.procs()
    new = gunicorn_procs(site, "r2")
    assert sorted(t.split(" [")[0] for t in new.values()) == \
        ["gunicorn: master", "gunicorn: worker", "gunicorn: worker"], site.procs()
    poll(lambda: load.releases()["r2"] >= 8, what="answers from r2")
    load.check({"r1", "r2"})


def test_gunicorn_that_outlives_graceful_timeout_is_killed_with_all_its_workers(new_site):
    """gunicorn would wait 30 s for a request; cadenza's graceful_timeout is 2 s. The SIGKILL
    that ends the arbiter then must end its workers too (the worker's process group), or the one
    holding the request would keep serving r1 from outside any generation."""
    site = new_site("gunicorn", None)
    gunicorn_release(site, "r1", graceful_timeout=2, gunicorn_graceful=30)
    site.start()
    old = poll(lambda: len(found := gunicorn_procs(site, "r1")) == 3 and found,
               what="gunicorn's arbiter and its 2 workers")
    slow = slow_request(site.port, 20)   # held by a gunicorn worker of r1
    gunicorn_release(site, "r2")
    site.reload()
    left = {pid: t for pid, t in old.items() if alive(pid)}
    assert not left, f"gunicorn processes of r1 still alive after the reload: {left}\n{site.journal()}"
    try:
        answered = slow.result(timeout=30)
    except (OSError, http.client.HTTPException) as exc:   # cut: it ran past graceful_timeout
        answered = repr(exc)
    assert not isinstance(answered, dict), f"the request was answered by a worker cadenza had killed: {answered}"
    assert "still running after 2s; killing it" in site.journal(200), site.journal()
    assert ok(fetch(site.port), "GET /").release == "r2"


# ---- Node.js as a command worker ------------------------------------------------------------

NODE = dict(command=["node", "server.js"], ready="uptime:1s", count=2, graceful_timeout=5)


def test_node_command_worker_upgrade_under_load_loses_nothing(make_site, loads):
    site = make_site("node", "node", **NODE)
    assert ok(fetch(site.port), "GET /").release == "r1", site.journal()
    old = {pid for pid, t in site.procs().items() if t == "node server.js"}
    assert len(old) == NODE["count"], site.procs()
    load = loads(new=plain_get(site.port), keepalive=keepalive_get(site.port), keepalive2=keepalive_get(site.port))
    site.deploy("r2", **NODE)
    site.reload()
    assert ok(fetch(site.port), "GET /").release == "r2"
    assert not [pid for pid in old if alive(pid)], site.procs()
    poll(lambda: load.releases()["r2"] >= 8, what="answers from r2")
    load.check({"r1", "r2"})
