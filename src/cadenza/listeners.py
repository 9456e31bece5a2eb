"""Listening sockets: adopted from systemd (sd_listen_fds(3)) or bound from addresses.

A listener is handed on by fd number, never re-created: workers and the next generation
receive the very same kernel sockets as fds 3..n, so no connection is ever refused while
processes come and go.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
from .records import record
from pathlib import Path

LISTEN_FDS_START = 3
BACKLOG = 1024
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

log = logging.getLogger("cadenza")


class ListenerError(Exception):
    """A listener could not be adopted or bound; the message says which and why."""


@record(frozen=True)
class Address:
    family: int                  # AF_UNSPEC: `host` is a name, resolved when it is bound
    host: str = ""
    port: int = 0
    path: str = ""
    mode: int | None = None

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.path}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@record
class Listener:
    sock: socket.socket
    name: str
    closed_as: str = ""     # its address once closed: a stopping master still names it

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def describe(self) -> str:
        return self.closed_as or describe_socket(self.sock)

    def close(self) -> None:
        """Close this process's copy; the socket lives on while another process holds one."""
        if not self.closed_as:
            self.closed_as = self.describe()
            self.sock.close()


def parse_address(text: str) -> Address:
    """Parse `host:port`, `[v6]:port`, `:port`, `name:port`, `unix:/path` or `unix:/path;mode=0660`."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected an address such as 127.0.0.1:8000, [::1]:8000 or unix:/run/app.sock")
    if text.startswith("unix:"):
        path, _, opts = text[5:].partition(";")
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {path!r}")
        mode = None
        if opts:
            key, _, value = opts.partition("=")
            if key != "mode":
                raise ValueError(f"unknown unix socket option {key!r}; the only option is mode=0660")
            try:
                mode = int(value, 8)
            except ValueError:
                raise ValueError(f"unix socket mode must be octal such as 0660, got {value!r}") from None
            if not 0 <= mode <= 0o777:
                raise ValueError(f"unix socket mode must be between 0000 and 0777, got {value}")
        return Address(socket.AF_UNIX, path=path, mode=mode)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"IPv6 address must look like [::1]:8000, got {text!r}")
        family = socket.AF_INET6
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"address needs a port, such as 127.0.0.1:8000, got {text!r}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port!r} in {text!r}")
    if family == socket.AF_INET and not host:
        host = "0.0.0.0"
    try:
        socket.inet_pton(family, host)
    except OSError:
        if family == socket.AF_INET and _is_host_name(host):
            return Address(socket.AF_UNSPEC, host=host, port=int(port))
        raise ValueError(f"{host!r} is neither a numeric IP address nor a host name (in {text!r})") from None
    return Address(family, host=host, port=int(port))


def _is_host_name(text: str) -> bool:
    # RFC 1123 labels; a last label of digits only is a mistyped IPv4 address, not a name.
    labels = text.removesuffix(".").split(".")
    return len(text) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def resolve(address: Address) -> list[Address]:
    """A host name's addresses (getaddrinfo(3), each once, in its order); any other address as is."""
    if address.family != socket.AF_UNSPEC:
        return [address]
    try:
        infos = socket.getaddrinfo(address.host, address.port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ListenerError(f"cannot listen on {address}: the host name {address.host!r} does not resolve "
                            f"({reason}); use a numeric address such as 127.0.0.1:{address.port} or "
                            f"[::1]:{address.port}, or a name /etc/hosts knows") from exc
    found: list[Address] = []
    for family, _type, _proto, _name, sockaddr in infos:
        each = Address(family, host=sockaddr[0], port=address.port)
        if family in (socket.AF_INET, socket.AF_INET6) and each not in found:
            found.append(each)
    if not found:
        raise ListenerError(f"cannot listen on {address}: the host name {address.host!r} has no IPv4 or "
                            "IPv6 address; use a numeric address")
    return found


def bind_all(texts: list[str], origins: list[str]) -> list[Listener]:
    """Listen on every address, named listen-1..n; a host name on each address it resolves to
    (localhost: 127.0.0.1 and ::1), skipping those this machine lacks (no IPv6) as long as one
    is bound. On a failure nothing stays bound, and the error names the address's origin (the
    flag or the key it was given by)."""
    listeners: list[Listener] = []
    seen: dict[tuple, str] = {}
    try:
        for text, origin in zip(texts, origins):
            try:
                address = parse_address(text)
                resolved = resolve(address)
            except (ValueError, ListenerError) as exc:
                raise ListenerError(f"{origin}: {exc}") from exc
            missing = [problem for each in resolved
                       if (problem := _bind_one(each, address, origin, listeners, seen))]
            if len(missing) == len(resolved):
                raise ListenerError(f"{origin}: cannot listen on {text}: none of its addresses is "
                                    f"configured here: {', '.join(missing)}")
            if missing:
                log.warning("%s: not listening on %s: not configured on this machine", origin,
                            ", ".join(missing))
    except ListenerError:
        for listener in listeners:
            listener.sock.close()
        raise
    return listeners


def _bind_one(each: Address, given: Address, origin: str, listeners: list[Listener],
              seen: dict[tuple, str]) -> str | None:
    """Bind one resolved address onto `listeners`; what was missing when a name's address is not
    configured here (EADDRNOTAVAIL, EAFNOSUPPORT: ::1 without IPv6), else None."""
    same = (each.family, each.path) if each.path else (each.family, socket.inet_pton(each.family, each.host),
                                                       each.port)
    if same in seen:
        raise ListenerError(f"{origin}: {given} is {each}, which {seen[same]} names already; "
                            "list each address once")
    seen[same] = origin
    try:
        listeners.append(bind(each, f"listen-{len(listeners) + 1}"))
    except ListenerError as exc:
        cause = exc.__cause__
        if given.family != socket.AF_UNSPEC or not isinstance(cause, OSError) or \
                cause.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise ListenerError(f"{origin}: {exc}") from exc
        return f"{each} ({cause.strerror})"
    return None


def bind(address: Address, name: str) -> Listener:
    """Listen on `address`. `name` goes into LISTEN_FDNAMES, so it must not contain ":"."""
    sock = None
    try:
        sock = socket.socket(address.family, socket.SOCK_STREAM)
        if address.family == socket.AF_UNIX:
            _bind_unix(sock, address)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ListenerError(f"cannot listen on {address}: {exc.strerror or exc}"
                            f"{_bind_hint(exc)}") from exc
    sock.set_inheritable(False)
    return Listener(sock, name)


def _bind_unix(sock: socket.socket, address: Address) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(address.path).st_mode):
            os.unlink(address.path)  # a stale socket of an earlier run; nothing listens on it
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o177) if address.mode is not None else None
    try:
        sock.bind(address.path)
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if address.mode is not None:
        os.chmod(address.path, address.mode)


