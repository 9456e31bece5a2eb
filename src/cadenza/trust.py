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
_FDINFO = "/proc/self/fdinfo/{}"
_MOUNTINFO = "/proc/self/mountinfo"


class Untrusted(Exception):
    """The path cannot be used; the message names the component, the problem and the fix."""


def _problem(where: str, st: os.stat_result, trusted: set[int], service_uid: int) -> str | None:
    if st.st_uid not in trusted:
        who = "root" if service_uid == 0 else f"root or the service user (uid {service_uid})"
        return f"{where} is owned by uid {st.st_uid}, not {who}; chown root {shlex.quote(where)}"
    if stat.S_ISLNK(st.st_mode):
        return None   # a symlink's own mode means nothing; replacing it needs its directory
    writable = _writable(st, 0o022)
    if writable:
        who, flag = writable
        return (f"{where} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"chmod {flag}-w {shlex.quote(where)}")
    return None


def _writable(st: os.stat_result, writers: int) -> tuple[str, str] | None:
    """(who, chmod letters) when `writers` may write to it; a root-owned sticky directory such
    as /tmp lets nobody rename or remove another's entries, so it counts as safe."""
    sticky_root = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and st.st_uid == 0
    if st.st_mode & writers and not sticky_root:
        return _WRITERS[st.st_mode & writers]
    return None


def _fuse_mounter(fd: int) -> int | None:
    """The uid that mounted the FUSE filesystem `fd` is on, -1 when it does not say; None when
    `fd` is not on FUSE (or /proc cannot tell)."""
    try:
        with open(_FDINFO.format(fd)) as f:
            mnt_id = next((line.split()[1] for line in f if line.startswith("mnt_id:")), None)
        with open(_MOUNTINFO) as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == mnt_id and "-" in fields:
                    fstype, _source, options = (fields[fields.index("-") + 1:] + ["", "", ""])[:3]
                    if fstype.split(".")[0] not in ("fuse", "fuseblk"):
                        return None
                    for option in options.split(","):
                        if option.startswith("user_id=") and option[8:].isdigit():
                            return int(option[8:])
                    return -1
    except (OSError, IndexError):
        pass
    return None


def _parts(text: str) -> list[str]:
    parts = [part for part in text.split("/") if part]
    if parts and text.endswith("/"):
        parts.append(".")   # "file/" names a directory, as for the kernel (ENOTDIR otherwise)
    return parts


def _walk(path: str | os.PathLike, visit, want: str) -> tuple[int, str]:
    """Resolve `path` as the kernel would, one component at a time, following symlinks by hand.

    visit(where, fd, st, parent_st) sees "/" (parent_st None) and then every directory, symlink
    and the final file as it is reached, before anything is opened relative to it, and raises
    Untrusted to refuse it. `want` is what the path must end at: "file" (a regular file), "dir",
    or "any". Returns (an O_PATH fd of the final component, its real path)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        text = os.path.join(os.getcwd(), text)
    todo = _parts(text)
    todo.reverse()                     # a stack: the next component is todo[-1]
    stack: list[tuple[int, str, os.stat_result]] = []   # each directory walked into
    links = 0

    def push_root() -> None:
        try:
            fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Untrusted(f"/: {exc.strerror}") from None
        stack.append((fd, "/", os.fstat(fd)))
        visit("/", fd, stack[-1][2], None)

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
            parent_fd, parent, parent_st = stack[-1]
            where = os.path.join(parent, part)
            try:
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as exc:
                raise Untrusted(f"{where}: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                visit(where, fd, st, parent_st)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise Untrusted(f"{text}: too many levels of symbolic links")
                    try:
                        # readlinkat(fd, ""): the very link checked, not whatever has its name now.
                        target = os.readlink("", dir_fd=fd)
                    except OSError as exc:
                        raise Untrusted(f"{where}: {exc.strerror}") from None
                    todo.extend(reversed(_parts(target)))
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[0])
                        push_root()
                    os.close(fd)
                    continue
                if todo or stat.S_ISDIR(st.st_mode):
                    if not stat.S_ISDIR(st.st_mode):
                        raise Untrusted(f"{where}: not a directory")
                    stack.append((fd, where, st))
                    continue
                # The last component, and not a directory.
                if want == "dir":
                    raise Untrusted(f"{where}: not a directory")
                if want == "file" and not stat.S_ISREG(st.st_mode):
                    raise Untrusted(f"{where}: not a regular file")
            except BaseException:
                os.close(fd)
                raise
            return fd, where
        if want == "file":
            raise Untrusted(f"{stack[-1][1]}: is a directory, not an executable file")
        fd, where, _ = stack.pop()
        return fd, where
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def open_trusted(path: str | os.PathLike, service_uid: int, directory: bool = False) -> tuple[int, str]:
    """(an O_PATH fd of `path`, its real path), or Untrusted saying which component is unsafe.

    The fd is close-on-exec. To exec it (os.execve(fd, ...)), a `#!` script needs the fd made
    inheritable first: the kernel hands its interpreter /dev/fd/N."""
    trusted = {0, service_uid}

    def visit(where: str, fd: int, st: os.stat_result, parent_st: os.stat_result | None) -> None:
        problem = _problem(where, st, trusted, service_uid)
        if problem:
            raise Untrusted(problem)
        if parent_st is None or st.st_dev != parent_st.st_dev:
            # A FUSE filesystem reports whatever owners and modes its server likes: whoever
            # mounted it owns everything on it.
            mounter = _fuse_mounter(fd)
            if mounter is not None and mounter not in trusted:
                by = "an unknown user" if mounter < 0 else f"uid {mounter}"
                raise Untrusted(f"{where} is on a FUSE filesystem mounted by {by}, which decides "
                                f"every owner and mode it shows; use a path on a filesystem root mounted")

    return _walk(path, visit, "dir" if directory else "file")


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
    (what `cadenza run` and an upgrade refuse). The file and the directory holding it are
    checked first; then every other directory on the way to the file it really is, through its
    symlinks (a root-owned sticky directory such as /tmp is safe there). Where the kernel
    reaches a file that a walk by hand cannot (/dev/stdin, a magic link to "pipe:[N]"), the
    directories up to there are checked.
    """
    file = Path(path)
    problems = []
    holder = f"the directory holding {file.name}"
    seen = set()
    for target, what in ((file, "the config file"), (file.parent, holder)):
        try:
            st = os.stat(target)
        except OSError as exc:
            problems.append(f"{target}: cannot check permissions of {what}: {exc.strerror or exc}")
            continue
        seen.add((st.st_dev, st.st_ino))
        mode = stat.S_IMODE(st.st_mode)
        who, flag = _WRITERS.get(mode & writers, (None, ""))
        if who:
            problems.append(f"{target}: {what} is writable by {who} (mode {mode:04o}), so they could "
                            f"change what the service runs; run chmod {flag}-w {shlex.quote(str(target))}")
    if problems and problems[0].startswith(f"{file}: cannot check"):
        return problems

    def visit(where: str, fd: int, st: os.stat_result, parent_st: os.stat_result | None) -> None:
        if (st.st_dev, st.st_ino) in seen or not stat.S_ISDIR(st.st_mode):
            return
        seen.add((st.st_dev, st.st_ino))
        writable = _writable(st, writers)
        if writable:
            who, flag = writable
            problems.append(f"{where}: a directory on the way to {file} is writable by {who} "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}), so they could swap the config "
                            f"for another; run chmod {flag}-w {shlex.quote(where)}")

    try:
        fd, _ = _walk(file, visit, "any")
        os.close(fd)
    except Untrusted:
        pass   # os.stat reached it: a magic link, or a race; what was walked has been checked
    return problems
