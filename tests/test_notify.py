"""NotifyInbox against a real local flood: real sockets, a real other user (nobody, 65534).

An abstract AF_UNIX socket has no permissions, so any local user can send to a generation's
NOTIFY_SOCKET. The inbox must read at most BATCH datagrams per wakeup, drop (unparsed) whatever
another user sent, log that at most once a minute, and keep the master's memory flat.

The flood scenarios run in a forked child inside a network namespace of its own (abstract
sockets are per network namespace), with net.unix.max_dgram_qlen at 512 as systemd sets it, so
that more datagrams than one batch can be queued at once (the kernel's default is 10). These
tests need root: they setuid() to other users and unshare(CLONE_NEWNET).
"""
from __future__ import annotations

import array
import ctypes
import json
import logging
import os
import select
import selectors
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest

from cadenza import notify
from cadenza.daemon import groups
from cadenza.notify import BATCH, Notifier, NotifyInbox

NOBODY = 65534
OTHER = 65533          # a second non-root uid, for a receiver that is not root
CLONE_NEWNET = 0x40000000
QLEN = 512             # net.unix.max_dgram_qlen as systemd's sysctl.d/50-default.conf sets it
FLOOD = 100_000
STALL = 30.0           # seconds without any event before a scenario gives up

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setuid() to other users, unshare()")


# --- helpers (also imported by the RSS subprocess below) ---------------------------------------

def enter_own_netns(qlen: int = QLEN) -> None:
    """In a child: a network namespace of its own, with room for `qlen` queued datagrams."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    Path("/proc/sys/net/unix/max_dgram_qlen").write_text(str(qlen))


def fork_as(uid: int, body) -> int:
    """Fork a child that becomes `uid` (all three uids, gid likewise) and runs body()."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if uid != os.getuid():
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def flood(address: str, count: int, payload: bytes, progress_fd: int | None = None,
          progress_at: int = 0) -> None:
    """Send `count` datagrams, each waiting for room in the queue (up to STALL seconds)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(STALL)
    target = notify._sockaddr(address)
    for i in range(count):
        sock.sendto(payload, target)
        if progress_fd is not None and i + 1 == progress_at:
            os.write(progress_fd, b"p")


def wait_exit(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def readable(inbox: NotifyInbox) -> bool:
    return bool(select.select([inbox.sock], [], [], 0)[0])


def run_forked(fn, timeout: float = 300.0):
    """fn() in a forked child; its JSON result, or the child's traceback as a test failure."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = json.dumps({"result": fn()})
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
        os.write(w, out.encode())   # small enough for one write
        os._exit(0)
    os.close(w)
    chunks = []
    try:
        for _ in range(100_000):
            if not select.select([r], [], [], timeout)[0]:
                os.kill(pid, 9)
                pytest.fail(f"the scenario child gave no answer in {timeout:.0f}s")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        wait_exit(pid)
    answer = json.loads(b"".join(chunks) or b'{"error": "the child died without an answer"}')
    if "error" in answer:
        pytest.fail(answer["error"], pytrace=False)
    return answer["result"]


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


# --- the bound --------------------------------------------------------------------------------

def test_receive_reads_at_most_one_batch_per_call():
    def scenario():
        enter_own_netns()
        inbox = NotifyInbox("batch")
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        queued = 0
        for i in range(QLEN + 10):
            try:
                sender.sendto(b"STATUS=%d" % i, notify._sockaddr(inbox.address))
            except BlockingIOError:
                break
            queued += 1
        sizes, statuses = [], []
        for _ in range(QLEN):
            batch = inbox.receive()
            sizes.append(len(batch))
            statuses += [fields["STATUS"] for _, fields in batch]
            if not batch:
                break
        return {"queued": queued, "sizes": sizes, "statuses": statuses, "pid": os.getpid()}

    out = run_forked(scenario)
    assert out["queued"] > 2 * BATCH            # more than a batch really was waiting
    full, rest = divmod(out["queued"], BATCH)
    assert out["sizes"] == [BATCH] * full + ([rest] if rest else []) + [0]
    assert out["statuses"] == [str(i) for i in range(out["queued"])]    # in order, none lost


# --- a flood from another user ----------------------------------------------------------------

