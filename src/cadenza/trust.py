"""Who may change what the service runs: the writable-by-others rules, in one place.

Whoever can replace the pinned launcher, a directory on its way, a symlink it passes through,
or the config, decides what the next generation execs: that hands them the service account.

`open_trusted` walks a path one component at a time with O_PATH|O_NOFOLLOW, relative to the
directory it has already checked, and follows every symlink by hand. Each directory, each
symlink and the file itself must be owned by root or the service user and be writable by
nobody else (a root-owned sticky directory such as /tmp lets nobody rename another's entries).
It returns an fd of the very file it checked, so the caller execs that (fexecve), never a path
that could be swapped between the check and the exec.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

MAX_SYMLINKS = 40   # as the kernel's path walk (path_resolution(7))


class Untrusted(Exception):
    """The path cannot be used; the message names the component, the problem and the fix."""


def _problem(where: str, st: os.stat_result, trusted: set[int], service_uid: int) -> str | None:
    if st.st_uid not in trusted:
        who = "root" if service_uid == 0 else f"root or the service user (uid {service_uid})"
        return f"{where} is owned by uid {st.st_uid}, not {who}; chown root {shlex.quote(where)}"
    if stat.S_ISLNK(st.st_mode):
        return None   # a symlink's own mode means nothing; replacing it needs its directory
    sticky_root = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0
    if st.st_mode & 0o022 and not sticky_root:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[st.st_mode & 0o022]
        return (f"{where} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"chmod go-w {shlex.quote(where)}")
    return None


def open_trusted(path: str | os.PathLike, service_uid: int, directory: bool = False) -> tuple[int, str]:
    """(an O_PATH fd of `path`, its real path), or Untrusted saying which component is unsafe."""
    trusted = {0, service_uid}
    text = os.fspath(path)
    if not text.startswith("/"):
        text = os.path.join(os.getcwd(), text)
    todo = [part for part in text.split("/") if part]
    todo.reverse()                     # a stack: the next component is todo[-1]
    stack: list[tuple[int, str]] = []  # (fd, real path) of each directory walked into
    links = 0

    def push_root() -> None:
        fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.append((fd, "/"))
        check(fd, "/")

    def check(fd: int, where: str) -> os.stat_result:
        st = os.fstat(fd)
        problem = _problem(where, st, trusted, service_uid)
        if problem:
            raise Untrusted(problem)
        return st

    try:
        push_root()
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            parent_fd, parent = stack[-1]
            where = os.path.join(parent, part)
            try:
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as exc:
                raise Untrusted(f"{where}: {exc.strerror}") from None
            try:
                st = check(fd, where)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise Untrusted(f"{text}: too many levels of symbolic links")
                    target = os.readlink(part, dir_fd=parent_fd)
                    todo.extend(reversed([p for p in target.split("/") if p]))
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[0])
                        push_root()
                    os.close(fd)
                    continue
                if todo or stat.S_ISDIR(st.st_mode):
                    if not stat.S_ISDIR(st.st_mode):
                        raise Untrusted(f"{where}: not a directory")
                    stack.append((fd, where))
                    continue
            except BaseException:
                os.close(fd)
                raise
            # The last component, and not a directory.
            if directory:
                os.close(fd)
                raise Untrusted(f"{where}: not a directory")
            return fd, where
        if not directory:
            raise Untrusted(f"{stack[-1][1]}: is a directory, not an executable file")
        fd, where = stack.pop()
        return fd, where
    finally:
        for fd, _ in stack:
            os.close(fd)


def unsafe_reason(path: str | os.PathLike, service_uid: int, directory: bool = False) -> str | None:
    """Why someone other than root or the service user could replace `path`; None when nobody can."""
    try:
        fd, _ = open_trusted(path, service_uid, directory)
    except Untrusted as exc:
        return str(exc)
    os.close(fd)
    return None


_WRITERS = {0o020: ("group", "g"), 0o002: ("others", "o"), 0o022: ("group and others", "go")}


def config_problems(path: str | os.PathLike, writers: int = 0o022) -> list[str]:
    """Problems if anyone but the owner may change the config or swap it for another file.

    `writers` picks what counts: 0o022 group and others (`cadenza check`), 0o002 others only
    (what `cadenza run` and an upgrade refuse).
    """
    file = Path(path)
    problems = []
    holder = f"the directory holding {file.name}"
    for target, what in ((file, "the config file"), (file.parent, holder)):
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except OSError as exc:
            problems.append(f"{target}: cannot check permissions of {what}: {exc.strerror or exc}")
            continue
        who, flag = _WRITERS.get(mode & writers, (None, ""))
        if who:
            problems.append(f"{target}: {what} is writable by {who} (mode {mode:04o}), so they could "
                            f"change what the service runs; run chmod {flag}-w {shlex.quote(str(target))}")
    return problems
