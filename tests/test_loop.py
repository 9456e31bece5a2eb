"""daemon/loop.py: timers, the one dispatch guard, reaping in one place, safe signalling."""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket

from cadenza.daemon.loop import Loop, Timers, signal_group, signal_process


def test_timers_fire_in_order_and_cancelled_ones_never():
    timers, fired = Timers(), []
    timers.after(0, lambda: fired.append("b"))
    early = timers.after(-1, lambda: fired.append("a"))
    dead = timers.after(-2, lambda: fired.append("never"))
    dead.cancel()
    assert timers.timeout() == 0.0
    for timer in timers.due():
        timer.callback()
    assert fired == ["a", "b"] and early.cancelled and timers.timeout() is None


def test_an_os_error_in_a_timer_or_handler_is_logged_and_the_loop_goes_on(caplog):
    loop, seen = Loop(), []
    r, w = socket.socketpair()

    def fork_fails():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    def bug():
        raise KeyError("x")

    def readable():
        r.recv(10)
        seen.append("read")
        loop.stopped = True
    loop.after(0, fork_fails)
    loop.after(0, bug)
    loop.add_reader(r, readable)
    loop.after(0, lambda: w.send(b"x"))
    with caplog.at_level(logging.ERROR):
        loop.run()
    assert seen == ["read"]
    assert any("Resource temporarily unavailable" in m and "carries on" in m for m in caplog.messages)
    assert any("internal error" in m for m in caplog.messages)
    loop.close()


def test_every_child_is_reaped_by_reap_and_handed_to_its_owner():
    loop, statuses = Loop(), []
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    loop.watch_child(pid, statuses.append)
    stray = os.fork()
    if stray == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    os.waitid(os.P_PID, stray, os.WEXITED | os.WNOWAIT)
    loop.reap()
    assert [os.waitstatus_to_exitcode(s) for s in statuses] == [7]
    assert pid not in loop.children
    loop.close()


def test_pid_0_1_and_our_own_group_are_never_signalled(caplog):
    with caplog.at_level(logging.ERROR):
        assert not signal_process(0, signal.SIGKILL)
        assert not signal_process(-1, signal.SIGKILL)
        assert not signal_process(1, signal.SIGTERM)
        assert not signal_group(os.getpgrp(), signal.SIGKILL)
        assert not signal_group(0, signal.SIGKILL)
    assert sum("refusing" in m for m in caplog.messages) == 5


def test_a_paused_acceptor_started_and_stopped_in_any_order_is_registered_once():
    """EMFILE pauses accepting; a rollback's start, or a hand-over's stop and start, may come while
    paused. The pause's end must not register the socket a second time (KeyError from the
    selector), nor register it after a stop."""
    loop = Loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0cadenza-test-acceptor-%d" % os.getpid())
    listener.listen()
    listener.setblocking(False)
    accepted = []

    def on_ready():
        conn, _ = listener.accept()
        accepted.append(conn)
        loop.stopped = True
    acceptor = loop.acceptor(listener, on_ready, 0.05)
    acceptor.start()
    acceptor.pause()
    acceptor.stop()
    acceptor.start()          # main again while paused: the pause's end registers it, once
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(listener.getsockname())
    loop.after(5, lambda: setattr(loop, "stopped", True))   # a deadline, should nothing be accepted
    loop.run()
    assert len(accepted) == 1 and acceptor.accepting
    assert len([key for key in loop.selector.get_map().values() if key.fileobj is listener]) == 1

    acceptor.pause()
    acceptor.stop()           # stopped while paused: the pause's end leaves it out
    loop.stopped = False
    loop.after(0.1, lambda: setattr(loop, "stopped", True))
    loop.run()
    assert all(key.fileobj is not listener for key in loop.selector.get_map().values())
    for sock in (client, listener, *accepted):
        sock.close()
    loop.close()
