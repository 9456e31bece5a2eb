"""Preload (`workers.preload = true`) with a real master outside systemd: one preloader per
generation imports the application once and forks the workers; the master imports none of it.
The application of these tests writes the pid of every process that imports it to a file: the
file is how a test sees who imported what."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from procs import VENV_BIN, Client, alive, children, cmdline, descendants, free_port, get, wait

APP = '''
import os, pathlib
GATE = os.environ.get("TEST_IMPORT_GATE")
if GATE:
    open(GATE).read()          # a FIFO: the import waits until the test writes to it
with open(os.environ["TEST_IMPORTS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
BIG = [str(i) * 10 for i in range(200_000)]     # import-time objects the workers share

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"pid {os.getpid()} parent {os.getppid()}".encode()]
'''


def site(tmp_path: Path, start, count: int = 2, module: str = "preapp", extra: str = "", env=None,
         envtable: str = "", name: str = "pre", app: str = APP):
    """A preloaded app `module` (the text `app`) in tmp_path, started: (master, port, imports file)."""
    (tmp_path / f"{module}.py").write_text(app)
    port = free_port()
    (tmp_path / "cadenza.toml").write_text(
        f'[app]\nname = "{name}"\n[listen]\naddresses = ["127.0.0.1:{port}"]\n'
        f'[workers]\ncount = {count}\napp = "{module}:app"\npreload = true\ngraceful_timeout = 5\n{extra}'
        f'{envtable}[control]\nsocket = "{tmp_path}/control.sock"\n')
    imports = tmp_path / "imports"
    m = start("-c", "cadenza.toml", env={"TEST_IMPORTS": str(imports), **(env or {})})
    return m, port, imports


def preloader_of(m) -> int:
    kids = children(m.pid)
    assert len(kids) == 1 and cmdline(kids[0]).startswith("cadenza preloader gen 1 [pre]"), \
        [cmdline(k) for k in kids]
    return kids[0]


def importers(imports: Path) -> list[int]:
    return [int(line) for line in imports.read_text().split()]


def test_the_preloader_imports_once_and_forks_every_worker(start, tmp_path):
    m, port, imports = site(tmp_path, start, count=3)
    m.wait_ready()
    preloader = preloader_of(m)
    workers = children(preloader)
    assert sorted(cmdline(w) for w in workers) == [f"cadenza worker {i} gen 1 [pre]" for i in (1, 2, 3)]
    # The master never imports the application, and the workers are forks: one import in all.
    assert importers(imports) == [preloader]
    status, body = get(port)
    assert status == 200 and f"parent {preloader}" in body
    shown = subprocess.run([str(VENV_BIN / "supervisorctl"), "-s", str(tmp_path / "control.sock"), "status"],
                           capture_output=True, text=True, check=True).stdout
    assert f"preloader pid {preloader} ready, imported the app in" in shown, shown
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    assert not any(alive(p) for p in [preloader, *workers])
    assert f"the preloader (pid {preloader}) exited with status 0" in m.log()


def test_a_killed_worker_is_forked_again_without_an_import(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    preloader = preloader_of(m)
    victim = children(preloader)[0]
    os.kill(victim, signal.SIGKILL)
    m.wait_status("1/2 workers ready")
    m.wait_status("2/2 workers ready")
    workers = children(preloader)
    assert len(workers) == 2 and victim not in workers
    assert importers(imports) == [preloader]
    assert "killed by SIGKILL; respawning in" in m.log()


def test_workers_outlive_a_killed_preloader_and_a_new_one_replaces_them(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    first = preloader_of(m)
    old_workers = children(first)
    client = Client(port)
    os.kill(first, signal.SIGKILL)
    second = wait(lambda: [k for k in children(m.pid) if k != first and "preloader" in cmdline(k)],
                  what="a new preloader")[0]
    # Its workers replace the old ones make-before-break: a rolling restart once it is ready.
    wait(lambda: len(children(second)) == 2 and not any(alive(w) for w in old_workers),
         what="every worker forked from the new preloader")
    m.wait_status("2/2 workers ready")
    client.stop()
    assert client.ok > 0 and client.failures == [], client.failures[:3]
    assert importers(imports) == [first, second]
    m.wait_log("exited (its exit status was lost with its preloader)")
    victim = children(second)[0]
    os.kill(victim, signal.SIGKILL)
    wait(lambda: len(children(second)) == 2 and victim not in children(second), what="a respawn")


def test_an_application_that_cannot_be_imported_fails_the_start_with_its_reason(start, tmp_path):
    port = free_port()
    (tmp_path / "cadenza.toml").write_text(
        f'[app]\nname = "pre"\n[listen]\naddresses = ["127.0.0.1:{port}"]\n'
        f'[workers]\napp = "missing_module:app"\npreload = true\n'
        f'[control]\nsocket = "{tmp_path}/control.sock"\n')
    m = start("-c", "cadenza.toml")
    assert m.wait_exit() == 78
    log = m.log()
    assert "the preloader" in log and "exited with status 3 (the application could not be loaded)" in log
    assert "ModuleNotFoundError: No module named 'missing_module'" in log
    assert "generation 1 start failed" in log


@pytest.mark.parametrize("how", ["a worker's exit", "a fork"])
def test_a_stopped_preloader_is_replaced_when_it_leaves_something_unanswered(start, tmp_path, how):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    first = preloader_of(m)
    os.kill(first, signal.SIGSTOP)
    if how == "a fork":
        m.signal(signal.SIGTTIN)
        m.wait_log(f"the preloader (pid {first}) did not answer a fork within 2s; killing it")
        count = 3
    else:
        victim = children(first)[0]
        os.kill(victim, signal.SIGKILL)
        m.wait_log(f"the preloader (pid {first}) did not report the exit of worker pid {victim} within 2s; "
                   "killing it")
        count = 2

    def replaced():
        kids = children(m.pid)
        return len(kids) == 1 and kids[0] != first and len(children(kids[0])) == count and kids[0]
    second = wait(replaced, timeout=20, what=f"a new preloader with {count} workers")
    assert "cadenza preloader gen 1 [pre]" in cmdline(second) and not alive(first)
    m.wait_status(f"{count}/{count} workers ready")
    assert get(port)[0] == 200


def test_a_stop_while_the_preloader_imports_ends_everything(start, tmp_path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    m, port, imports = site(tmp_path, start, env={"TEST_IMPORT_GATE": str(gate)})
    preloader = wait(lambda: [k for k in children(m.pid) if "preloader" in cmdline(k)], what="the preloader")[0]
    m.wait_status("preloader importing the application")
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=10) == 0
    assert not alive(preloader)
    assert not imports.exists()


def test_a_master_killed_outright_takes_its_preloader_and_workers_with_it(start, tmp_path):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    tree = descendants(m.pid)
    assert len(tree) == 3
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait()
    wait(lambda: not any(alive(p) for p in tree), timeout=10, what="the preloader and its workers gone")


def test_workers_that_outlived_their_preloader_drain_when_the_master_is_killed_outright(start, tmp_path):
    m, port, imports = site(tmp_path, start, extra="max_lifetime = 3600\n")
    m.wait_ready()
    first = preloader_of(m)
    orphans = children(first)
    # A live preloader passes the master's death on to its workers; a dead one cannot. Kill it,
    # then the master, before any rolling restart has replaced its workers.
    os.kill(first, signal.SIGKILL)
    wait(lambda: not alive(first), what="the preloader gone")
    os.kill(m.pid, signal.SIGKILL)
    m.proc.wait()
    # No parent tells them: each watches the master's pidfd, and drains.
    wait(lambda: not any(alive(w) for w in orphans), timeout=15, what="the orphaned workers gone")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTTIN])
def test_a_rolling_restart_and_a_new_worker_come_from_the_preloader(start, tmp_path, signum):
    m, port, imports = site(tmp_path, start)
    m.wait_ready()
    preloader = preloader_of(m)
    before = set(children(preloader))
    m.signal(signum)
    if signum == signal.SIGHUP:
        wait(lambda: len(set(children(preloader)) - before) == 2 and not (before & set(children(preloader))),
             what="two new workers")
    else:
        m.wait_status("3/3 workers ready")
        assert len(children(preloader)) == 3
    assert importers(imports) == [preloader]
