"""What each control command does to the generation, and what the caller hears.

Every command answers with events and ends with one "done" carrying supervisorctl's exit code.
A command that changes something goes through the generation's table (`handle`), so a
refusal reads exactly as a signal's would, and waits until the change happened — or failed —
before it says done: a control plane that reports "sent" is not one (puma #563).
"""

from __future__ import annotations

import os
import time

from ..daemon.policy import Event, State
from ..daemon.recycle import uss
from . import protocol as P


def run(gen, client, cmd: str, request: dict) -> None:
    {"status": status, "metrics": metrics, "upgrade": upgrade, "rollback": rollback, "restart": restart,
     "scale": scale, "stop": stop}[cmd](gen, client, request)


def status(gen, client, request: dict) -> None:
    client.finish(P.OK, status=describe(gen))


def metrics(gen, client, request: dict) -> None:
    """The same text as [metrics] listen serves (daemon/metrics.py)."""
    client.finish(P.OK, metrics=gen.metrics_text())


def upgrade(gen, client, request: dict) -> None:
    canary = request.get("canary")
    if canary is not None and (isinstance(canary, bool) or not isinstance(canary, int) or not 0 <= canary <= 1024):
        client.finish(P.USAGE, f"--canary needs a number of workers from 0 to 1024, got {canary!r}")
        return
    gen.handle(Event.UPGRADE, source=f"supervisorctl ({client.describe()})", watcher=_watcher(gen, client, request),
               canary=canary)


def rollback(gen, client, request: dict) -> None:
    """Back to the warm generation (warm.py); answered like an upgrade."""
    gen.handle(Event.ROLLBACK, source=f"supervisorctl ({client.describe()})", watcher=_watcher(gen, client, request))


def _watcher(gen, client, request: dict):
    no_wait = bool(request.get("no_wait"))

    def watch(event: dict) -> None:
        client.send(event)
        kind = event["event"]
        if kind in ("failed", "refused"):
            client.finish(P.FAILED, event["text"], output=event.get("output", []))
        elif kind == "started" and no_wait:
            client.finish(P.OK, "upgrade started; not waiting (--no-wait)")
        elif kind == "mainpid":
            # Done when this (old) generation has drained: the caller's connection ends with it.
            # `exiting` names this master: the caller waits for it to be gone too, since "reload
            # returned" must mean that nothing runs from the old release any more (DESIGN §1).
            # A generation that stays warm (warm.py) does not exit: done once it is warm, and once the
            # one that was warm before it (told to leave by this upgrade) has gone.
            gen.wait_until(lambda: gen.exit_code is not None or (gen.said_warm and gen.state is State.WARM
                                                                 and gen.warm is None), lambda: client.finish(
                P.OK, f"generation {event['generation']} serves; generation {gen.number} drained"
                + (" and is warm for a rollback" if gen.state is State.WARM else ""),
                exiting=None if gen.state is State.WARM else os.getpid()))
    return watch


def restart(gen, client, request: dict) -> None:
    before = {s.id: s.worker.pid for s in gen.pool.slots.values() if s.worker}
    if gen.pool.recycler.rolling():
        client.finish(P.FAILED, "cannot restart: a rolling restart is already running")
        return
    refused = gen.handle(Event.RESTART, source=client.describe())
    if refused:
        client.finish(P.FAILED, refused)
        return
    client.send({"event": "progress", "text": f"rolling restart of {len(before)} worker(s)"})
    old = set(before.values())

    def replaced() -> int:
        slots = gen.pool.slots
        return sum(1 for sid, pid in before.items()
                   if sid in slots and slots[sid].worker and slots[sid].worker.pid != pid)

    def report() -> None:
        done_ = replaced()
        client.finish(P.OK if done_ == len(before) else P.FAILED, f"{done_}/{len(before)} worker(s) replaced")

    workers = gen.config.workers
    bound = workers.ready_timeout * max(1, len(before)) + workers.graceful_timeout
    # Done when the rolling restart is over and the old workers have finished draining.
    over = lambda: not gen.state.main or (not gen.pool.recycler.rolling() and not old & gen.pool.pids())  # noqa: E731
    _answer_within(gen, client, bound, over, report,
                   lambda: client.finish(P.FAILED, f"{replaced()}/{len(before)} worker(s) replaced after {bound:g}s; "
                                         f"the rolling restart goes on{_why_not_ready(gen)}"))


