"""Keep a PROMETHEUS_MULTIPROC_DIR small and right while processes come and go (DESIGN §9).

Who owns what:
- a live process of the application owns its files, `<typ>_<pid>.db` and `gauge_<mode>_<pid>.db`:
  prometheus_client writes them through mmap, and nobody else writes them;
- this tool owns the files of the dead (the master says who is dead) and the archives
  `counter_archive.db`, `histogram_archive.db`, `summary_archive.db` and
  `gauge_{min,max,sum,mostrecent}_archive.db`, in which the dead's values are kept;
- the master owns the directories (one `gen-<N>` per generation) and runs this tool with the
  release's own Python, one run at a time: the master stays stdlib only and small, and the
  release's prometheus_client is the one that wrote the files.

Why: prometheus_client keeps every dead process's files, reads them all on every scrape, and
goes on exposing the dead's `gauge_all` series (prometheus/client_python#115); workers
recycled every N requests would leave thousands of files. Here a dead pid's counters,
histograms and summaries are summed into the archives, its min/max/sum/mostrecent gauges
folded with their mode's own rule, its live gauges dropped (`mark_process_dead`) and its
`gauge_all` file removed; then its files are gone.

Why the collector reads the archives right: `MultiProcessCollector` splits a file's name on
"_": part 0 is the type, part 1 the gauge mode, part 2 minus ".db" the pid, used only as a
label of `all` gauges. So `counter_archive.db` is a counter file and `gauge_max_archive.db` a
max gauge of "pid" archive, which a max gauge drops. A temporary file ends in ".tmp" and a
file set aside ends in ".bad": the collector globs "*.db" and never sees either.

Concurrency: a run holds an exclusive flock(2) on DIR/.lock (both directories for a fold,
taken in a fixed order) while it reads, rewrites and unlinks, so two runs never lose counts.
A scrape takes no lock: it lists the files, then reads them one by one. A merge that lands
inside that pass (a few ms) makes the scrape count the merged pid twice (it read the pid's
file before, the new archive after) or fail with FileNotFoundError (the pid's file it listed
is gone; prometheus_client tolerates that only for live gauges); it never silently misses
one. The same holds for a run killed between an archive's rename(2) and the unlinks: the
files left behind are counted again by the next run.

Exit codes: 0 done; 1 done, but a file was set aside as `.bad` or something could not be
done (each said on stderr with its path); 2 usage; 3 this Python has no prometheus_client
(`prune` and `fold SRC -` need none).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import sys

USAGE = ("usage: python -m cadenza.tools.multiproc merge DIR PID [PID ...]"
         " | fold SRC DST|- | prune DIR KEEP [KEEP ...]")
# Exit codes of this tool (the master reads them).
OK, BAD_FILES, USAGE_ERROR, NO_CLIENT = 0, 1, 2, 3

ADDITIVE = ("counter", "histogram", "summary")
GAUGE_MODES = ("min", "max", "sum", "mostrecent")   # the modes whose dead values still count
ARCHIVE = "archive"
_HEADER = struct.Struct("i")                        # mmap_dict: 4-byte used size, 4 of padding


class BadFile(Exception):
    """A file that prometheus_client's reader cannot make sense of."""


def _client():
    # Imported here, not at the top: importing this module (for its exit codes, say) must not
    # load prometheus_client, and `prune` works without it.
    from prometheus_client import mmap_dict, multiprocess
    return mmap_dict, multiprocess


def _archive_for(name: str) -> str | None:
    """The archive a file's values go to; None for a file to drop (live and `all` gauges);
    raises ValueError for a name prometheus_client does not write."""
    parts = name[:-len(".db")].split("_")
    if parts[0] in ADDITIVE and len(parts) == 2:
        return f"{parts[0]}_{ARCHIVE}.db"
    if parts[0] == "gauge" and len(parts) == 3:
        if parts[1] in GAUGE_MODES:
            return f"gauge_{parts[1]}_{ARCHIVE}.db"
        if parts[1] == "all" or parts[1].startswith("live"):
            return None
    raise ValueError(name)


def _mode(archive: str) -> str:
    parts = archive.split("_")
    return parts[1] if parts[0] == "gauge" else "sum"


