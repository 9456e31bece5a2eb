"""Who may use the control socket: the peer's credentials, as the kernel took them at connect()
(SO_PEERCRED, SO_PEERGROUPS), ranked against `allow_users`, `allow_groups` and `status_groups`."""

from __future__ import annotations

import array
import grp
import logging
import os
import pwd
import socket
import struct
from pathlib import Path

log = logging.getLogger("cadenza.control")

FULL, READER = "full", "read-only"

# Linux >= 4.13. Python does not name it; 59 is its number where asm-generic/socket.h rules.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59 if os.uname().machine in (
    "x86_64", "i686", "aarch64", "armv7l", "riscv64", "ppc64le", "s390x") else None)
_UCRED = struct.Struct("3i")


class Access:
    def __init__(self, allow_users=(), allow_groups=(), status_groups=()):
        self.uids = {os.geteuid(), 0} | {_uid(name) for name in allow_users} - {None}
        self.gids = {_gid(name) for name in allow_groups} - {None}
        self.status_gids = {_gid(name) for name in status_groups} - {None}

    def rank(self, uid: int, groups: set[int]) -> str | None:
        """FULL, READER or None (refused), for a peer with this uid and these groups."""
        if uid in self.uids or groups & self.gids:
            return FULL
        return READER if groups & self.status_gids else None


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


def peer_credentials(sock: socket.socket) -> tuple[int, int, set[int]]:
    """(pid, uid, groups) of the peer as the kernel saw it at connect(): primary and
    supplementary groups from SO_PEERGROUPS, not from /proc/PID, which a peer that exits (and
    a pid that is reused) would make lie."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    try:   # Python caps the buffer at 1024 bytes: 256 groups; a peer in more gets ERANGE
        if SO_PEERGROUPS is None:
            raise OSError("SO_PEERGROUPS unknown here")
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:   # that, or a kernel without SO_PEERGROUPS
        return pid, uid, {gid} | _proc_groups(pid)
    return pid, uid, {gid} | set(array.array("I", raw[: len(raw) // 4 * 4]))


def _proc_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
