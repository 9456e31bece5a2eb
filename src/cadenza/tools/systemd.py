"""Questions to systemd over D-Bus (pystemd), for the control tools. The master never imports this.

As root, systemd's private socket answers without a dbus-daemon (as systemctl does); otherwise
the system bus is used.
"""

from __future__ import annotations

import os

PRIVATE_BUS = b"unix:path=/run/systemd/private"
UNIT_PROPERTIES = ("ActiveState", "SubState", "MainPID", "NRestarts")


def _bus():
    from pystemd.dbuslib import DBus, DBusAddress
    if os.geteuid() == 0 and os.path.exists(PRIVATE_BUS[len(b"unix:path="):]):
        return DBusAddress(PRIVATE_BUS, peer_to_peer=True)
    return DBus()


def unit_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def unit_properties(unit: str, names=UNIT_PROPERTIES) -> dict:
    """{"ActiveState": "active", ...} or {"error": "..."}: status must work without systemd too."""
    try:
        from pystemd.dbusexc import DBusBaseError
        from pystemd.systemd1 import Unit
    except ImportError as exc:
        return {"error": f"pystemd is not installed: {exc}"}
    try:
        with _bus() as bus:
            u = Unit(unit_name(unit).encode(), bus=bus, _autoload=True)
            out = {}
            for name in names:
                value = getattr(u, name)
                out[name] = value.decode() if isinstance(value, bytes) else value
            return out
    except (DBusBaseError, OSError, AttributeError) as exc:
        return {"error": f"cannot ask systemd about {unit_name(unit)}: {exc}"}