@pytest.mark.parametrize("rule", ["uid", "descendants"])
def test_flood_from_another_user_is_dropped_and_a_worker_still_gets_through(rule):
    # "uid": the inbox's own rule (this euid or root); "descendants": the master's (a worker and
    # its family, any uid), which looks each sender up in /proc, once per batch.
    payload = b"READY=1\nSTATUS=" + b"x" * 3000     # what a worker would say, only bigger
    workers: set[int] = set()
    sender_of = None if rule == "uid" else (lambda pid: groups.worker_of(pid, workers))

    def scenario():
        enter_own_netns()
        records = Records()
        logging.getLogger("cadenza.notify").addHandler(records)
        notify._clock = lambda: 1000.0                  # the whole flood within one minute
        inbox = NotifyInbox("flood")
        progress_r, progress_w = os.pipe()
        flooder = fork_as(NOBODY, lambda: flood(inbox.address, FLOOD, payload, progress_w, 1000))
        os.close(progress_w)
        sel = selectors.DefaultSelector()
        sel.register(inbox.sock, selectors.EVENT_READ, "inbox")
        sel.register(progress_r, selectors.EVENT_READ, "progress")
        sel.register(os.pidfd_open(flooder), selectors.EVENT_READ, flooder)
        running = {flooder}
        worker = None
        exits = {}
        got = []
        most_returned = most_read = calls = 0
        ready_at = None             # how many of the flood's had been dropped by then
        for _ in range(10 * FLOOD):
            events = sel.select(STALL)
            assert events, f"nothing happened for {STALL}s: {inbox.dropped} dropped, {got} received"
            for key, _ in events:
                if key.data == "inbox":
                    before = inbox.dropped
                    batch = inbox.receive(sender_of)
                    calls += 1
                    most_returned = max(most_returned, len(batch))
                    most_read = max(most_read, len(batch) + inbox.dropped - before)
                    got += batch
                    if batch and ready_at is None:
                        ready_at = inbox.dropped
                elif key.data == "progress":
                    # The flood is on: a worker of this generation (same uid) says it is ready.
                    sel.unregister(progress_r)
                    os.read(progress_r, 1)
                    worker = fork_as(os.getuid(), lambda: Notifier(inbox.address).send(ready=1))
                    workers.add(worker)
                    sel.register(os.pidfd_open(worker), selectors.EVENT_READ, worker)
                    running.add(worker)
                else:
                    sel.unregister(key.fileobj)
                    os.close(key.fd)
                    exits[key.data] = wait_exit(key.data)
                    running.discard(key.data)
            if not running and worker is not None and not readable(inbox):
                break
        else:
            raise AssertionError("the receive loop did not finish")
        return {"flooder": flooder, "worker": worker, "exits": exits, "got": got, "calls": calls,
                "most_returned": most_returned, "most_read": most_read, "dropped": inbox.dropped,
                "ready_at": ready_at,
                "logged": records.lines}

    out = run_forked(scenario)
    flooder, worker = out["flooder"], out["worker"]
    assert out["exits"] == {str(flooder): 0, str(worker): 0}     # every datagram was sent
    assert out["most_returned"] <= BATCH and out["most_read"] <= BATCH
    assert out["dropped"] == FLOOD                   # every one of the flood's, unparsed
    assert out["got"] == [[worker, {"READY": "1"}]]  # and the worker's READY=1 got through,
    assert out["ready_at"] < FLOOD, out["ready_at"]   # while the flood went on
    assert len(out["logged"]) == 1, out["logged"]     # one line for the minute, not 100k
    line = out["logged"][0]
    assert f"refused READY=1 from pid {flooder} (uid {NOBODY}, " in line and "dropped" in line, line


def test_drop_log_is_rate_limited_to_one_line_a_minute(monkeypatch):
    now = [5000.0]
    monkeypatch.setattr(notify, "_clock", lambda: now[0])
    records = Records()
    logger = logging.getLogger("cadenza.notify")
    logger.addHandler(records)
    inbox = NotifyInbox("ratelimit")
    try:
        def from_nobody(count: int) -> int:
            pid = fork_as(NOBODY, lambda: flood(inbox.address, count, b"WATCHDOG=1"))
            assert wait_exit(pid) == 0
            assert inbox.receive() == []
            return pid

        first = from_nobody(3)
        assert inbox.dropped == 3 and len(records.lines) == 1
        assert "dropped 3 datagram(s)" in records.lines[0]
        assert f"uid {NOBODY} pid {first}" in records.lines[0]

        now[0] += 30
        from_nobody(4)
        assert inbox.dropped == 7 and len(records.lines) == 1       # within the minute: counted only
        now[0] += 20
        assert inbox.receive() == [] and len(records.lines) == 1

        now[0] += 11                                                # a minute since the line
        third = from_nobody(2)
        assert len(records.lines) == 2
        assert "dropped 6 datagram(s)" in records.lines[1] and "(9 in all)" in records.lines[1]
        assert f"uid {NOBODY} pid {third}" in records.lines[1]

        now[0] += 600
        assert inbox.receive() == [] and len(records.lines) == 2   # nothing new, nothing said
    finally:
        logger.removeHandler(records)
        inbox.close()


