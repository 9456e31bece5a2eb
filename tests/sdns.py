"""A real systemd 252 as PID 1 of throw-away namespaces ("sdns"), for tests; stdlib only.

Implements /work/shared/docs/systemd-in-namespace.md.  The machine is shared, so the namespace
gets a read-only root, tmpfs over everything systemd writes, a private /dev, read-only
/proc/sys and sysfs, and a cgroup namespace rooted at a dedicated `sdns-<id>` cgroup2 dir.
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMD = Path("/lib/systemd/systemd")
UNIT_DIR = Path("/lib/systemd/system")
TOOLS = ("unshare", "nsenter", "setpriv", "mount", "bash", "cat")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Environment of every command run inside: nothing of the test process (venv, NOTIFY_SOCKET,
# SYSTEMD_*) leaks in, and systemctl/journalctl never start a pager or print colours.
INNER_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
LOG_LEVELS = {"emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"}
# Capabilities that act on the whole machine (modules, clock, audit, raw I/O, ...); nothing in
# a test namespace needs them.  Recipe §1.
DROPPED_CAPS = ("sys_module", "sys_time", "audit_write", "audit_control", "audit_read",
                "syslog", "sys_rawio", "wake_alarm", "block_suspend", "mac_admin",
                "mac_override", "sys_pacct", "sys_tty_config", "lease")
# With the host's network namespace these would let the namespace reconfigure the host's network.
HOST_NET_CAPS = ("net_admin", "net_raw")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None)

# Runs as PID 1 of the new namespaces; argv: STATE CONSOLE LOG_LEVEL.  Every mount uses -n so
# nothing is written to the host's /run/mount/utab.
INNER_SH = r"""set -eu
STATE=$1 CONSOLE=$2 LEVEL=$3
# 1. /proc is still the host's procfs, so "self" is our pid in the host pid namespace.
read -r hostpid _ < /proc/self/stat
echo "$hostpid" > "$STATE/hostpid"
mount -n --make-rprivate /
# Read-only is a per-mount flag: this only affects our mount namespace.  Every inherited mount,
# not just /, so a host with a separate /var or /home is protected as well; mounts that are
# already read-only, or that the steps below hide or replace, are skipped (each mount is ~2 ms).
while read -r _ _ _ _ p opts _; do
  printf -v p '%b' "$p"   # mountinfo escapes blanks and backslashes as octal
  case "$p/" in /proc/*|/dev/*|/run/*|/tmp/*|/var/tmp/*|/sys/fs/cgroup/*) continue;; esac
  case "$opts," in ro,*) continue;; esac
  mount -n -o remount,bind,ro "$p" 2>/dev/null || [ ! -e "$p" ] || {
    echo "sdns: cannot make $p read-only" >&2; exit 1; }
done < <(cat /proc/self/mountinfo)  # a snapshot: the loop itself changes mount options
# 1b. With overlay=True, the root is a copy-on-write copy of the host's: an overlayfs per host
# mount (the read-only / and whatever else is mounted outside the API and temporary places), whose
# upper layers live on a tmpfs of this namespace, so every write stays here and vanishes with it.
# (A tmpfs is another filesystem, so no layer overlaps another.)  Steps 2-5 build the new root
# at $R, then the script pivots into it.  Without overlay, R is empty and they act on / itself.
R= UNIT_PATH=/etc/systemd/system:/run/sdns/units
if [ -n "${SDNS_OVERLAY:-}" ]; then
  R=/run/sdns-root UNIT_PATH=$UNIT_PATH:/lib/systemd/system
  mapfile -t mounts < <(while read -r _ _ _ _ p _; do printf '%b\n' "$p"; done \
                          < /proc/self/mountinfo | LC_ALL=C sort -u)  # parents first
  mount -n -t tmpfs -o mode=0700 tmpfs /run  # the layers and the new root's mount point
  mkdir "$R" /run/sdns-layers
  i=0
  for p in "${mounts[@]}"; do
    case "$p/" in /proc/*|/dev/*|/run/*|/sys/*|/tmp/*|/var/tmp/*) continue;; esac
    [ -e "$p" ] || continue
    i=$((i + 1)); l=/run/sdns-layers/$i; mkdir "$l" "$l/upper" "$l/work"
    # ",", ":" and "\" would need escaping in the options
    if [[ -d $p && $p != *[,:\\]* ]] &&
       mount -n -t overlay -o "lowerdir=$p,upperdir=$l/upper,workdir=$l/work" overlay "$R$p"; then
      continue
    fi
    [ "$p" != / ] || { echo "sdns: cannot mount the overlay root" >&2; exit 1; }
    mount -n --bind "$p" "$R$p"  # a file, or a filesystem overlayfs refuses: read-only as it is
    mount -n -o remount,bind,ro "$R$p"
  done
fi
# 2. Writable places: tmpfs, plus the state dir at /run/sdns and at its host path.
mount -n -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mkdir "$R/run/sdns" "$R/run/sdns-empty" "$R/run/sdns-dev"
mount -n --bind "$STATE" "$R/run/sdns"
mount -n -o remount,bind,rw "$R/run/sdns"
# The checkout and its venv (SDNS_SHARE), read-only at their own paths even when they live where
# a tmpfs is about to go (a clone under /tmp): parked under /run first, put back after.
IFS=: read -r -a shares <<< "${SDNS_SHARE:-}"
for i in "${!shares[@]}"; do
  mkdir "$R/run/sdns-share-$i"
  mount -n --bind "${shares[$i]}" "$R/run/sdns-share-$i"
done
for d in /tmp /var/tmp; do mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R$d"; done
for d in /var/log /var/lib/systemd /etc/systemd/system ${SDNS_EXTRA_TMPFS:-}; do
  mount -n -t tmpfs -o mode=0755 tmpfs "$R$d"
done
mkdir -p "$R$STATE"
mount -n --bind "$R/run/sdns" "$R$STATE"
mount -n -o remount,bind,rw "$R$STATE"
for i in "${!shares[@]}"; do
  mkdir -p "$R${shares[$i]}"
  mount -n --bind "$R/run/sdns-share-$i" "$R${shares[$i]}"
  mount -n -o remount,bind,ro "$R${shares[$i]}"
  umount -n "$R/run/sdns-share-$i" && rmdir "$R/run/sdns-share-$i"
done
# 3. Our own /proc; /proc/sys read-only, or PID 1 bumps the host's fs.file-max and fs.nr_open.
mount -n -t proc -o nosuid,nodev,noexec proc "$R/proc"
for p in "$R/proc/sys" "$R/proc/sysrq-trigger"; do
  if [ -e "$p" ]; then mount -n --bind "$p" "$p"; mount -n -o remount,bind,ro "$p"; fi
done
# 4. Read-only sysfs; with the host netns the kernel refuses a new one ("already mounted").
if [ -z "$R" ]; then
  umount -n -l /sys/fs/cgroup
  mount -n -t sysfs -o ro,nosuid,nodev,noexec sysfs /sys 2>/dev/null ||
    mount -n -o remount,bind,ro /sys
else  # the host's /sys without its submounts
  mount -n -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys" 2>/dev/null ||
    { mount -n --bind /sys "$R/sys" && mount -n -o remount,bind,ro "$R/sys"; }
fi
# Rooted at sdns-<id> by the cgroup namespace; never mount cgroup2 from the init cgroup ns.
mount -n -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
# 5. Private /dev: the host's devtmpfs is one superblock shared by everyone.
dev=$R/run/sdns-dev
mount -n -t tmpfs -o mode=0755,nosuid,noexec tmpfs "$dev"
for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  IFS=: read -r name major minor <<< "$spec"
  mknod -m 0666 "$dev/$name" c "$major" "$minor"
done
mkdir "$dev/pts" "$dev/shm"
mount -n -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$dev/pts"
ln -s pts/ptmx "$dev/ptmx"
mount -n -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$dev/shm"
ln -s /proc/self/fd "$dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$dev/${i#*:}"; done
# The machine's console is ttyS0: never reachable; ours is the harness pty or /dev/null.
touch "$dev/console"
mount -n --bind "$CONSOLE" "$dev/console"
mount -n -o remount,bind,rw "$dev/console"
mount -n --move "$dev" "$R/dev"
if [ -n "$R" ]; then
  # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves the host's
  # mounts out of reach (and out of systemd's sight); nsenter -m then lands in the new root.
  cd "$R"
  pivot_root . .
  umount -n -l .
  cd /
  # /lib/systemd/system holds only the base units that /run/sdns/units links to: units that a
  # package installs there load as on a machine, and none of the host's (or their .wants) do.
  units=/run/sdns-units
  mkdir "$units"
  mount -n -t tmpfs -o mode=0755 tmpfs "$units"
  for link in /run/sdns/units/*; do
    target=$(readlink "$link") || continue
    case "$target" in /lib/systemd/system/*) cp -L "$target" "$units/";; esac
  done
  mount -n --move "$units" /lib/systemd/system
  rmdir "$units"
fi
# 6. container= keeps PID 1 off core_pattern, printk, the clock, SELinux/IMA and kmod.
exec env -i container=sdns PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 SYSTEMD_UNIT_PATH="$UNIT_PATH" \
  SYSTEMD_GENERATOR_PATH=/run/sdns-empty SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/sdns-empty \
  NOTIFY_SOCKET=/run/sdns/notify.sock \
  /lib/systemd/systemd --system --unit=sdns.target --show-status=no --log-level="$LEVEL"
"""


class BootError(RuntimeError):
    """systemd did not report READY=1; the message carries the namespace's console."""


class CommandFailed(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def cgroup2_base() -> Path | None:
    """The host's cgroup2 mount: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup2" and fields[4] in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                return Path(fields[4])
    return None


def shared_paths() -> list[str]:
    """The checkout (tests/..) and the venv running the tests: services under test run from them,
    wherever CI cloned the repository."""
    paths = []
    for p in (Path(__file__).resolve().parent.parent, Path(sys.prefix).resolve()):
        if p.is_dir() and ":" not in str(p) and not any(str(p).startswith(q + "/") or str(p) == q for q in paths):
            paths.append(str(p))
    return paths


def hardening_dropin() -> str | None:
    """A drop-in that binds the checkout back for a unit whose PrivateTmp=/ProtectHome= would hide
    it (CI may clone under /tmp or /root); None when nothing is hidden."""
    hidden = [p for p in shared_paths() if p.startswith(("/tmp/", "/var/tmp/", "/home/", "/root/"))]
    return f"[Service]\nBindReadOnlyPaths={' '.join(hidden)}\n" if hidden else None


def available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "sdns needs root (namespaces, mounts, cgroup2 directories)"
    if not os.access(SYSTEMD, os.X_OK):
        return False, f"{SYSTEMD} is missing: apt-get install systemd"
    missing = [t for t in TOOLS if shutil.which(t, path=PATH) is None]
    if missing:
        return False, f"missing {', '.join(missing)}: apt-get install util-linux bash coreutils"
    base = cgroup2_base()
    if base is None or not os.access(base, os.W_OK):
        return False, "no writable cgroup2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    return True, f"systemd {SYSTEMD}, cgroup2 at {base}"


def janitor() -> list[Path]:
    """Remove the empty sdns-* cgroups that SIGKILLed test sessions leave behind (recipe §4)."""
    base, removed = cgroup2_base(), []
    for top in sorted(base.glob("sdns-*")) if base else ():
        owner = top.name.split("-")[1]
        # A live owner may be between mkdir and moving its child in: not ours to judge.
        if owner.isdigit() and Path("/proc", owner).exists():
            continue
        try:
            if "populated 0" not in (top / "cgroup.events").read_text():
                continue
            for dirpath, _, _ in os.walk(top, topdown=False):
                os.rmdir(dirpath)
        except OSError:
            continue  # vanished, or someone moved a process in meanwhile
        removed.append(top)
    return removed


def base_units(dbus: bool = False) -> dict[str, str | Path]:
    """The minimal unit set (recipe §1): file text, or a Path for a symlink into /lib."""
    def unit(description: str, *lines: str) -> str:
        return "\n".join(("[Unit]", f"Description={description}", *lines)) + "\n"

    sockets = "systemd-journald.socket" + (" dbus.socket" if dbus else "")
    units: dict[str, str | Path] = {
        "sdns.target": unit("sdns boot target", "Requires=basic.target", "After=basic.target",
                            "Wants=multi-user.target", "AllowIsolate=yes"),
        "multi-user.target": unit("Multi-User System", "Requires=basic.target",
                                  "After=basic.target", "AllowIsolate=yes"),
        "basic.target": unit("Basic System", "Requires=sysinit.target",
                             "Wants=sockets.target timers.target paths.target slices.target",
                             "After=sysinit.target sockets.target timers.target paths.target "
                             "slices.target"),
        "sysinit.target": unit("System Initialization", "DefaultDependencies=no",
                               "Wants=systemd-journald.service local-fs.target",
                               "After=local-fs.target"),
        "sockets.target": unit("Sockets", f"Wants={sockets}"),
        "shutdown.target": unit("Shutdown", "DefaultDependencies=no", "RefuseManualStart=yes"),
    }
    for stub in ("local-fs", "timers", "paths", "slices", "network", "network-pre",
                 "network-online", "nss-lookup", "time-sync", "remote-fs"):
        units[f"{stub}.target"] = unit(f"sdns stub {stub}", "DefaultDependencies=no")
    links = ["systemd-journald.service", "systemd-journald.socket"]
    links += ["dbus.service", "dbus.socket"] if dbus else []
    units.update({name: UNIT_DIR / name for name in links})
    return units


def _rmtree_cgroup(top: Path, timeout: float = 5.0) -> None:
    """rmdir bottom-up; EBUSY is transient while the killed tasks are still being released."""
    deadline = time.monotonic() + timeout
    for dirpath, _, _ in os.walk(top, topdown=False):
        while True:
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)


def _rmtree_vanishing(path: Path) -> None:
    """rmtree that tolerates only paths vanishing under it; anything else is a real failure."""
    def vanished(*_) -> None:  # called inside rmtree's `except OSError`
        if not isinstance(sys.exc_info()[1], FileNotFoundError):
            raise
    shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": vanished})


def _reap(proc: subprocess.Popen, timeout: float) -> None:
    """Wait for a child of ours; SIGKILL it (by its pid) if it does not exit in time."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_setup(procs: str, parent: int) -> None:
    # PDEATHSIG -> unshare dies with us -> --kill-child takes the namespace down.
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(70)  # parent already gone: do not boot an orphan
    with open(procs, "w") as f:
        f.write("0")  # into sdns-<id> before unshare(CLONE_NEWCGROUP) roots the namespace there


class SystemdNS:
    """`with SystemdNS(net="host") as ns:` boots; leaving the block leaves nothing behind.

    overlay=True: the root is writable, copy-on-write over the host's read-only one, so a test
    can install packages (dpkg writes /opt, /usr, /var/lib/dpkg ...); the writes live in the
    namespace's memory and vanish with it.  /lib/systemd/system then holds only the base units,
    and is on the unit path: units a package installs there load as they would on a machine.
    """

    def __init__(self, net: str = "host", dbus: bool = False, console: bool = True,
                 log_level: str = "info", boot_timeout: float = 10.0,
                 extra_tmpfs: tuple[str, ...] = (), overlay: bool = False):
        if net not in ("host", "private"):
            raise ValueError(f"net={net!r}: use 'host' or 'private'")
        if log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={log_level!r}: use one of {sorted(LOG_LEVELS)}")
        self.net, self.dbus, self.console, self.log_level = net, dbus, console, log_level
        self.boot_timeout, self.extra_tmpfs = boot_timeout, tuple(extra_tmpfs)
        self.overlay = overlay
        if overlay and shutil.which("pivot_root", path=PATH) is None:
            raise ValueError("overlay=True needs pivot_root: apt-get install util-linux")
        # The owner pid in the name tells the janitor whose cgroup it is.
        self.id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.state: Path | None = None  # host path; the same path inside, and /run/sdns
        self.cgroup: Path | None = None
        self.pid1: int | None = None  # host pid of the namespace's systemd
        self.boot_seconds: float | None = None
        self.last_console = ""  # the console log, kept by stop() when it removes the state dir
        self._pid1fd: int | None = None
        self._unshare: subprocess.Popen | None = None
        self._cat: subprocess.Popen | None = None  # copies the console pty to console.log
        self._popens: list[subprocess.Popen] = []

    def __enter__(self) -> "SystemdNS":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- boot ------------------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        try:
            self._prepare_state()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as nfy:
                nfy.bind(str(self.state / "notify.sock"))
                self._spawn()
                self._await_ready(nfy)
            # Closed after READY=1; systemd's later "Connection refused" on it is harmless.
        except BaseException as e:
            self.stop()
            if isinstance(e, BootError):
                raise BootError(f"{e}\n--- console ---\n{self.last_console}") from None
            raise
        self.boot_seconds = time.monotonic() - t0

    def _prepare_state(self) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sdns-"))
        self.state.chmod(0o755)  # so a User=nobody service can reach files under it
        (self.state / "units").mkdir()
        for name, body in base_units(self.dbus).items():
            dest = self.state / "units" / name
            dest.symlink_to(body) if isinstance(body, Path) else dest.write_text(body)
        (self.state / "inner.sh").write_text(INNER_SH)
        self.cgroup = cgroup2_base() / f"sdns-{self.id}"
        self.cgroup.mkdir()

    def _spawn(self) -> None:
        log = open(self.state / "console.log", "wb")
        if self.console:
            master, stdio = os.openpty()
            # A process, not a thread: the harness stays single-threaded for preexec_fn.
            self._cat = subprocess.Popen(["cat"], stdin=master, stdout=log,
                                         stderr=subprocess.DEVNULL, env=INNER_ENV)
            os.close(master)
            console = os.ttyname(stdio)
        else:
            stdio, console = os.dup(log.fileno()), "/dev/null"
        log.close()
        caps = DROPPED_CAPS + (HOST_NET_CAPS if self.net == "host" else ())
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc",
               "--cgroup", *(["--net"] if self.net == "private" else []),
               "--propagation", "private", "--",
               "setpriv", "--bounding-set", ",".join("-" + c for c in caps), "--",
               "/bin/bash", str(self.state / "inner.sh"), str(self.state), console,
               self.log_level]
        env = dict(INNER_ENV, SDNS_EXTRA_TMPFS=" ".join(self.extra_tmpfs),
                   SDNS_OVERLAY="1" if self.overlay else "", SDNS_SHARE=":".join(shared_paths()))
        procs, parent = str(self.cgroup / "cgroup.procs"), os.getpid()
        try:
            self._unshare = subprocess.Popen(
                cmd, stdin=stdio, stdout=stdio, stderr=stdio, env=env, start_new_session=True,
                preexec_fn=lambda: _child_setup(procs, parent))
        finally:
            os.close(stdio)  # the console sees EOF once the namespace is gone

    def _await_ready(self, nfy: socket.socket) -> None:
        """Wait for READY=1 (systemd sends it at "Startup finished"), or for unshare to die."""
        pidfd = os.pidfd_open(self._unshare.pid)
        deadline = time.monotonic() + self.boot_timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([nfy, pidfd], [], [], left)
                if pidfd in ready:
                    raise BootError("sdns: the namespace exited during boot with status "
                                    f"{self._unshare.wait()}")
                if nfy in ready and b"READY=1" in nfy.recv(4096).split(b"\n"):
                    return self._adopt_pid1()
            raise BootError(f"sdns: no READY=1 from systemd within {self.boot_timeout}s")
        finally:
            os.close(pidfd)

    def _adopt_pid1(self) -> None:
        self.pid1 = int((self.state / "hostpid").read_text())
        # A pidfd makes the later kill hit this process even if the pid were reused.
        self._pid1fd = os.pidfd_open(self.pid1)

    # --- teardown --------------------------------------------------------------------------
    def stop(self) -> None:
        """Idempotent; safe after a failed or partial start."""
        try:
            self._kill_namespace()
            self._stop_console()
            if self.cgroup is not None:
                _rmtree_cgroup(self.cgroup)
                self.cgroup = None
        finally:
            if self.state is not None:
                self.last_console = self.console_log()
                _rmtree_vanishing(self.state)
                self.state = None

    def _kill_namespace(self) -> None:
        if self._pid1fd is not None:
            try:
                signal.pidfd_send_signal(self._pid1fd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # systemd already died; unshare has reaped or will reap it
            os.close(self._pid1fd)
            self._pid1fd = None
        elif self._unshare is not None and self._unshare.poll() is None:
            self._unshare.kill()  # no pid1 yet: unshare's PDEATHSIG on its child does it
        if self._unshare is not None:
            _reap(self._unshare, timeout=10)
        for p in self._popens:  # their children inside died with the pid namespace
            _reap(p, timeout=5)
        self._popens.clear()

    def _stop_console(self) -> None:
        if self._cat is not None:  # cat exits on EIO once the last slave is closed; waiting
            _reap(self._cat, timeout=2)  # for that keeps the whole log
            self._cat = None

    # --- driving ---------------------------------------------------------------------------
    def _nsenter(self, cwd: str | os.PathLike | None) -> list[str]:
        if self.pid1 is None:
            raise RuntimeError("sdns: the namespace is not running")
        cmd = ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-p", "-C"]
        cmd += ["-n"] if self.net == "private" else []
        # setns() into the mount ns resets the cwd to /; --wdns chdirs inside instead.
        cmd += [f"--wdns={cwd}"] if cwd is not None else []
        return cmd + ["--"]

    def run(self, *cmd: str, check: bool = False, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", INNER_ENV)
        argv = self._nsenter(kw.pop("cwd", None)) + [str(c) for c in cmd]
        proc = subprocess.run(argv, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, list(cmd), proc.stdout, proc.stderr)
        return proc

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        kw.setdefault("env", INNER_ENV)
        argv = self._nsenter(kw.pop("cwd", None)) + [str(c) for c in cmd]
        proc = subprocess.Popen(argv, **kw)
        self._popens.append(proc)
        return proc

    def systemctl(self, *args: str, check: bool = False,
                  timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        args = [a for p in props for a in ("-p", p)]
        out = self.systemctl("show", unit, *args, check=True).stdout
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args).stdout

    def wait_for(self, unit: str, prop: str, value: str, timeout: float = 10) -> None:
        # Polling: systemd offers no event a host-side process could wait on without D-Bus.
        deadline = time.monotonic() + timeout
        while (last := self.show(unit, prop).get(prop)) != value:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{unit}: {prop}={last!r}, wanted {value!r} within {timeout}s\n"
                    f"--- journal tail ---\n{self.journal('-n', '40')}")
            time.sleep(0.02)

    def write_unit(self, name: str, text: str) -> Path:
        path = self.state / "units" / name
        path.parent.mkdir(parents=True, exist_ok=True)   # drop-ins: NAME.service.d/x.conf
        path.write_text(text)
        return path

    def host_path(self, path: str) -> Path:
        """Host-side path of a file inside the namespace (e.g. in its tmpfs /etc)."""
        return Path(f"/proc/{self.pid1}/root", str(path).lstrip("/"))

    def console_log(self) -> str:
        if self.state is None or not (self.state / "console.log").exists():
            return ""
        return (self.state / "console.log").read_text(errors="replace").replace("\r", "")
