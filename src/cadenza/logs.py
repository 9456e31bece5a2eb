"""Logging: one line per event on stderr.

Under journald (JOURNAL_STREAM names our stderr, systemd.exec(5)) each line starts with its
sd-daemon(3) priority prefix and carries no timestamp of its own; elsewhere it gets a plain one.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal(fd: int | None = None) -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno() if fd is None else fd)
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def setup(tag: str, level: int = logging.INFO, final_fd: int | None = None) -> None:
    """Send every logger's records to stderr; `tag` names the process (e.g. "master").

    `final_fd` is where stderr will point later (a new generation writes through its
    predecessor until it is ready): the format is chosen for that destination."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal(final_fd):
        handler.setFormatter(JournalFormatter(f"{tag}[%(process)d]: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {tag}[%(process)d] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
