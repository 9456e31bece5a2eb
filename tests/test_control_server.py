"""The control server (control/server.py) on a real daemon Loop and a real unix socket, driven by
real client sockets; and supervisorctl against sockets that fail it in every way. The loop runs
in a thread of its own; a test touches the server only through LoopThread.call, which runs a
function in that thread."""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import queue
import resource
import select
import shutil
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cadenza.control import server as S
from cadenza.control.socketfile import bind_socket
from cadenza.control.protocol import DENIED, OK, UNREACHABLE, USAGE
from cadenza.daemon.loop import Loop
from cadenza.tools import supervisorctl as ctl_tool

NOBODY = pwd.getpwnam("nobody")
# A supplementary group of the readers, so that SO_PEERGROUPS (not the primary gid) decides.
READERS = next(g for g in grp.getgrall() if g.gr_gid not in (0, NOBODY.pw_gid) and not g.gr_mem)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: other users' clients are setuid() children")


class LoopThread:
    def __init__(self, loop: Loop):
        self.loop = loop
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        loop.add_reader(self._r, self._run_calls)
        self.thread = threading.Thread(target=loop.run, name="control-loop", daemon=True)
        self.thread.start()

    def _run_calls(self) -> None:
        self._r.recv(4096)
        while not self._calls.empty():
            fn, box, ran = self._calls.get()
            try:
                box.append(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append(exc)
            ran.set()

    def call(self, fn):
        """fn() run in the loop's thread, between two events; its result."""
        box, ran = [], threading.Event()
        self._calls.put((fn, box, ran))
        self._w.send(b".")
        assert ran.wait(10), "the loop ran no call within 10s: it is stuck in a handler"
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def cpu(self) -> float:
        """CPU seconds the loop's thread has used."""
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def stop(self) -> None:
        self.call(lambda: setattr(self.loop, "stopped", True))
        self.thread.join(10)
        assert not self.thread.is_alive(), "the loop thread did not end"
        self._r.close()
        self._w.close()


class LogWatch(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def emit(self, record) -> None:
        with self._cond:
            self.lines.append(record.getMessage())
            self._cond.notify_all()

    def wait(self, text: str, times: int = 1, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: sum(text in ln for ln in self.lines) >= times, timeout), \
                f"the server did not log {text!r} {times} time(s) within {timeout}s; it logged {self.lines}"


class Harness:
    """A ControlServer whose `upgrade` runs until the test ends it; `status` answers at once."""

    def __init__(self, path: Path, status_groups=()):
        self.path = path
        self.started: queue.SimpleQueue = queue.SimpleQueue()
        self.loop = Loop()
        self.sock = bind_socket(path)
        os.chmod(path, 0o666)   # past the file mode, SO_PEERCRED decides
        self.server = S.ControlServer(self.loop, self.sock, S.Access(status_groups=status_groups), self._command)
        self.lt = LoopThread(self.loop)

    def _command(self, client, cmd: str, request: dict) -> None:
        if cmd == "status":
            client.finish(OK, status={"app": "test"})
        elif cmd == "metrics":     # as long as the text of some 1,500 workers' series
            client.finish(OK, metrics="cadenza_http_requests_total 1\n" * 100_000)
        else:
            self.started.put(client)

    def next_started(self):
        try:
            return self.started.get(timeout=10)
        except queue.Empty:
            raise AssertionError("no request reached on_command within 10s") from None

    def close(self) -> None:
        self.lt.call(self.server.close)
        self.lt.stop()
        self.loop.close()
        self.sock.close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setattr(S, "REQUEST_TIMEOUT", 60.0)   # idle clients stay for the whole test
    socket_dir = Path(tempfile.mkdtemp(prefix="cadenza-ctl-", dir="/var/tmp"))
    os.chmod(socket_dir, 0o755)   # nobody must reach the socket
    watch = LogWatch()
    logging.getLogger("cadenza.control").addHandler(watch)
    made = []

    def make(**kw) -> Harness:
        h = Harness(socket_dir / "control.sock", **kw)
        h.log = watch
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()
    logging.getLogger("cadenza.control").removeHandler(watch)
    shutil.rmtree(socket_dir, ignore_errors=True)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> list[dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def ask(path: Path, request: bytes) -> list[dict]:
    with connect(path) as s:
        s.sendall(request)
        return read_all(s)


@contextmanager
def connections_of_nobody(path: Path, n: int, groups=()):
    """n connections made by a child that became nobody (so SO_PEERCRED says 65534), handed
    to the test with SCM_RIGHTS. The child needs nothing from the checkout after setuid()."""
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            os.setgroups(list(groups))
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            conns = []
            for _ in range(n):
                conns.append(socket.socket(socket.AF_UNIX))
                conns[-1].connect(str(path))
            socket.send_fds(theirs, [b"ok"], [c.fileno() for c in conns])
            theirs.recv(1)   # until the test is done with them
        except BaseException as exc:  # noqa: BLE001 - the child must always end here
            theirs.sendall(f"child as nobody: {exc!r}".encode())
            code = 1
        os._exit(code)
    theirs.close()
    try:
        ours.settimeout(30)
        msg, fds, _, _ = socket.recv_fds(ours, 4096, n)
        assert msg == b"ok", msg.decode()
        conns = [socket.socket(fileno=fd) for fd in fds]
        for c in conns:
            c.settimeout(10)
        yield conns
        for c in conns:
            c.close()
    finally:
        ours.close()
        os.waitpid(pid, 0)


def cpu_share(cpu_of, least: float = 0.3, most: float = 30.0) -> float:
    """How much CPU `cpu_of()` (seconds) gained while this thread spun for `least` CPU seconds,
    as a fraction of those: near 1 for a loop that spins too, near 0 for one that waits. Measured
    against a spinner rather than the clock, so that a loaded machine cannot hide a spin."""
    before, mine, started = cpu_of(), time.thread_time(), time.monotonic()
    while time.thread_time() - mine < least:
        assert time.monotonic() - started < most, f"this test got under {least}s CPU in {most}s: too loaded to measure"
    return (cpu_of() - before) / (time.thread_time() - mine)


def test_half_closed_and_closed_clients_cost_no_cpu_and_get_their_answer(serve):
    h = serve()
    half = connect(h.path)
    half.sendall(b'{"cmd": "upgrade"}\n')
    half.shutdown(socket.SHUT_WR)            # nc -N
    first = h.next_started()
    gone = connect(h.path)
    gone.sendall(b'{"cmd": "restart"}\n')
    gone.close()                             # Ctrl-C during `supervisorctl upgrade`
    second = h.next_started()

    share = cpu_share(h.lt.cpu)
    assert share < 0.1, f"the control loop used {share:.0%} of the CPU a spinning thread gets, with a " \
                        "half-closed and a closed client waiting: it spins"

    h.lt.call(lambda: (first.send({"event": "progress", "text": "half-way"}), first.finish(OK, "upgraded")))
    events = read_all(half)
    assert [e.get("text") for e in events] == ["half-way", "upgraded"] and events[-1]["code"] == OK
    h.lt.call(lambda: second.send({"event": "progress", "text": "nobody hears this"}))
    assert h.lt.call(lambda: second.closed), "a client that closed was kept after a write to it failed"
    assert h.lt.call(lambda: len(h.server.clients)) == 0
    half.close()


def test_clients_that_hung_up_while_their_command_ran_give_their_slots_to_the_next(serve):
    # Operators who gave up on a command that had not answered (Ctrl-C, `timeout 5 supervisorctl`)
    # must not fill the slots kept for the next reload; a half-closed one still waits for its answer.
    h = serve()
    half = connect(h.path)
    half.sendall(b'{"cmd": "upgrade"}\n')
    half.shutdown(socket.SHUT_WR)
    waiting = h.next_started()
    for _ in range(S.MAX_CLIENTS - 1):
        with connect(h.path) as gone:
            gone.sendall(b'{"cmd": "restart"}\n')
            h.next_started()
    assert h.lt.call(lambda: h.server.count(S.FULL)) == S.MAX_CLIENTS    # nothing woke the loop for them
    assert ask(h.path, b'{"cmd": "status"}\n')[-1]["code"] == OK
    assert h.lt.call(lambda: h.server.count(S.FULL)) == 1
    h.lt.call(lambda: waiting.finish(OK, "upgraded"))
    assert read_all(half)[-1]["code"] == OK
    half.close()


@as_root
def test_unauthorised_peers_are_denied_at_once_and_hold_no_slot(serve):
    h = serve()
    with connections_of_nobody(h.path, S.MAX_CLIENTS + 6) as conns:
        for c in conns:                       # denied without having sent a byte
            answer = read_all(c)
            assert len(answer) == 1 and answer[0]["code"] == DENIED, answer
            assert "permission denied: uid 65534 may not use this control socket" in answer[0]["text"]
        assert h.lt.call(lambda: len(h.server.clients)) == 0
        assert ask(h.path, b'{"cmd": "status"}\n')[-1]["code"] == OK
    assert sum("denied to uid 65534" in line for line in h.log.lines) == S.REFUSAL_LOG_BURST   # the rest are counted, not flooded


@as_root
def test_read_only_peers_cannot_take_the_slots_kept_for_reloads(serve):
    h = serve(status_groups=[READERS.gr_name])
    with connections_of_nobody(h.path, S.MAX_READERS + 4, groups=[READERS.gr_gid]) as readers:
        for c in readers[S.MAX_READERS:]:
            answer = read_all(c)
            assert answer[-1]["code"] == UNREACHABLE and "read-only control connections open" in answer[-1]["text"]
        assert h.lt.call(lambda: h.server.count(S.READER)) == S.MAX_READERS

        idle = [connect(h.path) for _ in range(S.MAX_CLIENTS - 1)]   # root may still fill every slot
        upgrade = connect(h.path)
        upgrade.sendall(b'{"cmd": "upgrade"}\n')
        client = h.next_started()
        assert client.uid == 0 and client.rank == S.FULL
        h.lt.call(lambda: client.finish(OK, "upgraded"))
        assert read_all(upgrade)[-1]["code"] == OK
        idle.append(connect(h.path))         # the 64th
        over = connect(h.path)
        assert read_all(over)[-1]["code"] == UNREACHABLE   # the 65th: root's own cap holds too

        readers[0].sendall(b'{"cmd": "status"}\n')
        assert read_all(readers[0])[-1]["code"] == OK
        readers[1].sendall(b'{"cmd": "upgrade"}\n')
        answer = read_all(readers[1])[-1]
        assert answer["code"] == DENIED and "uid 65534 may not upgrade" in answer["text"]
        h.log.wait("upgrade denied to uid 65534")
        for s in [*idle, upgrade, over]:
            s.close()


@pytest.mark.parametrize("data, code, text", [
    (b"not json\n", USAGE, "malformed request"),
    (b'["status"]\n', USAGE, "malformed request"),
    (b'{"cmd": "reboot"}\n', USAGE, "unknown command 'reboot'"),
    (b'{"cmd": "status"}\n{"cmd": "stop"}\n', OK, ""),     # one request per connection
])
def test_bad_requests_get_an_error(serve, data, code, text):
    h = serve()
    answer = ask(h.path, data)
    assert len(answer) == 1 and answer[0]["code"] == code and text in answer[0]["text"]
    assert h.lt.call(lambda: len(h.server.clients)) == 0


def test_oversized_silent_and_stalled_clients_are_dropped(serve, monkeypatch):
    h = serve()
    big = connect(h.path)
    try:
        big.sendall(b"x" * (S.MAX_REQUEST + 1))
        assert "longer than" in read_all(big)[0]["text"]
    except (ConnectionResetError, BrokenPipeError):
        pass   # dropped with our bytes unread, which resets the connection
    big.close()

    monkeypatch.setattr(S, "REQUEST_TIMEOUT", 0.2)
    with connect(h.path) as silent:
        assert "no request within 0.2s" in read_all(silent)[0]["text"]

    monkeypatch.setattr(S, "STALL_TIMEOUT", 0.3)
    with connect(h.path) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b'{"cmd": "upgrade"}\n')
        client = h.next_started()
        h.lt.call(lambda: [client.send({"event": "progress", "text": "x" * 1000}) for _ in range(500)])
        assert h.lt.call(lambda: bool(client.outbuf)), "the socket took 500 kB: the test sends too little"
        h.log.wait("read nothing for 0.3s; dropped")
        assert h.lt.call(lambda: client.closed and len(h.server.clients) == 0)


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(serve, monkeypatch):
    monkeypatch.setattr(S, "ACCEPT_PAUSE", 0.5)
    h = serve()
    waiting = [socket.socket(socket.AF_UNIX) for _ in range(2)]
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))   # every new fd: EMFILE
    try:
        for s in waiting:
            s.settimeout(10)
            s.connect(str(h.path))          # queued in the kernel; accept() cannot take them
        h.log.wait("control socket: out of file descriptors")
        before, started = h.lt.cpu(), time.monotonic()
        h.log.wait("control socket: out of file descriptors", times=3)   # paced by the pause
        used, elapsed = h.lt.cpu() - before, time.monotonic() - started
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert elapsed >= 0.9 and used < 0.1 * elapsed, f"{used:.2f}s CPU in {elapsed:.2f}s: spinning on accept"
    for s in waiting:                       # served once fds are free again
        s.sendall(b'{"cmd": "status"}\n')
        assert read_all(s)[-1]["code"] == OK
        s.close()