def test_a_receiver_that_is_not_root_accepts_its_own_uid_and_root_only():
    # The receiver is a child running as OTHER; this process (root) and two children send to it.
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    receiver = os.fork()
    if receiver == 0:
        try:
            for fd in (ready_r, go_w, out_r):
                os.close(fd)
            os.setgroups([])
            os.setresgid(OTHER, OTHER, OTHER)
            os.setresuid(OTHER, OTHER, OTHER)
            inbox = NotifyInbox("notroot")
            os.write(ready_w, inbox.address.encode())
            assert os.read(go_r, 1) == b"g"
            got = []
            for _ in range(10):
                got += inbox.receive()
                if not readable(inbox):
                    break
            data = {"result": {"uid": inbox.uid, "got": got, "dropped": inbox.dropped}}
        except BaseException:
            data = {"error": traceback.format_exc()}
        os.write(out_w, json.dumps(data).encode())
        os._exit(0)
    for fd in (ready_w, go_r, out_w):
        os.close(fd)
    try:
        assert select.select([ready_r], [], [], STALL)[0], "the receiver did not start"
        address = os.read(ready_r, 200).decode()
        assert address.startswith("@cadenza/notroot/")

        assert Notifier(address).send(status="from root")
        same = fork_as(OTHER, lambda: Notifier(address).send(status="from the same uid") or sys.exit(1))
        nobody = fork_as(NOBODY, lambda: Notifier(address).send(status="from nobody") or sys.exit(1))
        assert wait_exit(same) == 0 and wait_exit(nobody) == 0
        os.write(go_w, b"g")
        assert select.select([out_r], [], [], STALL)[0], "the receiver did not answer"
        answer = json.loads(os.read(out_r, 65536))
    finally:
        for fd in (ready_r, go_w, out_r):
            os.close(fd)
        wait_exit(receiver)
    assert "error" not in answer, answer.get("error")
    out = answer["result"]
    assert out["uid"] == OTHER
    assert sorted(f["STATUS"] for _, f in out["got"]) == ["from root", "from the same uid"]
    assert {p for p, _ in out["got"]} == {os.getpid(), same}
    assert out["dropped"] == 1


# --- who may speak for a worker: its family, whatever user it runs as --------------------------

NOTIFY = "/usr/bin/systemd-notify"
AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]


def receive_while(inbox: NotifyInbox, sender_of, proc: subprocess.Popen) -> list:
    """What the inbox hands on until `proc` has exited (systemd-notify waits until its BARRIER=1
    was read: the inbox must look at a sender while it waits)."""
    got = []
    deadline = time.monotonic() + STALL
    while proc.poll() is None:
        assert time.monotonic() < deadline, f"{proc.args} still running after {STALL}s"
        select.select([inbox.sock], [], [], 0.1)
        got += inbox.receive(sender_of)
    return got + inbox.receive(sender_of)


def test_systemd_notify_as_nobody_from_a_workers_child_speaks_for_the_worker_and_a_stranger_does_not():
    records = Records()
    logger = logging.getLogger("cadenza.notify")
    logger.addHandler(records)
    inbox = NotifyInbox("family")
    env = {**os.environ, "NOTIFY_SOCKET": inbox.address}
    try:
        # The worker is a shell (root) whose child is a shell run as nobody, which runs the real
        # systemd-notify: as nobody it cannot name its parent, so the kernel names it.
        grandchild = " ".join(AS_NOBODY) + f" sh -c '{NOTIFY} --ready --status=from-a-grandchild; true'"
        worker = subprocess.Popen(["sh", "-c", f"{grandchild}; true"], env=env)
        workers = {worker.pid}
        got = receive_while(inbox, lambda pid: groups.worker_of(pid, workers), worker)
        assert worker.returncode == 0
        assert got == [(worker.pid, {"READY": "1", "STATUS": "from-a-grandchild"})]   # BARRIER=1 only read
        assert inbox.dropped == 0 and records.lines == []

        # The same program, as the same user, but no worker's descendant: refused, and said so.
        stranger = subprocess.Popen([*AS_NOBODY, NOTIFY, "--ready", "--status=stranger"], env=env)
        assert receive_while(inbox, lambda pid: groups.worker_of(pid, workers), stranger) == []
        assert stranger.returncode == 0          # its BARRIER=1 was read too, and so answered
        assert inbox.dropped == 1
        [line] = records.lines
        assert f"refused READY=1 from pid {stranger.pid} (uid {NOBODY}, {NOTIFY} --ready --status=stranger)" in line
        assert "not sent by a worker of this generation or one of its descendants" in line
    finally:
        logger.removeHandler(records)
        inbox.close()


