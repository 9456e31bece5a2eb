"""The preloader: `python -m cadenza.worker.preloader MODULE:OBJECT` (DESIGN §4.3).

Exec'd by its generation's master from the generation's release, with the listeners at fds
3..n and the master's channel after them (CADENZA_PRELOADER_FD). It imports the application
and the engine once, calls gc.freeze() so that the collector never writes to what was imported
(the workers then share those pages copy-on-write), says "ready", and forks one worker per
request of the master. A worker is the built-in worker of app.py, serving the already-imported
application. The protocol is described in daemon/preloading.py.

It decides nothing: it forks when asked, reaps its children and reports their exits. Told to
stop over the channel (the master's drain), it forks no more and exits once its workers have
gone. A stop signal from anyone else (`systemctl kill`, a user) is ignored while its master
lives: the master decides. If the master itself is gone (SIGTERM through PR_SET_PDEATHSIG, or
the channel closed), it passes SIGTERM on to its workers' groups, which then drain as they
would without preload. A worker also watches the master through a pidfd the preloader opened
(and its forks inherit): one that outlived its preloader drains when the master goes.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import traceback

import setproctitle

from .. import logs
from ..exiting import exit_now
from ..exitcodes import USAGE, WORKER_APP_ERROR
from ..listeners import ListenerError, adopt_from_env
from ..notify import Notifier
from ..signals import ignore_master_signals
from . import app as worker_app
from .loading import load_app

log = logging.getLogger("cadenza.preloader")

MAX_REQUEST = 1 << 20
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# What a fork sets back to the default; signals.MASTER_ONLY stay ignored (main()).
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ignore_master_signals()
    generation = os.environ.get("CADENZA_GENERATION", "?")
    name = os.environ.get("CADENZA_APP_NAME", "cadenza")
    logs.setup("preloader")
    setproctitle.setproctitle(f"cadenza preloader gen {generation} [{name}]")
    fd = os.environ.pop("CADENZA_PRELOADER_FD", "")
    if len(argv) != 1 or not fd.isdigit():
        log.error("usage: python -m cadenza.worker.preloader MODULE:OBJECT, started by cadenza "
                  "(workers.preload = true) with CADENZA_PRELOADER_FD set")
        return USAGE
    os.environ.pop("CADENZA_WORKER_ID", None)   # a worker's only: the app must not see one here
    channel = socket.socket(fileno=int(fd))
    os.set_inheritable(channel.fileno(), False)
    try:
        sockets = [listener.sock for listener in adopt_from_env()]
    except ListenerError as exc:
        return _failed(channel, str(exc), USAGE)
    sys.path.insert(0, os.getcwd())
    try:
        settings = worker_app.http_settings()
        worker_app.engine(settings)            # the engine's modules are shared too
        application = load_app(argv[0])
        # A configuration built and thrown away: what uvicorn imports while it loads one (the
        # protocol modules, websockets) is then imported once, here, for every worker.
        worker_app.uvicorn_config(application, settings)
    except worker_app.StartupFailed as exc:
        return _failed(channel, str(exc), WORKER_APP_ERROR)
    except Exception as exc:  # noqa: BLE001 - any import-time error of the app is reported the same way
        return _failed(channel, f"cannot load app {argv[0]!r} from {os.getcwd()}: "
                                f"{type(exc).__name__}: {exc}", WORKER_APP_ERROR)
    gc.collect()
    gc.freeze()   # what exists now is never scanned again, so its pages stay shared
    log.info("imported %s; %d objects frozen", argv[0], gc.get_freeze_count())
    return Forker(channel, application, sockets, settings).run()


def _failed(channel: socket.socket, text: str, code: int) -> int:
    log.error("%s", text)
    try:
        channel.send(json.dumps({"failed": text}).encode())
    except OSError:
        pass
    return code


class Forker:
    def __init__(self, channel: socket.socket, application, sockets, settings):
        self.channel, self.application, self.sockets, self.settings = channel, application, sockets, settings
        self.master = os.getppid()
        self.master_fd = _pidfd(self.master)   # inherited by every fork: its workers watch the master too
        self.children: set[int] = set()
        self.stopping = False
        self.orphaned = False
        self.signalled = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        for sig in (*_STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector = selector = selectors.DefaultSelector()
        selector.register(self.channel, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        self._send({"ready": True})
        while True:
            self._reap()
            if os.getppid() != self.master and not self.orphaned:
                self._master_gone()
            elif self.signalled and not self.orphaned:
                self.signalled = False
                log.warning("ignored a stop signal: the master (pid %d) decides when the preloader "
                            "stops", self.master)
            if self.stopping and not self.children:
                return 0
            for key, _ in selector.select():
                if key.fileobj is self.channel:
                    if not self._on_request():
                        selector.unregister(self.channel)
                        self._master_gone()
                else:
                    _drain(self.wake_r)

    def _on_signal(self, signum, frame) -> None:
        if signum != signal.SIGCHLD:
            self.signalled = True   # the loop tells its master's death from anyone else's signal

    def _master_gone(self) -> None:
        """No master to drain the workers: they are told to, as PR_SET_PDEATHSIG would have."""
        self.orphaned = self.stopping = True
        log.warning("the master is gone; stopping %d worker(s)", len(self.children))
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass

    def _on_request(self) -> bool:
        try:
            data = self.channel.recv(MAX_REQUEST)
        except OSError:
            data = b""
        if not data:
            return False
        try:
            request = json.loads(data)
            if request.get("drain") is True:
                self.stopping = True
                return True
            worker_id, env = int(request["fork"]), {str(k): str(v) for k, v in request.get("env", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignored a malformed request from the master: %r", data[:200])
            return True
        if self.stopping:
            self._send({"fork_failed": worker_id, "errno": 0, "error": "the preloader is stopping"})
            return True
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        go_r = go_w = -1
        try:
            # The child serves only once the master has its pid: were we killed in between, the
            # master would never know it, and nothing would ever stop it.
            go_r, go_w = os.pipe()
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in (go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            self._send({"fork_failed": worker_id, "errno": exc.errno,
                        "error": f"fork failed: {exc.strerror or exc}"})
            return True
        if pid == 0:
            os.close(go_w)
            told = os.read(go_r, 1)
            os.close(go_r)
            if not told:   # the preloader died before the master learnt our pid
                os._exit(0)
            self._become_worker(worker_id, env)   # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(go_r)
        try:
            os.setpgid(pid, pid)   # here too: the master may signal its group before it runs
        except OSError:
            pass
        self.children.add(pid)
        if self._send({"forked": worker_id, "pid": pid}):
            try:
                os.write(go_w, b"!")
            except OSError:     # it died already (OOM): its exit is reported like any other
                pass
        os.close(go_w)
        return True

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send({"exited": pid, "status": status})

    def _send(self, message: dict) -> bool:
        try:
            self.channel.send(json.dumps(message).encode())
        except OSError:
            return False   # the master is gone; _master_gone() follows
        return True

    def _become_worker(self, worker_id: int, env: dict[str, str]) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in _RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.setpgid(0, 0)     # a group of its own, which the master signals (daemon/groups.py)
            self.channel.close()
            self.selector.close()   # its epoll fd: a fork has no exec to close it
            os.close(self.wake_r)
            os.close(self.wake_w)
            gc.enable()
            os.environ.update(env)
            os.environ["CADENZA_WORKER_ID"] = str(worker_id)
            worker_app.MASTER_PIDFD = self.master_fd
            if "WATCHDOG_USEC" in env:
                os.environ["WATCHDOG_PID"] = str(os.getpid())
            code = serve_loaded(self.application, self.sockets, self.settings)
        except BaseException:  # noqa: BLE001 - in the child every error must end in _exit
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)


def _pidfd(pid: int) -> int | None:
    """A pidfd of the master, or None (EMFILE, or a kernel without pidfds): a worker forked from a
    preloader that has since died has no parent to pass the master's death on, and watches this."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        log.warning("cannot watch the master (pid %d) for the workers: %s; a worker outliving this "
                    "preloader then ends only with the unit's cgroup", pid, exc.strerror or exc)
        return None


def serve_loaded(application, sockets, settings) -> int:
    """A forked worker: app.main() without the import, which the preloader has done."""
    worker_id = os.environ.get("CADENZA_WORKER_ID", "?")
    logs.setup(f"worker {worker_id}")
    setproctitle.setproctitle(f"cadenza worker {worker_id} gen {os.environ.get('CADENZA_GENERATION', '?')} "
                              f"[{os.environ.get('CADENZA_APP_NAME', 'cadenza')}]")
    notifier = Notifier.from_environ()
    try:
        return worker_app.serve(application, sockets, notifier, settings)
    except worker_app.StartupFailed as exc:
        log.error("%s", exc)
        notifier.send(status=str(exc))
        return WORKER_APP_ERROR


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


if __name__ == "__main__":
    status = main()
    # The application's atexit handlers (registered at import) run; the interpreter's teardown of
    # everything it imported does not: a reload waits for this process to be gone (exiting.py).
    atexit._run_exitfuncs()
    exit_now(status)
