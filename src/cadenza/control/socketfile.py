"""The control socket's file: made under a directory that is the master's alone when it has to
be, a stale socket of a dead master replaced, a live one never taken (the check and the bind
happen under a lock on the directory, so two masters started at once cannot both win)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path


class ControlError(Exception):
    pass


PROBE_TIMEOUT = 2.0     # a live master's full accept queue makes connect() wait: it is alive
OWN_SOCKET = ("give this one a socket of its own: `cadenza run --control-socket PATH` (or --name NAME), "
              "or [control] socket in cadenza.toml")


def bind_socket(path: Path, private: Path | None = None) -> socket.socket:
    """Listen on `path` (mode 0660), replacing a stale socket but never a live master's. The
    check and the bind happen under a lock on the directory, so of two masters started at once
    on the same path one gets it and the other is told, instead of one unlinking the other's.
    `private`: an ancestor in a directory anyone may write to (/tmp/cadenza-UID), which must be
    this user's alone."""
    try:
        if private is not None:
            _make_private(private)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ControlError(_cannot_create(path, exc)) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_stale(path)
        return _listen(path)
    except OSError as exc:   # a stale socket that cannot be removed (another user's, in a sticky dir)
        raise ControlError(_cannot_create(path, exc)) from exc
    finally:
        os.close(lock)


def _make_private(directory: Path) -> None:
    # Anyone could have made it first, as a directory or symlink of their own, to catch the socket.
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise ControlError(f"{directory} is not this user's own private directory (it is {kind} of uid "
                           f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}; expected uid {os.geteuid()}, "
                           f"mode 0700), so the control socket is not made there; remove it, set "
                           "$XDG_RUNTIME_DIR, or " + OWN_SOCKET)


def _remove_stale(path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ControlError(f"control socket {path} exists and is not a socket; remove it, or {OWN_SOCKET}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)   # nothing listens: a master that ended without removing it
        return
    except OSError as exc:
        if not isinstance(exc, TimeoutError):
            raise ControlError(f"control socket {path} exists and cannot be checked ({exc.strerror or exc}): "
                               f"another user's master may serve it; {OWN_SOCKET}") from exc
    finally:
        probe.close()
    raise ControlError(f"another master already serves control socket {path}; stop it first, or {OWN_SOCKET}")


def _listen(path: Path) -> socket.socket:
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
            "or point [control] socket (--control-socket PATH for `cadenza run`) at a writable directory")
