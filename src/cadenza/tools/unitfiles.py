"""`cadenza units`: APP.service and APP.socket rendered from the templates in units/.

One source: the rendered units are the templates `cadenza@.service` / `cadenza@.socket` with
the instance filled in, the root moved from /srv/APP to --root, the listeners and the user set,
and the timeouts derived from the app's own config, so that `systemctl reload APP` never outlives
TimeoutStartSec= (which also bounds reloads, systemd.service(5)).
"""

from __future__ import annotations

import grp
import math
import os
import pwd
import re
import socket
from pathlib import Path

from .. import config as C
from ..listeners import parse_address

TEMPLATES = Path(__file__).parent.parent / "units"
MARGIN = 30
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


class UnitError(Exception):
    pass


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


def _listen_lines(addresses: list[str]) -> list[str]:
    lines = []
    for text in addresses:
        try:
            addr = parse_address(text)
        except ValueError as exc:
            raise UnitError(f"--listen {text}: {exc}") from None
        if addr.family == socket.AF_UNSPEC:   # systemd.socket(5): ListenStream= takes no host names
            raise UnitError(f"--listen {text}: ListenStream= takes a numeric address, not a host name; "
                            f"use 127.0.0.1:{addr.port} or [::1]:{addr.port} (repeat --listen for both)")
        if addr.family == socket.AF_UNIX:
            lines.append(f"ListenStream={addr.path}")
            if addr.mode is not None:
                lines.append(f"SocketMode={addr.mode:04o}")
        else:
            lines.append(f"ListenStream={addr}")
    return lines


def timeouts(root: Path) -> tuple[int, int]:
    """(TimeoutStartSec, TimeoutStopSec) from ROOT/current/cadenza.toml, else the defaults."""
    cfg_path = C.discover(None, root / "current")
    cfg = C.defaults()
    if cfg_path is not None:
        try:
            cfg = C.load(cfg_path)
        except C.ConfigError as exc:
            raise UnitError(f"cannot derive the timeouts from {cfg_path}:\n{exc}") from None
    graceful, upgrade = cfg.workers.graceful_timeout, cfg.upgrade
    start = max(upgrade.timeout, cfg.workers.ready_timeout) + graceful + MARGIN
    if upgrade.canary:   # judged after canary_duration, then grown one worker at a time, each in upgrade.timeout
        start += upgrade.canary_duration + max(cfg.workers.count - upgrade.canary, 0) * upgrade.timeout
    return math.ceil(start), math.ceil(graceful + MARGIN)


def render(name: str, root: Path, listen: list[str] | None = None, user: str | None = None) -> dict[str, str]:
    if not _NAME.match(name) or name.startswith("-"):
        raise UnitError(f"--name {name!r}: use letters, digits and _ . : - only (it becomes {name}.service)")
    root = Path(os.path.abspath(root))
    start, stop = timeouts(root)
    units = {}
    for kind in ("service", "socket"):
        text = template(f"cadenza@.{kind}")
        text = text.replace("/srv/%i", str(root)).replace("cadenza@%i.", f"{name}.").replace("%i", name)
        units[f"{name}.{kind}"] = text
    service = units[f"{name}.service"]
    service = re.sub(r"^TimeoutStartSec=.*$", f"TimeoutStartSec={start}", service, flags=re.M)
    service = re.sub(r"^TimeoutStopSec=.*$", f"TimeoutStopSec={stop}", service, flags=re.M)
    if user:
        service = service.replace("[Service]\n", f"[Service]\n{_user_lines(user)}", 1)
    units[f"{name}.service"] = service
    if listen:
        sock = units[f"{name}.socket"]
        sock = re.sub(r"^ListenStream=.*\n", "", sock, flags=re.M)
        sock = sock.replace("[Socket]\n", "[Socket]\n" + "".join(f"{line}\n" for line in _listen_lines(listen)), 1)
        units[f"{name}.socket"] = sock
    return units


def _user_lines(user: str) -> str:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise UnitError(f"--user {user}: no such user on this machine; create it first "
                        f"(useradd --system {user})") from None
    group = grp.getgrgid(entry.pw_gid).gr_name
    return f"User={user}\nGroup={group}\n"


def write(units: dict[str, str], outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in units.items():
        path = outdir / filename
        tmp = path.with_name(f".{filename}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written
