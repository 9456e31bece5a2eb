"""What each control command does to the master, and what the caller hears.

Every command answers with events and ends with one "done" carrying supervisorctl's exit code
(control.OK/FAILED/USAGE). A command that changes something waits until the change happened —
or failed — before it says done: a control plane that reports "sent" is not one (puma #563).
"""

from __future__ import annotations

import os
import time

from . import protocol as control
from .. import succession as preflight


def run(master, client, cmd: str, request: dict) -> None:
    {"status": status, "upgrade": upgrade, "restart": restart, "scale": scale, "stop": stop}[cmd](
        master, client, request)


def status(master, client, request: dict) -> None:
    client.finish(control.OK, status=describe(master))


def upgrade(master, client, request: dict) -> None:
    no_wait = bool(request.get("no_wait"))

    def watch(event: dict) -> None:
        client.send(event)
        kind = event["event"]
        if kind in ("failed", "refused"):
            client.finish(control.FAILED, event["text"], output=event.get("output", []))
        elif kind == "started" and no_wait:
            client.finish(control.OK, "upgrade started; not waiting (--no-wait)")
        elif kind == "mainpid":
            # Done when this (old) generation has drained: the caller's connection ends with it.
            master.wait_until(lambda: master.exit_code is not None, lambda: client.finish(
                control.OK, f"generation {event['generation']} serves; generation {master.generation} drained"))
    master.request_upgrade(f"supervisorctl ({client.describe()})", watch)


def restart(master, client, request: dict) -> None:
    if master.state != "serving" or master.rolling:
        client.finish(control.FAILED, f"cannot restart: generation {master.generation} is {master.state}"
                                      f"{' and a rolling restart is running' if master.rolling else ''}")
        return
    before = {s.id: s.worker.pid for s in master.slots.values() if s.worker}
    master.on_hup()
    client.send({"event": "progress", "text": f"rolling restart of {len(before)} worker(s)"})

    def report() -> None:
        replaced = sum(1 for sid, pid in before.items()
                       if sid in master.slots and master.slots[sid].worker
                       and master.slots[sid].worker.pid != pid)
        code = control.OK if replaced == len(before) else control.FAILED
        client.finish(code, f"{replaced}/{len(before)} worker(s) replaced")
    old = set(before.values())
    # Done when the rolling restart is over and the old workers have finished draining.
    master.wait_until(lambda: master.state != "serving" or (not master.rolling and not old & set(master.workers)),
                      report)


def scale(master, client, request: dict) -> None:
    value = str(request.get("count", ""))
    current = len(master.slots)
    try:
        target = current + int(value) if value[:1] in ("+", "-") else int(value)
    except ValueError:
        client.finish(control.USAGE, f"scale needs N, +N or -N, got {value!r}")
        return
    if not 1 <= target <= 1024:
        client.finish(control.USAGE, f"worker count must be from 1 to 1024, got {target}")
        return
    if master.state != "serving":
        client.finish(control.FAILED, f"cannot scale: generation {master.generation} is {master.state}")
        return
    while len(master.slots) < target:
        master.on_ttin()
    while len(master.slots) > target:
        master.on_ttou()
    client.send({"event": "progress", "text": f"scaling from {current} to {target} worker(s)"})

    def settled() -> bool:
        return master.state != "serving" or (master.ready_count() == len(master.slots)
                                              and len(master.workers) == len(master.slots))
    master.wait_until(settled, lambda: client.finish(
        control.OK if master.ready_count() == target else control.FAILED,
        f"{master.ready_count()}/{target} workers ready"))


def stop(master, client, request: dict) -> None:
    client.send({"event": "progress", "text": f"stopping generation {master.generation}"})
    master.on_term()
    master.wait_until(lambda: master.exit_code is not None,
                      lambda: client.finish(control.OK, f"generation {master.generation} stopped"))


def describe(master) -> dict:
    now = time.monotonic()
    info = {
        "app": master.name, "generation": master.generation, "pid": os.getpid(), "state": master.state,
        "main": master.heir is None or master.heir.main, "release": master.release,
        "release_exists": os.path.isdir(master.release), "age": round(now - master.started, 1),
        "workers": [{"id": w.id, "pid": w.pid, "state": w.state, "age": round(w.age(now), 1),
                     "restarts": w.restarts, "status": w.status}
                    for w in sorted(master.workers.values(), key=lambda w: (w.id, w.started))],
        "target_workers": len(master.slots),
        "listeners": [listener.describe() for listener in master.listeners],
        "last_upgrade": master.last_upgrade.as_dict() if master.last_upgrade else None,
        "upgrading": None,
        "upgrade_timeout": master.config.upgrade.timeout,
        "graceful_timeout": master.config.workers.graceful_timeout,
        "current": os.path.realpath(master.config.directory) if master.config.directory else None,
        "pinned_problem": _pinned_problem(master.config),
        "systemd_unit": own_unit(),
    }
    succession = master.succession
    if succession is not None:
        info["upgrading"] = {"generation": succession.generation, "pid": succession.pid,
                             "state": succession.state, "release": succession.plan.release,
                             "progress": succession.progress}
    return info


def _pinned_problem(config) -> str | None:
    try:
        preflight.check_pinned_path(config.exec_path, os.geteuid()) if config.exec_path else None
    except preflight.UpgradeRefused as exc:
        return str(exc)
    return None


def own_unit() -> str | None:
    """The service unit this master runs in, from its cgroup (…/system.slice/APP.service)."""
    try:
        text = open("/proc/self/cgroup").read()
    except OSError:
        return None
    for line in text.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.endswith(".service"):
            return name
    return None