# ---- supervisorctl when the master cannot be reached (no master needed) -------------------

def _bound(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))   # alone, a file with nothing listening: what a master killed with SIGKILL leaves
    return s


def _full_backlog(path: Path) -> list:
    queued = [_bound(path)]
    queued[0].listen(0)
    for _ in range(100):   # a master that accepts nothing
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        queued.append(c)
        try:
            c.connect(str(path))
        except BlockingIOError:
            return queued
    raise AssertionError("100 connections queued on a listen(0) socket: the kernel does not cap its backlog")


def _master(behave):
    """A fake master that accepts one connection and does `behave` with it."""
    def setup(path: Path) -> list:
        s = _bound(path)
        s.listen(1)

        def serve() -> None:
            conn, _ = s.accept()
            with conn:
                conn.settimeout(10)
                behave(conn)
        threading.Thread(target=serve, daemon=True).start()
        return [s]
    return setup


def _reset(conn) -> None:
    select.select([conn], [], [], 10)   # the request is there; closing with it unread resets


@pytest.mark.parametrize("setup, code, why", [
    (lambda path: [], 3, "no control socket at"),
    (lambda path: [_bound(path)], 3, "nothing listens on"),
    (_full_backlog, 3, "queue of connections stayed full for 0.3s"),
    (_master(lambda c: c.recv(4096)), 3, "before its final answer (end of file)"),
    (_master(lambda c: (c.recv(4096), c.sendall(b'{"event": "progr'))), 3, "end of file in the middle"),
    (_master(_reset), 3, "before its final answer (Connection reset by peer)"),
    (_master(lambda c: None), 3, "before its final answer"),   # EPIPE on our request, or a reset
    (_master(lambda c: (c.recv(4096), c.sendall(b"<html>\n"))), 3, "not cadenza's control protocol"),
    (_master(lambda c: c.sendall(b'{"done": true, "ok": false, "code": 4, "text": "permission denied: x"}\n')),
     4, "permission denied: x"),   # refused at accept, possibly before our request is sent
], ids=["ENOENT", "ECONNREFUSED", "EAGAIN", "EOF", "EOF-mid-line", "ECONNRESET", "EPIPE", "garbage",
        "denied-early"])
def test_supervisorctl_turns_every_connection_error_into_one_line(tmp_path, capsys, monkeypatch, setup, code, why):
    monkeypatch.setattr(ctl_tool, "CONNECT_TIMEOUT", 0.3)
    path = tmp_path / "control.sock"
    held = setup(path)
    term = signal.getsignal(signal.SIGTERM)
    try:
        got = ctl_tool.main(["-s", str(path), "upgrade"])
    finally:
        signal.signal(signal.SIGTERM, term)
        for s in held:
            s.close()
    err = capsys.readouterr().err
    assert got == code and why in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err or code == 4


def test_a_final_answer_over_the_pending_limit_is_sent_whole(serve, capfd):
    """The streamed lines of a client that reads nothing are bounded (MAX_PENDING); one final answer
    longer than that (`supervisorctl metrics` of many workers) is not a reason to drop the client."""
    h = serve()
    assert ctl_tool.main(["-s", str(h.path), "metrics"]) == 0
    out = capfd.readouterr().out
    assert len(out) > S.MAX_PENDING and out.count("cadenza_http_requests_total 1\n") == 100_000
    assert not any("reads nothing" in line for line in h.log.lines), h.log.lines
