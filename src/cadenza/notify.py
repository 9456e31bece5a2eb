"""The sd_notify(3) protocol, both ways.

`Notifier` speaks to systemd (or to whoever set NOTIFY_SOCKET: our own master, for a worker).
`NotifyInbox` is the datagram socket a master gives its generation as NOTIFY_SOCKET; it reads
what workers say, with the sender's pid from SO_PASSCRED so that nobody can speak for a worker,
and drops unread what any other process sends (any user can reach an abstract socket).

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
from typing import Callable

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

    An abstract socket has no file permissions: any local user can send to it, which is what lets
    a worker's child running as another user (`setpriv --reuid nobody`, then systemd-notify) be
    heard at all. So a datagram is read further only when the sender its kernel-supplied
    credentials (SO_PASSCRED) name is one `receive()` accepts, and each wakeup reads at most
    `batch` of them, whoever sent them: a flood costs the master a bounded amount of work per
    turn of its level-triggered loop, and no memory.
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
        self._refused_ready: tuple[int, int, str] | None = None   # (pid, uid, command line), unlogged

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self, sender_of: Callable[[int], int | None] | None = None) -> list[tuple[int, dict[str, str]]]:
        """Up to `batch` queued datagrams, in order, as (pid, fields); the rest wait for the next
        call. `sender_of(pid)` names the process a sender speaks for (a worker, for its group and
        descendants; daemon/groups.py), or None to refuse it. It is asked before the next datagram
        is read: a sender that waits until its BARRIER=1 was read (systemd-notify does) is still
        there to be looked at. Without `sender_of`, this process's euid and root are accepted,
        each sender as itself. Refused datagrams, and those without credentials, are counted in
        `dropped` and not parsed; a refused READY=1 is logged with its sender's command line."""
        out = []
        view = memoryview(self._buf)
        verdicts: dict[int, int | None] = {}   # one look per sender and batch, however much it sends
        for _ in range(self.batch):
            try:
                size, ancdata, _flags, _addr = self.sock.recvmsg_into([self._buf], _ANCSIZE)
            except (BlockingIOError, InterruptedError):
                break
            creds = _credentials(ancdata)
            if size <= 16 and bytes(view[:size]).strip() == b"BARRIER=1":
                # sd_notify_barrier(3) is answered by reading it: its fd finds no room and the
                # kernel closes it. The sender goes on (systemd-notify exits) as soon as it is
                # read, so it could not be looked up any more: neither handed on nor counted.
                continue
            owner = None
            if creds is not None and creds[0] > 0:   # 0: a sender in a pid namespace we cannot see
                pid, uid = creds[0], creds[1]
                if sender_of is None:
                    owner = pid if uid in (0, self.uid) else None
                else:
                    if pid not in verdicts:
                        verdicts[pid] = sender_of(pid)
                    owner = verdicts[pid]
            if owner is None:
                self._drop(creds, size)
                continue
            out.append((owner, parse_fields(bytes(view[:size]))))
        if self._unlogged:
            self._log_drops("a worker of this generation or one of its descendants" if sender_of else
                            "root" if self.uid == 0 else f"uid {self.uid} or root")
        return out

    def _drop(self, creds: tuple[int, int, int] | None, size: int) -> None:
        self.dropped += 1
        self._unlogged += 1
        self._last_sender = (creds[1], creds[0]) if creds else None
        # Its command line is read now, while the sender may still run; once per logged line.
        if creds is not None and self._refused_ready is None and _says_ready(self._buf, size):
            command = command_line(creds[0]) if creds[0] > 0 else "in a pid namespace this master cannot see"
            self._refused_ready = (creds[0], creds[1], command)

    def _log_drops(self, allowed: str) -> None:
        now = _clock()
        if self._logged_at is not None and now - self._logged_at < DROP_LOG_INTERVAL:
            return
        if self._refused_ready is not None:
            pid, uid, command = self._refused_ready
            log.warning("notify socket %s: refused READY=1 from pid %d (uid %d, %s): not sent by %s; "
                        "dropped %d datagram(s) since the last line (%d in all)", self.address, pid, uid,
                        command, allowed, self._unlogged, self.dropped)
        else:
            if self._last_sender is None:
                last = "without sender credentials"
            else:
                uid, pid = self._last_sender
                last = f"from uid {uid} pid {pid}"
            log.warning("notify socket %s: dropped %d datagram(s) not sent by %s (%d in all); the last %s",
                        self.address, self._unlogged, allowed, self.dropped, last)
        self._logged_at = now
        self._unlogged = 0
        self._refused_ready = None

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


def _says_ready(buf: bytearray, size: int) -> bool:
    """Whether buf[:size] holds the line READY=1, without parsing (nor copying) it."""
    start = 0
    while (at := buf.find(b"READY=1", start, size)) >= 0:
        end = at + 7
        if (at == 0 or buf[at - 1] == 0x0A) and (end == size or buf[end] == 0x0A):
            return True
        start = end
    return False


def command_line(pid: int, limit: int = 200) -> str:
    """A process's command line for a log line: printable, bounded, never a second line (a
    sender chooses its own argv)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(limit * 4)
    except OSError:   # gone, or going (ESRCH)
        return "command line unknown: the process has gone"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return (text[:limit] + "…" if len(text) > limit else text) or "no command line"


def parse_fields(data: bytes) -> dict[str, str]:
    fields = {}
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields
