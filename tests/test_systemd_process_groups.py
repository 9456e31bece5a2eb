"""Process groups and notify access under a real systemd 252 (tests/sdns.py), with a command
worker that is a shell wrapper without `exec`, run as nobody (daemon/groups.py, notify.py).

systemd's KillMode=mixed ends a unit's leftovers on a full stop only: after `systemctl reload`
nothing of the old generation may keep serving the old release, whatever its wrapper started.
And readiness said by a child of the wrapper's (systemd-notify, as nobody) counts for its
worker, the way NotifyAccess=all accepts what comes from a unit's cgroup; from any other
process it is refused and logged at warning.
"""
from __future__ import annotations

import json
from pathlib import Path

from deploy import AppRoot
from handover_fixtures import APP, Hammer, answer, journal_has, main_pid, poll, start_site, unit_procs
from procs import alive, children, free_port

HTTPWORKER = Path(__file__).resolve().parent / "programs" / "httpworker.py"
NOTIFY = "/usr/bin/systemd-notify"
AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
NOBODY = 65534

# What a deploy might ship: a wrapper that does not exec. Its children: the server (on fd 3,
# silent on NOTIFY_SOCKET), a helper that ignores SIGTERM, and a shell whose systemd-notify
# says READY=1 for them.
WRAPPER = """\
#!/bin/sh
HTTPWORKER_NOTIFY=0 python3 {httpworker} &
python3 -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)' &
sh -c '{notify} --ready --status="said by a child of the wrapper"; true'
wait
"""


def wrapped(site: AppRoot, tag: str) -> None:
    """Release `tag`, served by WRAPPER as nobody (a worker's pid is the wrapper's shell)."""
    rel = site.release(tag)
    (rel / "wrapper.sh").write_text(WRAPPER.format(httpworker=HTTPWORKER, notify=NOTIFY))
    command = json.dumps([*AS_NOBODY, "sh", str(rel / "wrapper.sh")])
    config = rel / "cadenza.toml"
    config.write_text(config.read_text().replace('app = "app:app"', f"command = {command}"))
    site.switch(tag)


def tree(pid: int) -> set[int]:
    """`pid` and every process descended from it (host pids)."""
    found, todo = {pid}, [pid]
    while todo:
        for child in children(todo.pop()):
            found.add(child)
            todo.append(child)
    return found


def uid_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])


def ignores_term(pid: int) -> bool:
    mask = Path(f"/proc/{pid}/status").read_text().split("\nSigIgn:")[1].split()[0]
    return bool(int(mask, 16) & 1 << 14)   # SIGTERM is 15


def test_reload_leaves_nothing_of_a_wrapper_and_readiness_comes_from_its_child_as_nobody(systemd):
    site = AppRoot(systemd.state, APP, free_port(), graceful_timeout=2)
    wrapped(site, "r1")
    # Active means ready: every worker's READY=1 came from its wrapper's child, as nobody.
    start_site(systemd, site)
    hammer = Hammer(site.port)
    _, master = main_pid(systemd)
    # Gen 1: the master, and per worker the wrapper with its server and its helper.
    old = poll(lambda: len(t := tree(master)) == 7 and t, what="gen 1's 7 processes")
    assert {uid_of(p) for p in old - {master}} == {NOBODY}
    poll(lambda: sum(map(ignores_term, old)) == 2, what="the helpers' SIG_IGN")   # else TERM ends them

    wrapped(site, "r2")
    reload = systemd.systemctl("reload", APP)
    assert reload.returncode == 0, reload.stdout + reload.stderr + systemd.journal("-o", "cat", "-n", "40")
    assert answer(site) == "release r2"
    # `systemctl reload` has returned: nothing of generation 1's workers runs, not even the
    # helpers that ignored SIGTERM (KillMode=mixed did nothing here: the unit did not stop); its
    # master said it had drained, and exits.
    assert not [p for p in old - {master} if alive(p)], [p for p in old if alive(p)]
    poll(lambda: not alive(master), what="gen 1's master exit")
    _, new_master = main_pid(systemd)
    new = tree(new_master)
    assert set(unit_procs(systemd).values()) == new and len(new) == 7, (unit_procs(systemd), new)
    journal = journal_has(systemd, "is still running; killing it")   # the helpers, after graceful_timeout
    assert "has exited; 2 process(es) of its group still run" in journal   # told once, not twice

    # A process of no worker's family says READY=1 to generation 2's socket: refused, logged.
    wrapper = next(iter(children(new_master)))
    environ = dict(v.split("=", 1) for v in Path(f"/proc/{wrapper}/environ").read_text().split("\0") if "=" in v)
    stranger = systemd.run(*AS_NOBODY, "env", f"NOTIFY_SOCKET={environ['NOTIFY_SOCKET']}",
                           NOTIFY, "--ready", "--status=not a worker")
    assert stranger.returncode == 0, stranger.stderr      # its BARRIER=1 was answered
    warning = journal_has(systemd, f"(uid {NOBODY}, {NOTIFY} --ready --status=not a worker)")
    line = next(l for l in warning.splitlines() if "--status=not a worker" in l)
    assert "refused READY=1 from pid " in line and "not sent by a worker of this generation" in line
    assert "--status=not a worker" in systemd.journal("-o", "cat", "-p", "warning")
    assert set(hammer.check()) == {"release r1", "release r2"}
