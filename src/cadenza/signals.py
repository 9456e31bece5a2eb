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