def _bind_hint(exc: OSError) -> str:
    import errno
    hints = {
        errno.EADDRINUSE: "; another process listens there: stop it or pick another address",
        errno.EACCES: "; ports below 1024 need root or CAP_NET_BIND_SERVICE, or use socket activation",
        errno.EADDRNOTAVAIL: "; that IP address is not configured on this machine",
        errno.ENOENT: "; the socket's directory does not exist",
    }
    return hints.get(exc.errno, "")


def adopt_from_env(environ: dict[str, str] | None = None) -> list[Listener]:
    """Take the fds systemd passed (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES) and consume the variables.

    Returns [] when the variables are absent or meant for another process (LISTEN_PID).
    """
    env = os.environ if environ is None else environ
    fds_text = env.pop("LISTEN_FDS", None)
    pid_text = env.pop("LISTEN_PID", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if fds_text is None:
        return []
    try:
        count = int(fds_text)
        pid = int(pid_text) if pid_text is not None else None
    except ValueError:
        raise ListenerError(f"LISTEN_FDS={fds_text!r} LISTEN_PID={pid_text!r} are not numbers; "
                            "they should be set by systemd's socket activation") from None
    if pid is not None and pid != os.getpid():
        return []
    if count < 0 or count > 4096:
        raise ListenerError(f"LISTEN_FDS={count} is out of range")
    names = names_text.split(":") if names_text else []
    listeners = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        listeners.append(_adopt_fd(fd, names[i] if i < len(names) else f"fd{fd}"))
    return listeners


def _adopt_fd(fd: int, name: str) -> Listener:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(f"LISTEN_FDS names fd {fd} ({name}) but it is not an open socket: {exc}") from exc
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        sock.detach()
        raise ListenerError(f"fd {fd} ({name}) from systemd is not a TCP or unix stream socket; "
                            "use ListenStream= in the .socket unit")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ListenerError(f"fd {fd} ({name}) from systemd is not listening; set Accept=no in the .socket unit")
    sock.set_inheritable(False)
    return Listener(sock, name)


def describe_socket(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def unix_paths(listeners: list[Listener]) -> list[Path]:
    return [Path(listener.describe()[5:]) for listener in listeners if listener.sock.family == socket.AF_UNIX]
