"""The sd_notify(3) protocol, both ways.

`Notifier` speaks to systemd (or to whoever set NOTIFY_SOCKET: our own master, for a worker).
`NotifyInbox` is the datagram socket a master gives its generation as NOTIFY_SOCKET; it reads
what workers say, with the sender's pid from SO_PASSCRED so that nobody can speak for a worker.

sdnotify is not used: it encodes as latin-1 (a STATUS= with a non-latin-1 release path is lost),
swallows every error (a lost MAINPID= must be noticed), and cannot pass fds (FDSTORE=1).
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time

_UCRED = struct.Struct("3i")
MAX_DATAGRAM = 4096


class Notifier:
    """Sends state lines to NOTIFY_SOCKET; a no-op when the variable was not set."""

    def __init__(self, address: str | None):
        self.address = address
        # A new master stays muted until its predecessor made it main: under NotifyAccess=main
        # systemd would refuse (and log) everything it said before that.
        self.muted = False
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
        except OSError:
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
    """A generation's own NOTIFY_SOCKET, in the abstract namespace so nothing is left on disk."""

    def __init__(self, label: str):
        # os.urandom, not the secrets module: that one loads OpenSSL, megabytes in every master.
        self.address = f"@cadenza/{label}/{os.getpid()}/{os.urandom(4).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(_sockaddr(self.address))

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[tuple[int, dict[str, str]]]:
        """Everything queued now, as (sender pid, fields); datagrams without credentials are dropped."""
        out = []
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return out
            pid = _sender_pid(ancdata)
            if pid is not None:
                out.append((pid, parse_fields(data)))

    def close(self) -> None:
        self.sock.close()


def _sender_pid(ancdata) -> int | None:
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            return _UCRED.unpack_from(payload)[0]
    return None


def parse_fields(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields
