"""daemon/handoff.py: what N passes to N+1, read back by N+1; the channel's line protocol."""
from __future__ import annotations

import os
import socket

from cadenza.daemon.handoff import HANDOFF_VARIABLES, Channel, Inheritance, successor_environment
from cadenza.daemon.pool import BACKOFF_CAP, backoff_delay


def test_successor_environment_numbers_its_fds_after_the_named_ones(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "9")
    monkeypatch.setenv("CADENZA_HANDOFF_FD", "99")
    monkeypatch.setenv("KEEP_ME", "1")
    env = successor_environment(generation=3, names=["listen-1", "cadenza-control"], owns=["control"],
                                notify_address="/run/notify", watchdog_usec=0)
    assert env["LISTEN_FDS"] == "2" and env["LISTEN_FDNAMES"] == "listen-1:cadenza-control"
    assert [env[k] for k in ("CADENZA_HANDOFF_FD", "CADENZA_LOG_FD", "CADENZA_PREDECESSOR_FD",
                             "CADENZA_EXEC_FD")] == ["5", "6", "7", "8"]
    assert env["CADENZA_GENERATION"] == "3" and env["CADENZA_OWNS"] == "control"
    assert env["KEEP_ME"] == "1" and "WATCHDOG_USEC" not in env


def test_inheritance_reads_and_consumes_the_variables():
    a, b = socket.socketpair()
    log_fd, pred_fd, exec_fd = os.dup(2), os.pidfd_open(os.getpid()), os.open("/bin/sh", os.O_PATH)
    env = {"CADENZA_HANDOFF_FD": str(b.detach()), "CADENZA_LOG_FD": str(log_fd),
           "CADENZA_PREDECESSOR_FD": str(pred_fd), "CADENZA_EXEC_FD": str(exec_fd),
           "CADENZA_GENERATION": "4", "CADENZA_OWNS": "listeners,fdstore"}
    got = Inheritance.from_environ(env)
    assert got.heir and got.generation == 4 and got.owns == {"listeners", "fdstore"}
    assert not any(k in env for k in HANDOFF_VARIABLES)
    assert not os.get_inheritable(pred_fd) and not os.get_inheritable(log_fd)
    try:
        os.fstat(exec_fd)
        raise AssertionError("the launcher's fd should have been closed")
    except OSError:
        pass
    a.sendall(b"appointed\nma")
    assert got.channel.receive() == (["appointed"], False)
    a.sendall(b"in\nstop\n")
    a.close()
    assert got.channel.receive() == (["main", "stop"], False)
    assert got.channel.receive() == ([], True)
    got.close_channel()
    got.close_predecessor()
    os.close(log_fd)


def test_a_first_generation_inherits_nothing():
    got = Inheritance.from_environ({})
    assert not got.heir and got.generation == 1 and got.owns == frozenset()


def test_channel_send_reports_a_dead_peer():
    a, b = socket.socketpair()
    chan = Channel(a)
    b.close()
    assert chan.send("main") is False
    chan.close()
    assert chan.send("main") is False


def test_backoff_doubles_from_a_tenth_of_a_second_to_the_cap():
    assert [backoff_delay(n) for n in range(0, 5)] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert backoff_delay(50) == BACKOFF_CAP
