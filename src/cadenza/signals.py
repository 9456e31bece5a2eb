"""Signals that pass between the master and the built-in worker, named in one place.

STACK_DUMP: the master sends it to a built-in worker whose event loop stopped pinging
(workers.watchdog) before it kills it. The worker's faulthandler, registered for it, writes the
stack of every thread to stderr (the journal) and the worker carries on until the master's
SIGKILL. A real-time signal, not SIGABRT, so that no core file is left in the release's
directory and nothing else (`systemctl kill`, a library) means it.
"""

from __future__ import annotations

import signal

STACK_DUMP = signal.SIGRTMIN + 2

# The master's own commands (DESIGN §4.6): USR2 upgrade, HUP rolling restart, TTIN/TTOU one
# worker more or fewer; USR1 means nothing to cadenza. `systemctl kill -s TTIN APP` sends them to
# every process of the unit, so the built-in worker and the preloader ignore them: by default
# HUP and USR1/USR2 would end them, and TTIN/TTOU stop them for good. SIG_IGN rather than a
# handler that does nothing: the interpreter's teardown puts Python handlers back to the
# defaults, and a worker that has drained would then die of the HUP of a rolling restart. What
# the application execs inherits SIG_IGN for these five, as under nohup.
MASTER_ONLY = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


def ignore_master_signals() -> None:
    """The master's fork sets them so already (daemon/process.py); the worker's and the
    preloader's main() say it again for a master that does not: an older one of a shared venv."""
    for sig in MASTER_ONLY:
        signal.signal(sig, signal.SIG_IGN)
