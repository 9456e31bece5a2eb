"""`supervisorctl doctor`: what in the unit or the running service would break an upgrade, with the fix.

It reads the unit's settings from systemd (pystemd) and the running master's state (control
socket). Each finding is (problem, fix); none means an upgrade has what it needs.
"""

from __future__ import annotations

import os

from .systemd import unit_name, unit_properties

UNIT_SETTINGS = ("Type", "NotifyAccess", "ExecReload", "KillMode", "Restart", "TimeoutStartUSec",
                 "WorkingDirectory", "TriggeredBy", "ActiveState")
SIGNAL_COMMANDS = {"kill", "pkill", "killall", "systemd-notify"}


def _words(value) -> list[str]:
    """pystemd gives ExecReload as [(path, argv, ...), ...] with bytes inside."""
    out = []
    for entry in value or []:
        argv = entry[1] if len(entry) > 1 else [entry[0]]
        out.append(" ".join(a.decode() if isinstance(a, bytes) else str(a) for a in argv))
    return out


def check_unit(unit: str, props: dict, status: dict | None) -> list[tuple[str, str]]:
    name = unit_name(unit)
    found = []
    if props.get("Type") not in (None, "notify"):
        found.append((f"{name}: Type={props['Type']}; cadenza reports readiness with sd_notify",
                      "set Type=notify"))
    if props.get("NotifyAccess") not in (None, "main", "all"):
        found.append((f"{name}: NotifyAccess={props['NotifyAccess']}: systemd would refuse the MAINPID= hand-off",
                      "set NotifyAccess=main"))
    reloads = _words(props.get("ExecReload"))
    if not reloads:
        found.append((f"{name}: no ExecReload=: `systemctl reload` cannot upgrade",
                      "set ExecReload=ROOT/shared/bin/supervisorctl upgrade"))
    for cmd in reloads:
        if os.path.basename(cmd.split()[0]) in SIGNAL_COMMANDS:
            found.append((f"{name}: ExecReload={cmd} only sends a signal: `systemctl reload` succeeds at once, "
                          "even when the upgrade fails", "set ExecReload=ROOT/shared/bin/supervisorctl upgrade"))
    if props.get("KillMode") == "control-group":
        found.append((f"{name}: KillMode=control-group: `systemctl stop` signals every worker at once, "
                      "they cannot drain through their master", "set KillMode=mixed"))
    if props.get("Restart") == "always" and not props.get("TriggeredBy"):
        found.append((f"{name}: Restart=always without a socket unit: a restart refuses connections "
                      "while nothing listens", "add APP.socket (cadenza units) or use Restart=on-failure"))
    wd = props.get("WorkingDirectory") or ""
    if wd and not wd.startswith("!"):
        found.append((f"{name}: WorkingDirectory={wd} without '-': once its release is pruned every "
                      "reload fails at CHDIR", f"set WorkingDirectory=-{wd}"))
    if status:
        found += _check_status(name, props, status)
    return found


def _check_status(name: str, props: dict, status: dict) -> list[tuple[str, str]]:
    found = []
    needed = status.get("upgrade_timeout", 0) + status.get("graceful_timeout", 0)
    timeout = props.get("TimeoutStartUSec")
    if isinstance(timeout, int) and 0 < timeout < needed * 1e6:
        found.append((f"{name}: TimeoutStartSec={timeout / 1e6:g}s is shorter than upgrade.timeout + "
                      f"graceful_timeout ({needed:g}s): systemd would fail a slow reload on its own",
                      f"set TimeoutStartSec={int(needed) + 30}"))
    if not status.get("release_exists", True):
        found.append((f"the running generation's release {status['release']} is deleted: a worker respawn "
                      "still works (the code is loaded), but nothing can be read from it",
                      "upgrade now: systemctl reload"))
    elif status.get("current") and status.get("current") != status.get("release"):
        found.append((f"the running release {status['release']} is not current ({status['current']}): "
                      "the next prune deletes it", "systemctl reload, then prune"))
    if status.get("pinned_problem"):
        found.append((status["pinned_problem"], "cadenza pin --root ROOT (as root), chmod go-w on its directories"))
    return found


def systemd_version_findings(version: str) -> list[tuple[str, str]]:
    try:
        major = int(version.split()[0].split(".")[0].split("~")[0])
    except (ValueError, IndexError):
        return [(f"cannot read systemd's version ({version!r})", "check that systemd answers on D-Bus")]
    if major < 240:
        return [(f"systemd {major} is older than 240: MAINPID= hand-off and RELOADING=1 are not reliable",
                 "run on systemd 240 or newer")]
    return []


def diagnose(unit: str, status: dict | None) -> tuple[list[tuple[str, str]], dict]:
    props = unit_properties(unit, UNIT_SETTINGS)
    if "error" in props:
        return [(props["error"], "run as root on the host of the unit, or pass -u UNIT")], props
    found = check_unit(unit, props, status)
    version = _manager_version()
    if version:
        found += systemd_version_findings(version)
    return found, {**props, "Version": version}


def _manager_version() -> str:
    try:
        from pystemd.systemd1 import Manager
        from .systemd import _bus
        with _bus() as bus:
            m = Manager(bus=bus, _autoload=True)
            value = m.Manager.Version
            return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # noqa: BLE001 - the version is a nicety; the unit checks already ran
        return ""
