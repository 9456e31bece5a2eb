"""Benchmarks 2 (reload overhead) and 5 (scale): cadenza's upgrades in a private systemd, idle.

Reload overhead = `systemctl reload APP` wall time minus the app's own start-to-ready time:
WORKERS copies of cadenza's built-in worker (`python -m cadenza.worker.app app:app`, the very
program a generation starts) launched at once on one listening socket, timed from spawn to the
last READY=1 on a NOTIFY_SOCKET of ours. The two are measured alternately (start, reload, start,
reload ...) so that both see the same machine. Every few reloads, one more upgrade is driven
straight over the control socket from the host, streaming the master's events, to show where the
time goes; and the pinned `supervisorctl status` is timed each time (its Python start-up).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from common import (PYTHON, bound_socket, cgroup_pids, deploy, fd_at_3, free_port, main_host_pid, median, ms, pct,
                    proc_status, unit_pss_mb)
from contenders import APP, CADENZA, UNIT, next_release
import sdns  # noqa: E402  (tests/sdns.py, on sys.path through common)


def app_start_to_ready(app_dir: Path, sock: socket.socket, workers: int, timeout: float = 60) -> float:
    """Seconds from spawning WORKERS built-in workers to the last READY=1."""
    path = str(app_dir / f"notify-{os.getpid()}.sock")
    inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.bind(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_"))}
    env.update(LISTEN_FDS="1", NOTIFY_SOCKET=path)
    fd = sock.fileno()
    # sh puts the socket at fd 3 and sets LISTEN_PID to the pid that exec keeps.
    cmd = f'LISTEN_PID=$$ exec {PYTHON} -m cadenza.worker.app app:app{fd_at_3(fd)}'
    children, ready = [], 0
    try:
        t0 = time.monotonic()
        for _ in range(workers):
            children.append(subprocess.Popen(["sh", "-c", cmd], cwd=app_dir, env=env, pass_fds=(fd,),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        inbox.settimeout(timeout)
        while ready < workers:
            if b"READY=1" in inbox.recv(4096).split(b"\n"):
                ready += 1
        return time.monotonic() - t0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        inbox.close()
        os.unlink(path)


def upgrade_events(control: Path, timeout: float = 120) -> tuple[float, list[tuple[float, str, str]]]:
    """`{"cmd": "upgrade"}` on the control socket: total seconds and (t, event, text) as streamed."""
    events = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        t0 = time.monotonic()
        s.connect(str(control))
        s.sendall(b'{"cmd": "upgrade"}\n')
        for line in s.makefile("rb"):
            msg = json.loads(line)
            events.append((round(time.monotonic() - t0, 4), msg.get("event", "done" if msg.get("done") else "?"),
                           msg.get("text", "")[:80]))
            if msg.get("done"):
                break
        return time.monotonic() - t0, events


def reload_overhead(reps: int, direct_reps: int, workers: int = 2, log=print) -> dict:
    app_times, reloads, show_times, directs, ctl_times = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="cadenza-bench-") as tmp, bound_socket() as sock:
        app_dir = deploy.AppRoot(Path(tmp), "bare", 0).release("r1", venv=False)
        app_start_to_ready(app_dir, sock, workers)          # warm the page cache
        with sdns.SystemdNS(net="host") as ns:
            port = free_port()
            root = CADENZA.install(ns, port, workers=workers)
            ctl = root.root / "shared" / "bin" / "supervisorctl"
            direct_every = max(1, reps // max(direct_reps, 1))
            for i in range(reps):
                app_times.append(app_start_to_ready(app_dir, sock, workers))
                next_release(root, 2 * i + 2)
                t0 = time.monotonic()
                proc = ns.systemctl("reload", APP, timeout=120)
                reloads.append(time.monotonic() - t0 if proc.returncode == 0 else None)
                t0 = time.monotonic()
                ns.show(UNIT, "MainPID")                      # nsenter + systemctl round trip
                show_times.append(time.monotonic() - t0)
                t0 = time.monotonic()
                ns.run(str(ctl), "status", timeout=30)       # nsenter + Python start + one request
                ctl_times.append(time.monotonic() - t0)
                time.sleep(0.3)
                if direct_reps and (i + 1) % direct_every == 0 and len(directs) < direct_reps:
                    next_release(root, 2 * i + 3)
                    directs.append(upgrade_events(root.socket))
                    time.sleep(0.3)
            master = main_host_pid(ns, UNIT)
            rss_after = int(proc_status(master)["VmRSS"].split()[0]) if master else None
            generation = reps + len(directs) + 1
    app_med = median(app_times)
    over = [r - app_med for r in reloads if r is not None]
    return {
        "workers": workers, "reps": reps,
        "app_start_to_ready_ms": {"median": ms(app_med), "p95": ms(pct(app_times, 95)),
                                  "all": [ms(t) for t in app_times]},
        "reload_ms": {"median": ms(median(reloads)), "p95": ms(pct(reloads, 95)),
                      "all": [ms(t) for t in reloads]},
        "reloads_failed": sum(r is None for r in reloads),
        "overhead_ms": {"median": ms(median(over)), "p95": ms(pct(over, 95))},
        "systemctl_roundtrip_ms": ms(median(show_times)),
        "supervisorctl_status_ms": ms(median(ctl_times)),
        "direct_upgrade_ms": {"median": ms(median([d[0] for d in directs])),
                              "events": sorted(directs)[len(directs) // 2][1] if directs else []},
        "master_rss_kb_after": rss_after, "master_generation_after": generation,
    }


def scale(counts: list[int], reps: int, log=print) -> list[dict]:
    rows = []
    for n in counts:
        ready, upgrade, mem = [], [], []
        for _ in range(reps):
            with sdns.SystemdNS(net="host") as ns:
                port = free_port()
                budget = 30 + 2 * n
                root = CADENZA.install(ns, port, workers=n, ready_timeout=budget, upgrade_timeout=budget,
                                       start=False)
                ns.systemctl("start", f"{APP}.socket", check=True)
                t0 = time.monotonic()
                ok = ns.systemctl("start", UNIT, timeout=budget + 60).returncode == 0
                ready.append(time.monotonic() - t0 if ok else None)
                mem.append(unit_pss_mb(ns, UNIT))
                procs_ready = len(cgroup_pids(ns, UNIT))
                next_release(root, 2)
                t0 = time.monotonic()
                ok = ns.systemctl("reload", APP, timeout=budget + 60).returncode == 0
                upgrade.append(time.monotonic() - t0 if ok else None)
                state = ns.show(UNIT, "ActiveState")["ActiveState"]
        row = {"workers": n, "ready_ms": ms(median(ready)), "upgrade_ms": ms(median(upgrade)),
               "ready_all": [ms(t) for t in ready], "upgrade_all": [ms(t) for t in upgrade],
               "pss_mb": median(mem), "processes": procs_ready,
               "final_state": state}
        log(f"  scale {n:>3} workers: READY {row['ready_ms']} ms, upgrade {row['upgrade_ms']} ms")
        rows.append(row)
    return rows
