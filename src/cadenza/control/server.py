"""The control socket (DESIGN §5): unix stream, JSON lines, one request per connection (protocol.py).

Who may do what is decided at accept, from the credentials the kernel took at connect()
(SO_PEERCRED, SO_PEERGROUPS), before a byte is read: root, the service user, `allow_users` and
`allow_groups` everything, `status_groups` only `status`. Anyone else is told "permission
denied" at once, logged, and hung up on. Read-only peers have MAX_READERS slots of their own,
so none of them can take the MAX_CLIENTS slots kept for those who may reload.

Dropped: a line longer than MAX_REQUEST, silence for REQUEST_TIMEOUT, reading nothing for
STALL_TIMEOUT or while MAX_PENDING bytes wait. Once the request is read the socket is watched
for writes only while output waits, never for reads: a client that half-closes or closes after
its request never wakes the loop (a full close shows when its answer cannot be written).
"""

from __future__ import annotations

import errno
import logging
import select
import selectors
import socket
import time
from collections.abc import Callable

from .access import FULL, READER, Access, peer_credentials  # noqa: F401 - Access is part of the server's API
from .protocol import (DENIED, FAILED, MAX_REQUEST, READ_ONLY, UNREACHABLE, USAGE, BadRequest, done, encode,
                       parse_request)

log = logging.getLogger("cadenza.control")

MAX_PENDING = 1 << 20
MAX_CLIENTS = 64        # connections of peers who may do everything
MAX_READERS = 16        # connections of status_groups peers, counted apart
REQUEST_TIMEOUT = 5.0
STALL_TIMEOUT = 30.0    # output waits and the client reads none of it
ACCEPT_PAUSE = 1.0      # after accept() found no free file descriptor
ACCEPT_BATCH = 32       # connections taken per wake-up, so a flood cannot starve the workers
REFUSAL_LOG_BURST = 10  # refusals logged one by one per REFUSAL_LOG_WINDOW, then counted
REFUSAL_LOG_WINDOW = 10.0



class Client:
    """One connection: reads one request line, then writes events until done."""

    def __init__(self, server: ControlServer, sock: socket.socket, pid: int, uid: int, rank: str):
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.pid, self.uid, self.rank = pid, uid, rank
        self.inbuf = b""
        self.outbuf = bytearray()
        self.closing = False
        self.closed = False
        self.request: dict | None = None
        self.events = 0          # what the loop watches this socket for
        self.stall = None        # Timer while output waits for a client that reads none of it
        self.timer = self.loop.after(REQUEST_TIMEOUT, self._request_timeout)
        self._watch(selectors.EVENT_READ)

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid}"

    def _watch(self, events: int) -> None:
        if events == self.events or self.closed:
            return
        if events == 0:
            self.loop.remove(self.sock)
        elif self.events == 0:
            self.loop.add_reader(self.sock, self._on_event)
            if events != selectors.EVENT_READ:
                self.loop.set_events(self.sock, events, self._on_event)
        else:
            self.loop.set_events(self.sock, events, self._on_event)
        self.events = events

    def _on_event(self) -> None:
        if self.request is None and not self.closing:
            self._read()
        else:
            self.flush()   # writable, or hung up (EPOLLHUP): send() says which

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()   # gone before asking anything
            return
        self.inbuf += data
        if b"\n" not in self.inbuf:
            if len(self.inbuf) > MAX_REQUEST:
                self.request = {}
                self.finish(USAGE, f"request longer than {MAX_REQUEST} bytes")
            return
        self._handle(self.inbuf.split(b"\n", 1)[0])

    def _handle(self, line: bytes) -> None:
        # One request per connection: from here on nothing the client sends or does (more bytes,
        # a half-close, EOF) is read, so none of it can wake the loop.
        self.timer.cancel()
        self.inbuf = b""
        self._watch(0)
        try:
            request = parse_request(line)
        except BadRequest as exc:
            self.request = {}
            self.finish(USAGE, str(exc))
            return
        self.request = request
        cmd = request["cmd"]
        if self.rank != FULL and cmd not in READ_ONLY:
            log.warning("control: %s denied to uid %d (pid %d): control.status_groups may only read",
                        cmd, self.uid, self.pid)
            self.finish(DENIED, f"permission denied: uid {self.uid} may not {cmd}; its group is in "
                                "control.status_groups, which may only ask for status and metrics")
            return
        log.info("control: %s from %s", cmd, self.describe())
        try:
            self.server.on_command(self, cmd, request)
        except Exception as exc:   # noqa: BLE001 - the caller must hear how its request ended
            log.exception("internal error in control command %s from %s (please report this)",
                          cmd, self.describe())
            self.finish(FAILED, f"internal error in {cmd}: {exc!r}; see the master's log")

    def _request_timeout(self) -> None:
        if self.request is None and not self.closed:
            self.request = {}
            self.finish(USAGE, f"no request within {REQUEST_TIMEOUT:g}s")

    def send(self, message: dict, final: bool = False) -> None:
        """Queue a line. Streamed lines beyond MAX_PENDING unread bytes drop the client; the final
        answer is queued whatever its size (`supervisorctl metrics` of many workers is over 1 MiB),
        once: STALL_TIMEOUT still bounds a client that never reads it."""
        if self.closed or self.closing:
            return
        before = len(self.outbuf)
        self.outbuf += encode(message)
        if (before if final else len(self.outbuf)) > MAX_PENDING:
            log.warning("control client %s reads nothing (%d bytes wait for it); dropped",
                        self.describe(), len(self.outbuf))
            self.close()
            return
        self.flush()

    def finish(self, code: int, text: str = "", **extra) -> None:
        self.send(done(code, text, **extra), final=True)
        self.closing = True
        self.flush()

    def flush(self) -> None:
        sent_any = False
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:   # EPIPE, ECONNRESET: the client is gone
                self.close()
                return
            del self.outbuf[:sent]
            sent_any = True
        if self.closed:
            return
        if not self.outbuf:
            self._stop_stall()
            if self.closing:
                self.close()
            elif self.request is not None:
                self._watch(0)
            return
        self._watch(selectors.EVENT_WRITE)
        if sent_any or self.stall is None:
            self._stop_stall()
            self.stall = self.loop.after(STALL_TIMEOUT, self._stalled)

    def _stop_stall(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self) -> None:
        self.stall = None
        if not self.closed:
            log.warning("control client %s read nothing for %gs; dropped", self.describe(), STALL_TIMEOUT)
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self._watch(0)
        self.closed = True
        self.timer.cancel()
        self._stop_stall()
        self.server.forget(self)
        self.sock.close()


class ControlServer:
    """Serves `sock` in `loop` (a cadenza.daemon.loop.Loop); `on_command(client, cmd, request)`
    runs for every authorised, well-formed request and answers through client.send/finish."""

    def __init__(self, loop, sock: socket.socket, access: Access,
                 on_command: Callable[[Client, str, dict], None]):
        self.loop = loop
        self.sock = sock
        self.access = access
        self.on_command = on_command
        self.clients: set[Client] = set()
        self._refusals = (0.0, 0, 0)   # window start, refusals in it, those not logged
        sock.setblocking(False)
        self.acceptor = loop.acceptor(sock, self._on_accept, ACCEPT_PAUSE)
        self.acceptor.start()

    def count(self, rank: str) -> int:
        return sum(1 for c in self.clients if c.rank == rank)

    def _on_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # The connection stays queued and would wake the loop again at once: pause.
                    log.error("control socket: out of file descriptors (%s); not accepting for %gs. "
                              "Raise LimitNOFILE= in the unit", exc.strerror, ACCEPT_PAUSE)
                    self.acceptor.pause()
                return
            try:
                self._admit(conn)
            except OSError as exc:
                log.warning("control: dropped a connection that failed at accept: %s", exc)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        pid, uid, groups = peer_credentials(conn)
        rank = self.access.rank(uid, groups)
        if rank is None:
            self._log_refusal("control: denied to uid %d (pid %d): not root, the service user, nor in "
                              "control.allow_users/allow_groups/status_groups", uid, pid)
            _answer_and_close(conn, DENIED, f"permission denied: uid {uid} may not use this control "
                              "socket; control.allow_users and allow_groups name who may "
                              "(status_groups: who may read status)")
            return
        cap = MAX_CLIENTS if rank == FULL else MAX_READERS
        if self.count(rank) >= cap:
            self._reclaim(rank)
        if self.count(rank) >= cap:
            self._log_refusal("control: %d %s connections open already; refused pid %d uid %d",
                              cap, rank, pid, uid)
            _answer_and_close(conn, UNREACHABLE, f"the master has {cap} {rank} control connections "
                              "open already; retry once they are done")
            return
        self.clients.add(Client(self, conn, pid, uid, rank))

    def _reclaim(self, rank: str) -> None:
        """Free the slots of clients that hung up while their command runs (an operator's Ctrl-C):
        their sockets are not watched for reads, so only a look now tells. POLLHUP is a full
        close; a half-close (the peer still reads its answer) keeps its slot."""
        poller = select.poll()
        waiting = {c.sock.fileno(): c for c in self.clients
                   if c.rank == rank and c.request is not None and not c.closed}
        for fd in waiting:
            poller.register(fd, 0)       # POLLHUP and POLLERR are reported whatever is asked
        for fd, events in poller.poll(0):
            if events & (select.POLLHUP | select.POLLERR):
                client = waiting[fd]
                log.info("control: %s hung up before its %s was answered; its slot is free",
                         client.describe(), (client.request or {}).get("cmd", "request"))
                client.close()

    def _log_refusal(self, *args) -> None:
        """Every refusal is logged: one by one up to a burst per window, then as a count."""
        start, logged, quiet = self._refusals
        if time.monotonic() - start >= REFUSAL_LOG_WINDOW:
            if quiet:
                log.warning("control: %d more connection(s) refused in %gs, not logged one by one",
                            quiet, REFUSAL_LOG_WINDOW)
            start, logged, quiet = time.monotonic(), 0, 0
        if logged < REFUSAL_LOG_BURST:
            log.warning(*args)
        self._refusals = (start, logged + 1, quiet + (logged >= REFUSAL_LOG_BURST))

    def forget(self, client: Client) -> None:
        self.clients.discard(client)

    def start_accepting(self) -> None:
        """Main again (a rollback to a warm generation, daemon/warm.py)."""
        self.acceptor.start()

    def stop_accepting(self) -> None:
        self.acceptor.stop()

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        self.stop_accepting()


def _answer_and_close(conn: socket.socket, code: int, text: str) -> None:
    """One line to a peer we keep nothing for (a fresh socket's buffer has room), and what it
    sent read first, so that closing does not reset the connection before it reads the line."""
    try:
        conn.send(encode(done(code, text)))
        conn.recv(MAX_REQUEST)
    except OSError:
        pass
    conn.close()
