"""The sd_notify(3) protocol, both ways.

`Notifier` speaks to systemd (or to whoever set NOTIFY_SOCKET: our own master, for a worker).
`NotifyInbox` is the datagram socket a master gives its generation as NOTIFY_SOCKET; it reads
what workers say, with the sender's pid from SO_PASSCRED so that nobody can speak for a worker,
and drops unread what other users send (any of them can reach an abstract socket).

sdnotify is not used: it encodes as latin-1 (a STATUS= with a non-latin-1 release path is lost),
swallows every error (a lost MAINPID= must be noticed), and cannot pass fds (FDSTORE=1).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import time

log = logging.getLogger("cadenza.notify")

_UCRED = struct.Struct("3i")
_ANCSIZE = socket.CMSG_SPACE(_UCRED.size)   # room for the credentials and nothing else
MAX_DATAGRAM = 4096
BATCH = 64                 # datagrams read per wakeup of the master's loop
DROP_LOG_INTERVAL = 60.0   # seconds between two log lines about dropped datagrams
_clock = time.monotonic


class Notifier:
    """Sends state lines to NOTIFY_SOCKET; a no-op when the variable was not set."""

    def __init__(self, address: str | None):
        self.address = address
        # A new master stays muted until its predecessor made it main: under NotifyAccess=main
        # systemd would refuse (and log) everything it said before that.
        self.muted = False
        self.last_error: OSError | None = None   # why the last send or barrier failed
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None, consume: bool = True) -> "Notifier":
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) if consume else env.get("NOTIFY_SOCKET")
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> bool:
        """send(ready=1, status="…") sends "READY=1\\nSTATUS=…"; True when delivered."""
        if self._sock is None or self.muted:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode("utf-8", "replace"), _sockaddr(self.address))
        except OSError:
            return False
        return True

    def store_fds(self, named: list[tuple[int, str]]) -> bool:
        """FDSTORE=1 (sd_pid_notify_with_fds(3)): systemd keeps each fd under its name and passes it
        back in LISTEN_FDS/LISTEN_FDNAMES after a crash or restart, when FileDescriptorStoreMax=
        allows; otherwise it ignores them. True when every message was delivered."""
        if self._sock is None or self.muted:
            return False
        for fd, name in named:
            try:
                self._sock.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                                   0, _sockaddr(self.address))
            except OSError:
                return False
        return True

    def barrier(self) -> int | None:
        """sd_notify_barrier(3) without blocking: returns an fd that reaches EOF once systemd has
        processed everything sent before; None when it cannot be sent."""
        if self._sock is None or self.muted:
            return None
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._sock.sendmsg([b"BARRIER=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))],
                               0, _sockaddr(self.address))
        except OSError as exc:
            self.last_error = exc
            os.close(r)
            return None
        finally:
            os.close(w)
        return r

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _sockaddr(address: str) -> str | bytes:
    # "@name" is a socket in the abstract namespace (sd_notify(3)).
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class NotifyInbox:
    """A generation's own NOTIFY_SOCKET, in the abstract namespace so nothing is left on disk.

    An abstract socket has no file permissions: any local user can send to it. So only datagrams
    whose kernel-supplied credentials (SO_PASSCRED) name this process's euid or root are read
    further, and each wakeup reads at most `batch` of them, whoever sent them: a flood costs the
    master a bounded amount of work per turn of its level-triggered loop, and no memory.
    """

    def __init__(self, label: str, batch: int = BATCH):
        # os.urandom, not the secrets module: that one loads OpenSSL, megabytes in every master.
        self.address = f"@cadenza/{label}/{os.getpid()}/{os.urandom(4).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # No SO_RCVBUF: an AF_UNIX datagram socket does not count its queue against it. The queue
        # holds at most net.unix.max_dgram_qlen datagrams (systemd sets 512), each charged to its
        # sender's SO_SNDBUF; a sender that finds it full waits or gets EAGAIN.
        self.sock.bind(_sockaddr(self.address))
        self.batch = batch
        self.uid = os.geteuid()
        self.dropped = 0                 # datagrams not read: another user's, or no credentials
        self._buf = bytearray(MAX_DATAGRAM)
        self._unlogged = 0               # dropped since the last log line
        self._logged_at: float | None = None
        self._last_sender: tuple[int, int] | None = None   # (uid, pid) of the last dropped one

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Up to `batch` queued datagrams as (sender pid, fields); the rest wait for the next
        call. Datagrams from another uid than this process's euid or root, or without
        credentials, are dropped unparsed and counted in `dropped`."""
        out = []
        view = memoryview(self._buf)
        for _ in range(self.batch):
            try:
                size, ancdata, _flags, _addr = self.sock.recvmsg_into([self._buf], _ANCSIZE)
            except (BlockingIOError, InterruptedError):
                break
            creds = _credentials(ancdata)
            if creds is None or creds[1] not in (0, self.uid):
                self._drop(creds)
                continue
            out.append((creds[0], parse_fields(bytes(view[:size]))))
        if self._unlogged:
            self._log_drops()
        return out

    def _drop(self, creds: tuple[int, int, int] | None) -> None:
        self.dropped += 1
        self._unlogged += 1
        self._last_sender = (creds[1], creds[0]) if creds else None

    def _log_drops(self) -> None:
        now = _clock()
        if self._logged_at is not None and now - self._logged_at < DROP_LOG_INTERVAL:
            return
        if self._last_sender is None:
            last = "without sender credentials"
        else:
            uid, pid = self._last_sender
            last = f"from uid {uid} pid {pid}"
        allowed = "root" if self.uid == 0 else f"uid {self.uid} or root"
        log.warning("notify socket %s: dropped %d datagram(s) not sent by %s (%d in all); the last %s",
                    self.address, self._unlogged, allowed, self.dropped, last)
        self._logged_at = now
        self._unlogged = 0

    def close(self) -> None:
        self.sock.close()


def _credentials(ancdata) -> tuple[int, int, int] | None:
    """(pid, uid, gid) from SCM_CREDENTIALS; closes any fds that came along."""
    creds = None
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            creds = _UCRED.unpack_from(payload)
        elif kind == socket.SCM_RIGHTS:
            # _ANCSIZE leaves no room for any, so the kernel discards them (MSG_CTRUNC); should
            # one arrive all the same, do not keep it.
            fds = array.array("i")
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
    return creds


def parse_fields(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields
