"""`cadenza run`: from the environment and the config to a running generation, and back.

Each step that can fail names the problem and the daemon's exit code (exitcodes.py): a config
refused (78), a listener that cannot be bound (71), a control socket that cannot be created (73).
"""

from __future__ import annotations

import logging
import os

import setproctitle

from .. import config as C
from .. import exitcodes, logs, runtime
from ..control import commands
from ..control.server import Access, ControlServer
from ..control.socketfile import ControlError, bind_socket
from ..listeners import ListenerError, adopt_from_env, bind, bind_all, parse_address, unix_paths
from ..notify import Notifier
from ..trust import config_problems
from . import limits
from .exposition import METRICS_FDNAME
from .generation import Generation
from .handoff import CONTROL_FDNAME, Inheritance
from .loop import Loop
from .policy import State

log = logging.getLogger("cadenza")


def run(cfg_args, command: list[str], raw_argv: list[str]) -> int:
    # Titled before anything touches the environment: setproctitle finds the memory it may
    # overwrite (argv, then environ) on its first call, and an edited environ can defeat that.
    setproctitle.setproctitle("cadenza master")
    log_fd = os.environ.get("CADENZA_LOG_FD", "")
    logs.setup("master", final_fd=int(log_fd) if log_fd.isdigit() else None)
    inherited = Inheritance.from_environ()
    try:
        cfg = C.from_run_args(cfg_args, command)
    except C.ConfigError as exc:
        log.error("configuration refused, not starting:\n%s", exc)
        return exitcodes.CONFIG
    unsafe = config_problems(cfg.source, writers=0o002) if cfg.source else []
    problem = limits.open_files_problem()
    if unsafe or problem:
        log.error("not starting: %s", "\n".join(unsafe) if unsafe else problem)
        return exitcodes.CONFIG
    try:
        release = C.resolve_release(cfg)
    except C.ReleaseError as exc:
        log.error("not starting: %s", exc)
        return exitcodes.CONFIG
    owned = set(inherited.owns)
    try:
        listeners = adopt_from_env()
        control = _take_named(listeners, CONTROL_FDNAME)
        metrics = _metrics_socket(cfg, _take_named(listeners, METRICS_FDNAME))
        bound_here = not listeners or "listeners" in owned
        if not listeners:
            listeners = bind_all(list(cfg.listen.addresses), C.listen_origins(cfg))
    except ListenerError as exc:
        log.error("%s", exc)
        return exitcodes.OSERR
    control_owned = control is None or "control" in owned
    if control is None:
        try:
            path = runtime.run_control_socket(cfg)
            private = runtime.tmp_runtime_dir()
            control = bind_socket(path, private if private in path.parents else None)
        except ControlError as exc:
            # Without it neither `systemctl reload` nor supervisorctl could reach this master.
            log.error("not starting: %s", exc)
            return exitcodes.CANTCREAT
    notifier = Notifier.from_environ()
    store_max = os.environ.pop("FDSTORE", "0")
    if not inherited.heir and store_max.isdigit() and int(store_max) > 0:
        # What we bound ourselves goes to systemd's fd store too: after a crash or a restart the
        # next master gets the same sockets back, and nothing is refused. systemd 254+ sets
        # $FDSTORE from FileDescriptorStoreMax=; on 252 the unit sets Environment=FDSTORE=N itself.
        offer = [(l.fd, l.name) for l in listeners] if bound_here else []
        if control_owned:
            offer.append((control.fileno(), CONTROL_FDNAME))
        if offer and notifier.store_fds(offer):
            owned.add("fdstore")
    setproctitle.setproctitle(f"cadenza master gen {inherited.generation} [{cfg.app.name}]")
    loop = Loop()
    access = Access(cfg.control.allow_users, cfg.control.allow_groups, cfg.control.status_groups)

    def serve_control(generation: Generation) -> ControlServer:
        # Only the main master answers: both generations hold the socket during an upgrade.
        return ControlServer(loop, control, access,
                             lambda client, cmd, request: commands.run(generation, client, cmd, request))

    generation = Generation(loop, cfg, listeners, notifier, inherited, release=release, argv=raw_argv,
                            control_sock=control, control_owned=control_owned, bound_here=bound_here,
                            fd_store="fdstore" in owned, watchdog_usec=_watchdog_usec(),
                            serve_control=serve_control)
    generation.metrics_sock = metrics
    try:
        code = generation.run()
    except Exception:
        log.exception("internal error in the master; please report it with this traceback")
        return exitcodes.SOFTWARE
    _cleanup(generation)
    loop.close()
    return code


def _take_named(listeners, name: str):
    """The control socket (cadenza-control) and the metrics socket (cadenza-metrics) arrive with
    the listeners, from master N."""
    for listener in listeners:
        if listener.name == name:
            listeners.remove(listener)
            return listener.sock
    return None


def _metrics_socket(cfg, inherited):
    """[metrics] listen: the socket master N passed when it is the same address, else a new one
    (a release may move or remove it). A bind that fails is this generation's start failing."""
    if cfg.metrics.listen is None:
        if inherited is not None:
            inherited.close()
        return None
    address = parse_address(cfg.metrics.listen)
    if inherited is not None:
        name = inherited.getsockname()
        same = name == address.path if isinstance(name, str) else name[:2] == (address.host, address.port)
        if same:
            return inherited
        inherited.close()
    try:
        return bind(address, METRICS_FDNAME).sock
    except ListenerError as exc:
        raise ListenerError(f"metrics.listen: {exc}") from exc


def _cleanup(generation: Generation) -> None:
    # Socket paths go with the last generation only: never with one that hands over, nor with a
    # new one that failed before it was main (the old one still serves on them). Nor when
    # systemd's fd store may hand the same sockets to the next start: their paths must still
    # lead to them (a stale path is replaced at the next bind anyway).
    last = (generation.state is State.STOPPING and generation.exit_code != exitcodes.UNCLEAN_HANDOVER
            and (not generation.inherited.heir or generation.last_upgrade is not None and generation.control)
            and not generation.fd_store and not generation.left_warm)
    if generation.exposition is not None:
        generation.exposition.close()
    if last and generation.multiproc is not None:
        generation.multiproc.remove()
    if generation.control is not None:
        generation.control.close()
        if last and generation.control_owned:
            _unlink(generation.control_sock.getsockname())
    if generation.bound_here and last:
        for path in unix_paths(generation.listeners):
            _unlink(path)
    log.info("generation %d stopped", generation.number)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _watchdog_usec() -> int:
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and pid != str(os.getpid())):
        return 0
    try:
        return max(int(usec), 0)
    except ValueError:
        return 0