def scale(gen, client, request: dict) -> None:
    value = str(request.get("count", ""))
    current = len(gen.pool.slots)
    try:
        target = current + int(value) if value[:1] in ("+", "-") else int(value)
    except ValueError:
        client.finish(P.USAGE, f"scale needs N, +N or -N, got {value!r}")
        return
    if not 1 <= target <= 1024:
        client.finish(P.USAGE, f"worker count must be from 1 to 1024, got {target}")
        return
    event = Event.GROW if target >= current else Event.SHRINK
    while len(gen.pool.slots) != target:
        refused = gen.handle(event, source=client.describe())
        if refused:
            client.finish(P.FAILED, refused)
            return
    client.send({"event": "progress", "text": f"scaling from {current} to {target} worker(s)"})

    def settled() -> bool:
        pool = gen.pool
        return not gen.state.main or (pool.ready_count() == len(pool.slots) and len(pool.workers) == len(pool.slots))
    bound = gen.config.workers.ready_timeout + gen.config.workers.graceful_timeout
    _answer_within(gen, client, bound, settled, lambda: client.finish(
        P.OK if gen.pool.ready_count() == target else P.FAILED, f"{gen.pool.ready_count()}/{target} workers ready"),
        lambda: client.finish(P.FAILED, f"{gen.pool.ready_count()}/{target} workers ready after {bound:g}s; the master "
                                        f"goes on starting them{_why_not_ready(gen)}"))


def _answer_within(gen, client, seconds: float, done, answer, late) -> None:
    """answer() once done() holds; late() instead if it has not after `seconds` (the work goes
    on, the caller is told where it stands); nothing for a client that has gone."""
    timer = gen.loop.after(seconds, lambda: None if client.closing or client.closed else late())

    def then() -> None:
        timer.cancel()
        if not (client.closing or client.closed):
            answer()
    gen.wait_until(lambda: client.closing or client.closed or done(), then)


def _why_not_ready(gen) -> str:
    deaths = [s.last_death for s in gen.pool.slots.values()
              if s.last_death and (s.worker is None or s.worker.state != "ready")]
    if gen.preloader is not None and not gen.preloader.ready:
        failure = gen.preloader.failure
        deaths.insert(0, f"the preloader is down ({failure})" if failure else "the preloader is not ready")
    return f"; {deaths[0]}" if deaths else ""


def stop(gen, client, request: dict) -> None:
    client.send({"event": "progress", "text": f"stopping generation {gen.number}"})
    gen.handle(Event.STOP, source=client.describe())
    gen.wait_until(lambda: gen.exit_code is not None,
                   lambda: client.finish(P.OK, f"generation {gen.number} stopped"))


def describe(gen) -> dict:
    now = time.monotonic()
    info = {
        "app": gen.name, "generation": gen.number, "pid": os.getpid(), "state": gen.state.value,
        "main": gen.state.main, "release": gen.release,
        "release_exists": os.path.isdir(gen.release), "age": round(now - gen.started, 1),
        "workers": [_worker(gen.pool, w, now)
                    for w in sorted(gen.pool.workers.values(), key=lambda w: (w.id, w.started))],
        "target_workers": len(gen.pool.slots),
        "preloader": gen.preloader.describe() if gen.preloader is not None else None,
        "canary": gen.canary_describe(),
        "warm": gen.warm_describe(),
        "listeners": [listener.describe() for listener in gen.listeners],
        "last_upgrade": gen.last_upgrade.as_dict() if gen.last_upgrade else None,
        "upgrading": None,
        "upgrade_timeout": gen.config.upgrade.timeout,
        "graceful_timeout": gen.config.workers.graceful_timeout,
        "current": os.path.realpath(gen.config.directory) if gen.config.directory else None,
        "pinned_problem": _pinned_problem(gen.config),
        "systemd_unit": own_unit(),
    }
    succession = gen.succession
    if succession is not None and succession.alive():
        info["upgrading"] = {"generation": succession.generation, "pid": succession.pid,
                             "state": succession.stage.value, "release": succession.plan.release,
                             "progress": succession.progress}
    return info


def _worker(pool, w, now: float) -> dict:
    """One worker: "memory" is its unique memory (USS) in bytes, None when unreadable;
    "last_restart" says why its slot last got a new worker (recycle.py), None before that."""
    slot = pool.slots.get(w.id)
    last = slot.last_restart if slot is not None else None
    return {"id": w.id, "pid": w.pid, "state": w.state, "age": round(w.age(now), 1),
            "restarts": w.restarts, "status": w.status, "requests": w.requests,
            "max_requests": w.max_requests or None, "memory": uss(w.pid),
            "last_restart": dict(last) if last else None}


def _pinned_problem(config) -> str | None:
    if config.exec_path is None:
        return None
    from ..trust import unsafe_reason
    return unsafe_reason(config.exec_path, os.geteuid())


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
