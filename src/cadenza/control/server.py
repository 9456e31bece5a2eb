"""The control socket (DESIGN §5): unix stream, JSON lines, one request per connection.

A client sends one line `{"cmd": "status" | "upgrade" | "restart" | "scale" | "stop", ...}` and
reads events, one JSON object per line, until `{"done": true, "ok": ..., "code": ...}` and EOF.
Who may do what is decided by SO_PEERCRED: root and the service user everything, `allow_users`
and `allow_groups` too, `status_groups` only `status`; everyone else is told "permission
denied" and logged with uid and pid.

Garbage costs the master nothing: a line longer than MAX_REQUEST, a client that sends nothing
for REQUEST_TIMEOUT or reads nothing while MAX_PENDING bytes wait for it, and connections beyond
MAX_CLIENTS are dropped; every socket is non-blocking and lives in the master's one selector.
"""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
from pathlib import Path

log = logging.getLogger("cadenza.control")

from .protocol import COMMANDS, DENIED, MAX_REQUEST, OK, READ_ONLY, USAGE

MAX_PENDING = 1 << 20
MAX_CLIENTS = 64
REQUEST_TIMEOUT = 5.0
ACCEPT_PAUSE = 1.0      # after accept() found no free file descriptor
_UCRED = struct.Struct("3i")



class ControlError(Exception):
    pass


def bind_socket(path: Path) -> socket.socket:
    """Listen on `path` (mode 0660), replacing a stale socket but never a live master's."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise ControlError(_cannot_create(path, exc)) from exc
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ControlError(f"control socket {path} exists and is not a socket; remove it or set control.socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise ControlError(f"another master already serves control socket {path}; stop it first "
                               "or give this app another [control] socket")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(_cannot_create(path, exc)) from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    sock.listen(64)
    sock.set_inheritable(False)
    return sock


def _cannot_create(path: Path, exc: OSError) -> str:
    where = path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"{where} is full (see `df -h {where}` and `df -i {where}`): free space there"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = (f"{where} is not writable by this service: use the unit's RuntimeDirectory= "
               f"(/run/cadenza/APP) or make {where} writable for its user")
    else:
        fix = "check the directory"
    return (f"cannot create control socket {path}: {exc.strerror or exc}; {fix}, "
            "or point [control] socket at a writable directory")


class Access:
    def __init__(self, allow_users=(), allow_groups=(), status_groups=()):
        self.uids = {os.geteuid(), 0} | {_uid(name) for name in allow_users} - {None}
        self.gids = {_gid(name) for name in allow_groups} - {None}
        self.status_gids = {_gid(name) for name in status_groups} - {None}

    def allows(self, uid: int, pid: int, cmd: str) -> bool:
        if uid in self.uids:
            return True
        groups = _groups_of(pid)
        if groups & self.gids:
            return True
        return cmd in READ_ONLY and bool(groups & self.status_gids)


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        log.warning("control.allow_users: no user %r on this machine; ignored", name)
        return None


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("control: no group %r on this machine; ignored", name)
        return None


def _groups_of(pid: int) -> set[int]:
    """Primary and supplementary groups of the peer (SO_PEERCRED gives only the primary one)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Gid:"):
                gids = {int(line.split()[1])}
            elif line.startswith("Groups:"):
                return gids | {int(g) for g in line.split()[1:]}
    except (OSError, ValueError, UnboundLocalError):
        pass
    return set()


class Client:
    """One connection: reads one request line, then writes events until done."""

    def __init__(self, server: "ControlServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.closing = False
        self.closed = False
        self.request: dict | None = None
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        self.pid, self.uid, self.gid = pid, uid, gid
        self.timer = server.host.timers.after(REQUEST_TIMEOUT, self._request_timeout)

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid}"

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            if self.request is None:
                self.close()
            return
        if self.request is not None:
            return   # one request per connection; anything more is ignored
        self.inbuf += data
        if b"\n" not in self.inbuf:
            if len(self.inbuf) > MAX_REQUEST:
                self.finish(USAGE, f"request longer than {MAX_REQUEST} bytes")
            return
        line = self.inbuf.split(b"\n", 1)[0]
        self.timer.cancel()
        self.server.handle(self, line)

    def _request_timeout(self) -> None:
        if self.request is None and not self.closed:
            self.finish(USAGE, f"no request within {REQUEST_TIMEOUT:g}s")

    def send(self, message: dict) -> None:
        if self.closed:
            return
        self.outbuf += json.dumps(message).encode() + b"\n"
        if len(self.outbuf) > MAX_PENDING:
            log.warning("control client %s reads nothing; dropped", self.describe())
            self.close()
            return
        self.flush()

    def finish(self, code: int, text: str = "", **extra) -> None:
        self.send({"done": True, "ok": code == OK, "code": code, "text": text, **extra})
        self.closing = True
        self.flush()

    def flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                sent = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                self.server.want_write(self, True)
                return
            except OSError:
                self.close()
                return
            self.outbuf = self.outbuf[sent:]
        self.server.want_write(self, False)
        if self.closing and not self.outbuf:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.timer.cancel()
            self.server.forget(self)
            self.sock.close()


class ControlServer:
    def __init__(self, host, sock: socket.socket, access: Access):
        self.host = host           # the master: selector, timers, and the commands below
        self.sock = sock
        self.access = access
        self.clients: dict[int, Client] = {}
        self.accepting = True
        sock.setblocking(False)
        host.selector.register(sock, 1, self._on_accept)

    def _on_accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # The connection stays queued and would wake the loop again at once: pause.
                    log.error("control socket: out of file descriptors (%s); not accepting for %gs. "
                              "Raise LimitNOFILE= in the unit", exc.strerror, ACCEPT_PAUSE)
                    self._unregister()
                    self.host.timers.after(ACCEPT_PAUSE, self._resume)
                return
            if len(self.clients) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            client = Client(self, conn)
            self.clients[conn.fileno()] = client
            self.host.selector.register(conn, 1, client.on_readable)

    def want_write(self, client: Client, on: bool) -> None:
        events = 1 | 2 if on else 1
        try:
            self.host.selector.modify(client.sock, events, client.flush if on else client.on_readable)
        except (KeyError, ValueError):
            pass

    def forget(self, client: Client) -> None:
        fd = client.sock.fileno()
        if self.clients.get(fd) is client:
            del self.clients[fd]
            try:
                self.host.selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass

    def handle(self, client: Client, line: bytes) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError("expected an object with a string \"cmd\"")
        except ValueError as exc:
            client.request = {}
            client.finish(USAGE, f"malformed request: {exc}")
            return
        client.request = request
        cmd = request["cmd"]
        if cmd not in COMMANDS:
            client.finish(USAGE, f"unknown command {cmd!r}; commands: {', '.join(sorted(COMMANDS))}")
            return
        if not self.access.allows(client.uid, client.pid, cmd):
            log.warning("control: %s denied to uid %d (pid %d)", cmd, client.uid, client.pid)
            client.finish(DENIED, f"permission denied: uid {client.uid} may not {cmd}")
            return
        log.info("control: %s from %s", cmd, client.describe())
        self.host.control_command(client, cmd, request)

    def _resume(self) -> None:
        if self.accepting:
            self.host.selector.register(self.sock, 1, self._on_accept)

    def _unregister(self) -> None:
        try:
            self.host.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def stop_accepting(self) -> None:
        self.accepting = False
        self._unregister()

    def close(self) -> None:
        for client in list(self.clients.values()):
            client.close()
        self.stop_accepting()
