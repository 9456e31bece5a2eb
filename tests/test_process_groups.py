"""daemon/groups.py with a real master and real processes (outside systemd; the test plays
NOTIFY_SOCKET): every worker leads a process group of its own; what the master sends a worker
reaches its whole group and never the master; what remains of a group once its worker was
reaped is stopped (TERM, then KILL after graceful_timeout) before the generation may leave;
readiness counts from a worker's descendants, as root and as another user (the real
systemd-notify), and from nothing else."""
from __future__ import annotations

import http.client
import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from handover_fixtures import poll
from procs import VENV_BIN, Master, accepted, alive, children, cmdline, free_port, get

PROGRAMS = Path(__file__).parent / "programs"
HTTPWORKER = PROGRAMS / "httpworker.py"
PY = sys.executable
# Ignores SIGTERM, so that only the SIGKILL after graceful_timeout ends it.
STUBBORN = f"{PY} -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'"
NOTIFY = "/usr/bin/systemd-notify"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: workers run as nobody")


@pytest.fixture
def start(tmp_path):
    masters = []

    def _start(workers: str, *args: str) -> Master:
        cfg = tmp_path / "cadenza.toml"
        cfg.write_text(f'[control]\nsocket = "{tmp_path}/control.sock"\n[workers]\n{workers}')
        port = free_port()
        m = Master(tmp_path, "-c", str(cfg), "--bind", f"127.0.0.1:{port}", *args)
        m.port = port
        masters.append(m)
        return m
    yield _start
    for m in masters:
        m.close()


def toml_list(*argv) -> str:
    return json.dumps([str(a) for a in argv])   # a JSON list of strings is a TOML array too


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        found.append(todo.pop())
        todo += children(found[-1])
    return found


def ignoring_term(pids: list[int]) -> bool:
    """Whether one of `pids` (STUBBORN) ignores SIGTERM by now: until then a TERM would end it."""
    for pid in pids:
        mask = Path(f"/proc/{pid}/status").read_text().split("\nSigIgn:")[1].split()[0]
        if int(mask, 16) & 1 << (signal.SIGTERM - 1):
            return True
    return False


# ---- (c) a group of its own, never the master's ---------------------------------------------

def test_each_worker_leads_its_own_group_and_its_kill_0_never_reaches_the_master(start):
    # `kill -TERM 0` signals the sender's own group: were the workers in the master's, the
    # master would take it for a stop.
    command = toml_list("sh", "-c", f"trap '' TERM; kill -TERM 0; exec {PY} {HTTPWORKER}")
    m = start(f"count = 2\ncommand = {command}\n")
    m.wait_ready()
    m.signal(signal.SIGTTIN)              # a third one, and a turn of the master's loop after
    m.wait_status("3/3 workers ready")    # every kill above has been delivered
    workers = m.workers()
    assert len(workers) == 3
    assert all(os.getpgid(w) == w != os.getpgid(m.pid) for w in workers), [(w, os.getpgid(w)) for w in workers]
    assert m.proc.poll() is None and "stop requested" not in m.log(), m.log()
    assert get(m.port)[0] == 200
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    # Its own drain signal did not reach it either: one stop, the one the test sent.
    assert m.log().count("graceful stop requested") == 1, m.log()
    assert not any(alive(w) for w in workers)


# ---- (a) a wrapper that does not exec --------------------------------------------------------

def wrapper(*jobs: str) -> str:
    """A shell that starts `jobs` as its children and waits: it never execs."""
    return toml_list("sh", "-c", " & ".join(jobs) + " & wait")


def test_a_stopping_generation_takes_a_wrappers_children_with_it(start):
    m = start(f"count = 1\ngraceful_timeout = 1\ncommand = {wrapper(STUBBORN, f'{PY} {HTTPWORKER}')}\n")
    m.wait_ready()                         # said by the server, the wrapper's child
    [shell] = m.workers()
    kids = poll(lambda: len(k := children(shell)) == 2 and k, what="the wrapper's two children")
    poll(lambda: ignoring_term(kids), what="the stubborn child's SIG_IGN")
    assert {os.getpgid(k) for k in kids} == {shell}
    status, body = get(m.port)
    assert status == 200 and body.startswith("release "), body
    t0 = time.monotonic()
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    # The master left only once none was left: the server went on TERM, the stubborn one on
    # the SIGKILL graceful_timeout later.
    assert not [k for k in kids if alive(k)]
    assert time.monotonic() - t0 >= 0.9
    assert f"what remains of the group of worker 1 (pid {shell}) is still running; killing it" in m.log()


def test_the_children_of_a_killed_wrapper_are_stopped_and_the_slot_filled_again(start):
    m = start(f"count = 1\ngraceful_timeout = 1\ncommand = {wrapper(STUBBORN, f'{PY} {HTTPWORKER}')}\n")
    m.wait_ready()
    [shell] = m.workers()
    kids = poll(lambda: len(k := children(shell)) == 2 and k, what="the wrapper's two children")
    poll(lambda: ignoring_term(kids), what="the stubborn child's SIG_IGN")
    os.kill(shell, signal.SIGKILL)         # from outside: its children are orphans now
    m.wait_status("0/1 workers ready")
    m.wait_status("1/1 workers ready")
    poll(lambda: not [k for k in kids if alive(k)], timeout=10, what="the orphans' end")
    log = m.log()
    assert f"worker 1 (pid {shell}) has exited, but 2 process(es) of its group remain" in log, log
    assert f"what remains of the group of worker 1 (pid {shell}) is still running; killing it" in log, log
    poll(lambda: f"what remained of the group of worker 1 (pid {shell}) has gone" in m.log(), what="log line")
    [new] = m.workers()
    assert new != shell and get(m.port)[0] == 200


# ---- (b) gunicorn: an arbiter with workers of its own ------------------------------------------

GUNICORN_APP = '''\
import os

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"gunicorn pid {os.getpid()}".encode()]
'''


def test_gunicorn_as_a_command_worker_goes_with_its_workers(start, tmp_path):
    (tmp_path / "gapp.py").write_text(GUNICORN_APP)
    gunicorn = toml_list(VENV_BIN / "gunicorn", "--workers", "2", "--graceful-timeout", "5", "gapp:app")
    m = start(f"count = 1\ngraceful_timeout = 10\ncommand = {gunicorn}\n")
    m.wait_ready(timeout=30)               # gunicorn's arbiter says READY=1 itself
    [arbiter] = m.workers()
    gworkers = poll(lambda: len(k := children(arbiter)) == 2 and k, what="gunicorn's two workers")
    assert {os.getpgid(p) for p in gworkers} == {arbiter}
    status, body = get(m.port)
    assert status == 200 and body.startswith("gunicorn pid "), body

    # A rolling restart: the old arbiter and its workers leave, a new one serves.
    m.signal(signal.SIGHUP)
    m.wait_status("rolling restart")
    poll(lambda: not [p for p in (arbiter, *gworkers) if alive(p)], timeout=30, what="old gunicorn gone")
    [arbiter] = poll(lambda: (w := m.workers()) and arbiter not in w and w, what="the new arbiter")
    gworkers = poll(lambda: len(k := children(arbiter)) == 2 and k, what="the new arbiter's workers")
    assert get(m.port)[0] == 200

    # The master's drain signal: nothing of gunicorn remains once the master has gone.
    tree = [arbiter, *descendants(arbiter)]
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=30) == 0
    assert not [p for p in tree if alive(p)], [p for p in tree if alive(p)]
    assert f"worker 1 (pid {arbiter}) exited with status 0" in m.log(), m.log()
    assert "process(es) of its group remain" not in m.log()   # gunicorn stopped its workers itself


# ---- notify access: a worker's descendants --------------------------------------------------

@pytest.mark.parametrize("as_user", ["root", "nobody"])
def test_systemd_notify_from_a_wrappers_child_makes_the_worker_ready(start, as_user):
    # The grandchild's systemd-notify: as root it names its parent (sd_pid_notify with the
    # parent's pid), as nobody itself; and it waits until its BARRIER=1 has been read.
    inner = f"sh -c '{NOTIFY} --ready --status=ready-from-a-grandchild; true'; exec sleep 600"
    argv = ["sh", "-c", inner]
    if as_user == "nobody":
        argv = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", *argv]
    m = start(f"count = 1\nready_timeout = 15\ncommand = {toml_list(*argv)}\n")
    msg = m.wait_ready()
    assert "1/1 workers ready" in msg["STATUS"]
    [worker] = m.workers()
    uid = int(Path(f"/proc/{worker}/status").read_text().split("\nUid:")[1].split()[0])
    assert uid == (pwd.getpwnam("nobody").pw_uid if as_user == "nobody" else 0)
    assert f"worker 1 (pid {worker}) ready" in m.log()
    assert "refused" not in m.log()
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0


# ---- a next generation that will not stop: killed with its tree ------------------------------

TREE = """
import subprocess, sys, time
# a worker: a group of its own, and a child in it (the wrapper's server)
worker = subprocess.Popen([sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"],
                          process_group=0)
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_signal_tree_kills_a_masters_workers_groups_and_never_ours():
    from cadenza.daemon.groups import signal_tree
    ours = subprocess.Popen(["sleep", "600"])                               # in our own group
    stranger = subprocess.Popen(["sleep", "600"], process_group=0)          # not of the tree
    master = subprocess.Popen([PY, "-c", TREE], process_group=0, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(master.stdout.readline())
        tree = poll(lambda: len(t := [master.pid, *descendants(master.pid)]) == 3 and t, what="the tree")
        assert os.getpgid(worker) == worker != os.getpgid(master.pid) == master.pid
        signal_tree(master.pid, signal.SIGKILL)
        poll(lambda: not [p for p in tree if alive(p)], what="the tree's end")
        assert ours.poll() is None and stranger.poll() is None
    finally:
        for proc in (ours, stranger, master):
            proc.kill()
            proc.wait()


def test_a_group_that_cannot_be_ended_is_given_up_on_not_waited_for(monkeypatch):
    # A master that is not root cannot signal what a worker's child became by setuid: it says so
    # and stops waiting after KILL_WAIT instead of keeping its generation for ever.
    from cadenza.daemon import groups
    from cadenza.daemon.loop import Loop
    victim = subprocess.Popen(["sleep", "600"], process_group=0, user=65534, group=65534)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65533, 65533, 65533)
            os.setresuid(65533, 65533, 65533)
            monkeypatch.setattr(groups, "KILL_WAIT", 0.2)
            loop, lines = Loop(), []
            handler = logging.Handler()
            handler.emit = lambda record: lines.append(record.getMessage())
            logging.getLogger("cadenza.master").addHandler(handler)
            leftovers = groups.Leftovers(loop, 0.2, lambda: setattr(loop, "stopped", True))
            leftovers.sweep(victim.pid, "worker 1 (pid 999999)")
            assert leftovers.pgids() == {victim.pid}
            loop.after(10, lambda: setattr(loop, "stopped", True))
            loop.run()
            assert not leftovers, lines
            os.write(w, "\n".join(lines).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r) as pipe:
            lines = pipe.read()
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0, lines
    finally:
        alive_after = victim.poll() is None
        victim.kill()
        victim.wait()
    assert alive_after
    assert "cannot send SIGTERM to pid" in lines, lines
    assert f"did not end 0.2s after SIGKILL: pid {victim.pid} (sleep 600); not waiting for it" in lines, lines


# ---- (d) the master's own signals, sent to every process of the unit -------------------------

def _state(pid: int) -> str:
    """The process's state letter (T: stopped), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("preload", [False, True], ids=["exec", "preload"])
def test_the_master_s_signals_sent_to_the_whole_unit_move_only_the_master(start, preload):
    # `systemctl kill -s TTIN APP` signals every process of the unit: the built-in workers and
    # the preloader must neither stop (TTIN/TTOU's default) nor die (HUP's, USR1's, USR2's).
    m = start(f'count = 2\napp = "cadenza.demo:app"\npreload = {"true" if preload else "false"}\n'
              'graceful_timeout = 10\n')
    m.wait_status("2/2 workers ready")
    first = descendants(m.pid)
    assert len(first) == (3 if preload else 2), first

    def to_the_unit(sig: int) -> None:
        for pid in [m.pid, *descendants(m.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    to_the_unit(signal.SIGUSR1)          # means nothing to cadenza
    to_the_unit(signal.SIGTTIN)          # one worker more
    m.wait_status("3/3 workers ready")
    states = {pid: _state(pid) for pid in first}
    assert all(state in ("S", "R") for state in states.values()), states    # T: stopped
    assert set(first) < set(descendants(m.pid))
    to_the_unit(signal.SIGTTOU)          # one fewer
    m.wait_status("2/2 workers ready")
    assert "T" not in {_state(pid) for pid in descendants(m.pid)}
    # HUP: the master's rolling restart, make-before-break: a request in flight is answered.
    conn = http.client.HTTPConnection("127.0.0.1", m.port, timeout=20)
    conn.request("GET", "/slow?s=2")
    poll(lambda: accepted(m.port, conn.sock.getsockname()[1]), timeout=10, what="the slow request accepted")
    to_the_unit(signal.SIGHUP)
    m.wait_status("rolling restart")
    resp = conn.getresponse()
    assert resp.status == 200 and "hello from cadenza worker" in resp.read().decode()
    m.wait_for(lambda msg: msg.get("STATUS", "").endswith("2/2 workers ready"), timeout=30)
    assert m.proc.poll() is None and get(m.port)[0] == 200
    old_workers = {pid for pid in first if "worker" in cmdline(pid)}
    poll(lambda: not old_workers & set(descendants(m.pid)), timeout=15, what="every old worker replaced")
    assert "killed by" not in m.log(), m.log()[-3000:]


def test_a_worker_still_starting_ignores_the_master_s_signals_too(start):
    # Before the worker's own code runs (the interpreter's start, the imports), a HUP or USR1 of
    # `systemctl kill` must find the master's SIG_IGN, which survives exec.
    m = start('count = 1\napp = "cadenza.demo:app"\n')
    m.wait_status("1/1 workers ready")
    first = set(children(m.pid))
    m.signal(signal.SIGTTIN)
    new = poll(lambda: set(children(m.pid)) - first, timeout=10, what="the new worker forked")
    for pid in new:
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(pid, sig)
    m.wait_status("2/2 workers ready")
    assert new <= set(children(m.pid)) and "killed by" not in m.log(), m.log()[-3000:]
