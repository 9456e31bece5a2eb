"""Where a master keeps its runtime files: the control socket's path, for the master that
makes it and for the client that looks for it (`cadenza run` works as any user, and two
instances side by side each have their own)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cadenza.config import Config


def user_runtime_dir() -> Path:
    """A user's own runtime directory: $XDG_RUNTIME_DIR when it is a directory of this user's
    (pam_systemd makes it, 0700), else /tmp/cadenza-UID (which the master makes 0700, and uses
    only when it is its user's alone, as tmux does)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid():
            return Path(xdg)
    return tmp_runtime_dir()


def tmp_runtime_dir() -> Path:
    return Path(f"/tmp/cadenza-{os.geteuid()}")


def run_control_socket(config: Config) -> Path:
    """Where a master puts its control socket: control.socket (or --control-socket), else
    /run/cadenza/NAME/control.sock for root and for a service whose RuntimeDirectory= made that
    writable, else the user's runtime directory: `cadenza run` works as any user."""
    system = config.control_socket
    if config.control.socket is not None or os.geteuid() == 0 or _may_create(system.parent):
        return system
    return user_runtime_dir() / "cadenza" / config.app.name / "control.sock"


def find_control_socket(config: Config) -> Path:
    """Where a client finds the master of `config`: the socket such a master run by this user
    would use when it is there, else the system one (also when neither is, for the message)."""
    here = run_control_socket(config)
    system = config.control_socket
    if here == system or os.path.lexists(here):
        return here
    return system if os.path.lexists(system) or os.path.lexists(system.parent) else here


def _may_create(directory: Path) -> bool:
    """Can this process make `directory` (or use it, when it exists)?"""
    for path in (directory, *directory.parents):
        if os.path.lexists(path):
            return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE)
    return False


_EFFECTIVE = os.access in os.supports_effective_ids