def _read(path: str) -> list[tuple[str, float, float]]:
    """Every (key, value, timestamp) of one file, or BadFile saying what is wrong with it."""
    mmap_dict, _ = _client()
    size = os.stat(path).st_size
    if size == 0:
        return []        # created, killed before its first write: empty, not damaged
    if size < _HEADER.size:
        raise BadFile(f"{size} bytes, shorter than the {_HEADER.size}-byte header")
    with open(path, "rb") as f:
        used = _HEADER.unpack(f.read(_HEADER.size))[0]
    if used == 0:
        return []
    if not 8 <= used <= size:
        raise BadFile(f"its header says {used} bytes are used, the file has {size}")
    entries, last = [], -1
    try:
        for key, value, timestamp, pos in mmap_dict.MmapedDict.read_all_values_from_file(path):
            if pos <= last:   # a negative length walks back: the reader would loop for ever
                raise BadFile(f"entry at byte {pos} points back into the file (garbage length)")
            last = pos
            entries.append((_canonical(key, pos), value, timestamp))
    except (RuntimeError, struct.error, UnicodeDecodeError) as exc:
        raise BadFile(f"after byte {last}: {exc}") from exc
    return entries


def _canonical(key: str, pos: int) -> str:
    mmap_dict, _ = _client()
    try:
        metric, sample, labels, help_text = json.loads(key)
        strings = (metric, sample, help_text, *labels, *labels.values())
        if not all(isinstance(x, str) for x in strings):
            raise TypeError
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadFile(f"entry at byte {pos} has key {key[:80]!r}, not prometheus_client's"
                      " [metric, sample, labels, help]") from exc
    return mmap_dict.mmap_key(metric, sample, list(labels), list(labels.values()), help_text)


def _fold(values: dict, entries, mode: str) -> None:
    for key, value, ts in entries:
        old = values.get(key)
        if old is None:
            values[key] = (value, ts)
        elif mode == "sum":
            values[key] = (old[0] + value, max(old[1], ts))
        elif {"min": value < old[0], "max": value > old[0],
              "mostrecent": ts > old[1]}[mode]:   # the collector's rules; a tie keeps the old
            values[key] = (value, ts)


def _set_aside(path: str, why: str, problems: list[str]) -> None:
    problems.append(f"{path}: {why}; renamed to {os.path.basename(path)}.bad, not counted")
    os.replace(path, path + ".bad")


def _write(path: str, values: dict) -> str:
    """A new archive for `path`, under a name the collector does not read; returns the name."""
    mmap_dict, _ = _client()
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)   # left by a run that was killed: MmapedDict would append to it
    d = mmap_dict.MmapedDict(tmp)
    try:
        for key, (value, ts) in values.items():
            d.write_value(key, value, ts)
    finally:
        d.close()
    return tmp


def _absorb(dst: str, sources: list[str], problems: list[str]) -> None:
    """Fold the files `sources` (of the dead) into dst's archives, and unlink them."""
    groups: dict[str, list[str]] = {}
    for src in sources:
        archive = _archive_for(os.path.basename(src))
        if archive is None:
            os.unlink(src)
        else:
            groups.setdefault(archive, []).append(src)
    swaps = []
    for archive, srcs in sorted(groups.items()):
        path, mode, values = os.path.join(dst, archive), _mode(archive), {}
        if os.path.exists(path):
            try:
                _fold(values, _read(path), mode)
            except BadFile as exc:
                _set_aside(path, f"{exc}; the archive starts again from the files merged now",
                           problems)
        done = []
        for src in srcs:
            try:
                _fold(values, _read(src), mode)
                done.append(src)
            except BadFile as exc:
                _set_aside(src, str(exc), problems)
        swaps.append((_write(path, values) if values else None, path, done))
    # All reading and writing done first: the archives then change in one burst of renames
    # and unlinks, the shortest time a scrape can see a pid in both its file and an archive.
    for tmp, path, done in swaps:
        if tmp is not None:
            os.replace(tmp, path)
        for src in done:
            os.unlink(src)


