"""Process limits checked before a generation starts, so a unit that cannot work says why once
instead of failing later in a worker, or in a loop of restarts."""
from __future__ import annotations

import resource

# The master holds about 12 fds (20 during an upgrade); a worker about 10 before its first
# connection, then one per connection.  Below this, workers fail to start or to accept.
MIN_OPEN_FILES = 64


def open_files_problem(minimum: int = MIN_OPEN_FILES) -> str | None:
    """Why RLIMIT_NOFILE is too low to run, or None. Workers inherit the master's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= minimum:
        return None
    return (f"the open files limit is {soft} (hard {hard}); cadenza needs at least {minimum}: about 20 for "
            f"the master and, for each worker, 10 plus one per open connection. Raise LimitNOFILE= in the "
            f"unit (systemctl edit APP; systemd's default 1024 fits most apps) or `ulimit -n` in the shell")