def test_the_refused_sender_s_command_line_cannot_forge_a_log_line():
    # Whoever sends chooses its argv: a newline in it must not become a line of its own.
    records = Records()
    logger = logging.getLogger("cadenza.notify")
    logger.addHandler(records)
    inbox = NotifyInbox("forge")
    program = ("import socket, sys, time; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto("
               "b'READY=1', b'\\0' + sys.argv[1][1:].encode()); time.sleep(30)")
    sender = subprocess.Popen(["x\nCRITICAL master: forged", "-c", program, inbox.address, "y" * 500],
                              executable=sys.executable)
    try:
        assert select.select([inbox.sock], [], [], STALL)[0]
        assert inbox.receive(lambda pid: None) == []
        [line] = records.lines
        assert "\n" not in line
        assert f"from pid {sender.pid} (uid 0, x?CRITICAL master: forged -c import socket" in line, line
        assert "…): not sent by" in line and len(line) < 600, line   # 200 characters at most
    finally:
        sender.kill()
        sender.wait()
        logger.removeHandler(records)
        inbox.close()


def test_no_fds_are_kept_from_a_datagram_that_carries_some():
    inbox = NotifyInbox("fds")
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(8)]
    try:
        before = sorted(os.listdir("/proc/self/fd"))
        sender.sendmsg([b"READY=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                       0, notify._sockaddr(inbox.address))
        assert inbox.receive() == [(os.getpid(), {"READY": "1"})]
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        for fd in fds:
            os.close(fd)
        sender.close()
        inbox.close()


# --- memory -----------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent("""
    import gc, json, os, selectors, sys
    sys.path.insert(0, sys.argv[1])
    from test_notify import FLOOD, NOBODY, STALL, enter_own_netns, flood, fork_as, readable, wait_exit
    from cadenza.notify import NotifyInbox

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])     # kB

    enter_own_netns()
    inbox = NotifyInbox("rss")
    # Warm up every code path the flood will take (a drop, a log line, a legitimate datagram).
    warm = fork_as(NOBODY, lambda: flood(inbox.address, 10, b"x"))
    assert wait_exit(warm) == 0
    inbox.receive()
    flood(inbox.address, 10, b"READY=1")
    inbox.receive()
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                            # resets VmHWM to the current RSS
    # Fields, as many as fit: a flood parsed into dicts and kept would cost most.
    payload = "\\n".join(f"K{i}=v" for i in range(700)).encode()[:4000]
    flooder = fork_as(NOBODY, lambda: flood(inbox.address, FLOOD, payload))
    sel = selectors.DefaultSelector()
    sel.register(inbox.sock, selectors.EVENT_READ, "inbox")
    sel.register(os.pidfd_open(flooder), selectors.EVENT_READ, "flooder")
    code = None
    received = 0
    for _ in range(10 * FLOOD):
        events = sel.select(STALL)
        assert events, "stalled"
        for key, _ in events:
            if key.data == "inbox":
                received += len(inbox.receive())
            else:
                sel.unregister(key.fileobj)
                code = wait_exit(flooder)
        if code is not None and not readable(inbox):
            break
    gc.collect()
    print(json.dumps({"before": before, "after": status("VmRSS"), "peak": status("VmHWM"),
                      "dropped": inbox.dropped, "received": received, "flooder": code,
                      "payload": len(payload)}))
""")


def test_rss_stays_flat_under_a_flood():
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flooder"] == 0 and out["dropped"] == FLOOD + 10 and out["received"] == 0, out
    assert out["after"] - out["before"] < 2048, out      # kB
    assert out["peak"] - out["before"] < 2048, out


def test_fds_that_came_with_the_credentials_are_closed():
    # The ancillary buffer leaves the kernel no room for fds (the test above); should one arrive
    # all the same, it is closed, not kept.
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    creds = notify._UCRED.pack(123, 456, 789)
    ancdata = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds),
               (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
    assert notify._credentials(ancdata) == (123, 456, 789)
    with pytest.raises(OSError):
        os.fstat(fd)
    assert notify._credentials([]) is None