def _lock(directory: str) -> int | None:
    """An exclusive flock on directory/.lock; None when the directory is gone."""
    path = os.path.join(directory, ".lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The lock is on an inode: a fold that removed the directory while we waited leaves
        # us holding a lock nobody else can see. Only the file still at `path` counts.
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def _locked(*directories: str):
    fds: dict[str, int | None] = {}
    try:
        for d in sorted(set(directories)):   # one order for every run: no deadlock
            fds[d] = _lock(d)
        yield fds
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def _alive(pid: int) -> bool:
    """True for a process that runs (a zombie is dead: its files are final)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")


def merge(directory: str, pids, notes: list[str] | None = None) -> list[str]:
    """Merge the files of the dead processes `pids` of `directory` into its archives.
    Returns the problems (files set aside); `notes` gets the pids skipped as alive."""
    _, multiprocess = _client()
    problems: list[str] = []
    with _locked(directory) as fds:
        if fds[directory] is None:
            return problems
        dead = set()
        for pid in pids:
            if _alive(int(pid)):
                # Reused by a new process since the master reaped it: a new prometheus_client
                # process carries on from the files it finds, so they are its own now.
                if notes is not None:
                    notes.append(f"pid {pid} is alive (reused?): {directory}: its files left to it")
                continue
            multiprocess.mark_process_dead(pid, directory)
            dead.add(str(pid))
        sources = []
        for name in sorted(os.listdir(directory)):
            if name.endswith(".db") and name[:-3].rsplit("_", 1)[-1] in dead:
                try:
                    _archive_for(name)
                except ValueError:
                    continue   # not a prometheus_client name: not ours to touch
                sources.append(os.path.join(directory, name))
        _absorb(directory, sources, problems)
    return problems


def fold(src: str, dst: str) -> list[str]:
    """Fold every file of the gone generation `src` into dst's archives, then remove src
    (dst "-": just remove it). Returns the problems."""
    problems: list[str] = []
    if not os.path.isdir(src):
        return problems
    into = dst != "-"
    if into:
        with contextlib.suppress(FileExistsError):
            os.mkdir(dst, 0o700)
    with _locked(src, *([dst] if into else [])) as fds:
        if fds[src] is None:
            return problems   # another run removed it while we waited
        if into and fds[dst] is None:
            problems.append(f"{dst}: removed while this run waited for its lock;"
                            f" {src} is kept: fold it again into the live directory")
            return problems
        if into:
            sources = []
            for name in sorted(os.listdir(src)):
                if not name.endswith(".db"):
                    continue
                try:
                    _archive_for(name)
                    sources.append(os.path.join(src, name))
                except ValueError:
                    problems.append(f"{os.path.join(src, name)}: not a file prometheus_client"
                                    " writes; removed with its directory, not counted")
            _absorb(dst, sources, problems)
        shutil.rmtree(src)
    return problems


def prune(directory: str, keep) -> list[str]:
    """Remove every gen-* directory of `directory` not named in `keep`. Returns the problems."""
    problems: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return problems
    for name in sorted(set(names) - set(keep)):
        path = os.path.join(directory, name)
        if name.startswith("gen-") and os.path.isdir(path) and not os.path.islink(path):
            try:
                shutil.rmtree(path)
            except OSError as exc:
                problems.append(f"{exc.filename or path}: {exc.strerror or exc}; not removed:"
                                " check its owner and mode")
    return problems


def _usage(why: str) -> int:
    print(f"multiproc: {why}; {USAGE}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "merge":
        if len(rest) < 2:
            return _usage("merge needs DIR and at least one PID")
        bad = [p for p in rest[1:] if not (p.isascii() and p.isdigit() and int(p) > 0)]
        if bad:
            return _usage(f"merge: PID must be a positive integer, got {bad[0]!r}")
    elif command == "fold":
        if len(rest) != 2:
            return _usage("fold needs SRC and DST (or - to only remove SRC)")
        if rest[1] != "-" and os.path.realpath(rest[0]) == os.path.realpath(rest[1]):
            return _usage(f"fold: SRC and DST are the same directory {rest[0]!r}")
    elif command == "prune":
        if len(rest) < 2:
            return _usage("prune needs DIR and at least one KEEP name")
        problems = prune(rest[0], rest[1:])
        for line in problems:
            print(f"multiproc: {line}", file=sys.stderr)
        return BAD_FILES if problems else OK
    else:
        return _usage(f"unknown command {command!r}" if command else "no command")
    if command == "merge" or rest[1] != "-":
        try:
            _client()
        except ImportError as exc:
            print(f"multiproc: {sys.executable} cannot import prometheus_client ({exc}), so the"
                  " dead processes' metrics files are not merged; install it in the release's"
                  f" venv: {sys.executable} -m pip install 'prometheus-client>=0.20'",
                  file=sys.stderr)
            return NO_CLIENT
    notes: list[str] = []
    try:
        if command == "merge":
            problems = merge(rest[0], [int(p) for p in rest[1:]], notes)
        else:
            problems = fold(rest[0], rest[1])
    except OSError as exc:
        problems = [(f"{exc.filename or rest[0]}: {exc.strerror or exc}; nothing more was"
                     " merged: check the directory's owner and mode, then run it again")]
    for line in notes + problems:
        print(f"multiproc: {line}", file=sys.stderr)
    return BAD_FILES if problems else OK


if __name__ == "__main__":
    sys.exit(main())
