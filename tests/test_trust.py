"""trust.py against real files: the attacks on a pinned launcher's path, and the config rule.

Everything lives under a root-owned 0755 directory in pytest's tmp_path, whose own chain
(/ 0755, /tmp 1777 root-owned and sticky, /tmp/pytest-of-root 0700, ...) is trusted: the
fixture checks that first. An untrusted owner is uid 65534 (nobody); the service user is 65533.
Needs root, for chown.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from cadenza import trust
from cadenza.trust import MAX_SYMLINKS, Untrusted, config_problems, open_trusted, unsafe_reason

NOBODY = 65534
SERVICE = 65533

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to other users")


@pytest.fixture
def base(tmp_path):
    """A root-owned 0755 directory whose whole chain from / is trusted."""
    root = tmp_path / "t"
    root.mkdir()
    os.chown(root, 0, 0)
    root.chmod(0o755)
    assert unsafe_reason(root, 0, directory=True) is None, "pytest's tmp_path is not in a trusted chain"
    return root


def mkdir(path, mode=0o755, uid=0):
    """`path` with that mode and owner; missing parents are made root-owned 0755."""
    if not path.parent.exists():
        mkdir(path.parent)
    path.mkdir(exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def mkfile(path, text="#!/bin/sh\necho original\n", mode=0o755, uid=0):
    if not path.parent.exists():
        mkdir(path.parent)
    path.write_text(text)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def symlink(path, target, uid=0):
    path.symlink_to(target)
    os.lchown(path, uid, uid)
    return path


def refused(path, service_uid=0, directory=False) -> str:
    with pytest.raises(Untrusted) as info:
        fd, _ = open_trusted(path, service_uid, directory)
        os.close(fd)
    assert unsafe_reason(path, service_uid, directory) == str(info.value)
    return str(info.value)


def same_file(fd, path) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# --- the good case -------------------------------------------------------------------------------

def test_a_root_owned_chain_passes_with_an_o_path_fd_of_the_very_file(base):
    app = mkfile(base / "bin" / "app")
    fd, real = open_trusted(app, 0)
    try:
        assert real == str(app)
        assert same_file(fd, app)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_PATH
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert unsafe_reason(app, 0) is None
    assert unsafe_reason(base / "bin", 0, directory=True) is None


def test_files_and_directories_of_the_service_user_pass_for_that_user_only(base):
    app = mkfile(mkdir(base / "svc", uid=SERVICE) / "app", uid=SERVICE)
    assert unsafe_reason(app, SERVICE) is None
    assert refused(app, 0) == f"{base / 'svc'} is owned by uid {SERVICE}, not root; chown root {base / 'svc'}"
    assert "not root or the service user (uid 1234)" in refused(app, 1234)


def test_a_relative_path_is_walked_from_the_cwd(base, monkeypatch):
    app = mkfile(base / "bin" / "app")
    monkeypatch.chdir(base)
    fd, real = open_trusted("bin/../bin/./app", 0)
    os.close(fd)
    assert real == str(app)


# --- the attacks ----------------------------------------------------------------------------------

def test_launcher_that_is_a_symlink_into_a_directory_others_can_write(base):
    drop = mkdir(base / "drop", 0o777)
    mkfile(drop / "app")                                # root-owned, 0755: only its directory is wrong
    launcher = symlink(mkdir(base / "bin") / "app", drop / "app")
    reason = refused(launcher)
    assert reason.startswith(f"{drop} is writable by group and others (mode 0777)")
    assert f"chmod go-w {drop}" in reason


def test_a_sticky_directory_owned_by_someone_else_is_not_excepted(base):
    drop = mkdir(base / "drop", 0o1777, uid=NOBODY)
    symlink(mkdir(base / "bin") / "app", mkfile(drop / "app"))
    assert f"{drop} is owned by uid {NOBODY}" in refused(base / "bin" / "app")
    os.chown(drop, SERVICE, SERVICE)
    assert f"{drop} is writable by group and others (mode 1777)" in refused(base / "bin" / "app", SERVICE)


def test_launcher_under_a_symlinked_directory_whose_target_is_under_a_group_writable_one(base):
    releases = mkdir(base / "releases", 0o775)
    mkfile(releases / "r1" / "bin" / "app")
    symlink(base / "current", "releases/r1")
    reason = refused(base / "current" / "bin" / "app")
    assert reason.startswith(f"{releases} is writable by group (mode 0775); chmod g-w {releases}")
    releases.chmod(0o755)
    fd, real = open_trusted(base / "current" / "bin" / "app", 0)
    os.close(fd)
    assert real == str(releases / "r1" / "bin" / "app")


def test_a_relative_symlink_with_dotdot_is_resolved_and_checked_where_it_leads(base):
    evil = mkdir(base / "evil", 0o757)
    mkfile(evil / "app")
    launcher = symlink(mkdir(base / "safe" / "bin") / "app", "../../evil/app")
    assert refused(launcher).startswith(f"{evil} is writable by others (mode 0757)")
    evil.chmod(0o755)
    fd, real = open_trusted(launcher, 0)
    os.close(fd)
    assert real == str(evil / "app")


def test_dotdot_after_a_symlinked_directory_goes_up_from_its_target_as_the_kernel_does(base):
    mkfile(base / "x", "lexical")
    deep = mkdir(base / "deep" / "a" / "b")
    mkfile(base / "deep" / "a" / "x", "physical")
    symlink(base / "link", deep)
    path = base / "link" / ".." / "x"
    fd, real = open_trusted(path, 0)
    try:
        assert real == str(base / "deep" / "a" / "x")
        assert same_file(fd, path)                      # the kernel's own resolution agrees
    finally:
        os.close(fd)


def test_dotdot_above_the_root_stays_at_the_root(base):
    app = mkfile(base / "bin" / "app")
    fd, real = open_trusted("/../../" + str(app), 0)
    os.close(fd)
    assert real == str(app)


def test_a_symlink_loop_is_refused_quickly(base):
    symlink(base / "a", "b")
    symlink(base / "b", "a")
    symlink(base / "self", "self")
    started = time.monotonic()
    assert "too many levels of symbolic links" in refused(base / "a")
    assert "too many levels of symbolic links" in refused(base / "self" / "app")
    assert time.monotonic() - started < 5


def test_the_symlink_limit_is_the_kernels(base):
    app = mkfile(base / "app")
    previous = app
    for i in range(MAX_SYMLINKS + 1):
        previous = symlink(base / f"l{i}", previous.name)
    ok, too_many = base / f"l{MAX_SYMLINKS - 1}", base / f"l{MAX_SYMLINKS}"
    os.stat(ok)                                         # the kernel follows 40 ...
    with pytest.raises(OSError):
        os.stat(too_many)                               # ... and refuses 41
    fd, _ = open_trusted(ok, 0)
    os.close(fd)
    assert "too many levels" in refused(too_many)


def test_a_symlink_of_another_user_in_a_root_owned_sticky_directory(base):
    tmp = mkdir(base / "tmp", 0o1777)                   # like /tmp
    app = mkfile(base / "bin" / "app")
    theirs = symlink(tmp / "theirs", app, uid=NOBODY)
    assert refused(theirs) == f"{theirs} is owned by uid {NOBODY}, not root; chown root {theirs}"
    ours = symlink(tmp / "ours", app)                   # nobody can remove or rename it
    assert unsafe_reason(ours, 0) is None
    assert unsafe_reason(mkfile(tmp / "file"), 0) is None
    assert f"{tmp / 'theirs-file'} is owned by uid {NOBODY}" in refused(mkfile(tmp / "theirs-file", uid=NOBODY))


def test_a_directory_owned_by_another_user_even_read_only(base):
    home = mkdir(base / "home", 0o755, uid=NOBODY)
    app = mkfile(mkdir(home / "bin") / "app")
    assert refused(app).startswith(f"{home} is owned by uid {NOBODY}")


def test_the_file_itself_owned_by_another_user_or_writable(base):
    app = mkfile(base / "app", uid=NOBODY)
    assert refused(app).startswith(f"{app} is owned by uid {NOBODY}")
    os.chown(app, 0, 0)
    app.chmod(0o775)
    assert refused(app).startswith(f"{app} is writable by group (mode 0775)")
    app.chmod(0o4757)
    assert refused(app).startswith(f"{app} is writable by others (mode 4757)")


def test_a_dangling_symlink(base):
    launcher = symlink(mkdir(base / "bin") / "app", base / "gone" / "app")
    assert refused(launcher) == f"{base / 'gone'}: No such file or directory"


def test_a_component_that_is_a_file_not_a_directory(base):
    app = mkfile(base / "bin" / "app")
    assert refused(app / "more") == f"{app}: not a directory"
    assert refused(str(app) + "/") == f"{app}: not a directory"     # as the kernel: ENOTDIR
    with pytest.raises(NotADirectoryError):
        os.stat(str(app) + "/")


def test_what_the_path_must_end_at(base):
    app = mkfile(base / "bin" / "app")
    assert refused(base / "bin") == f"{base / 'bin'}: is a directory, not an executable file"
    assert refused(app, directory=True) == f"{app}: not a directory"
    fifo = base / "fifo"
    os.mkfifo(fifo, 0o755)
    assert refused(fifo) == f"{fifo}: not a regular file"
    fd, real = open_trusted(str(base / "bin") + "/", 0, directory=True)
    os.close(fd)
    assert real == str(base / "bin")


def test_no_fd_is_left_open_whatever_the_outcome(base):
    app = mkfile(base / "bin" / "app")
    symlink(base / "loop", "loop")
    symlink(base / "abs", app)
    mkdir(base / "w", 0o777)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for path in (base / "loop", base / "abs", base / "w" / "x", base / "bin", app / "x"):
            unsafe_reason(path, 0)
        unsafe_reason(base / "bin", 0, directory=True)
        unsafe_reason(base / "abs", 0)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_filesystem_mounted_with_fuse_by_another_user_is_refused(base, tmp_path, monkeypatch):
    # A FUSE server reports any owner and mode it likes: the uid that mounted it decides. No
    # FUSE mount here, so a copy of mountinfo says the root filesystem is one.
    app = mkfile(base / "app")
    fd = os.open("/", os.O_PATH)
    with open(f"/proc/self/fdinfo/{fd}") as f:
        mnt_id = next(line.split()[1] for line in f if line.startswith("mnt_id:"))
    os.close(fd)
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    fake = tmp_path / "mountinfo"

    def root_is(fstype: str, options: str) -> None:
        out = []
        for line in lines:
            fields = line.split()
            if fields[0] == mnt_id:
                sep = fields.index("-")
                fields[sep + 1:] = [fstype, "src", options]
            out.append(" ".join(fields))
        fake.write_text("\n".join(out) + "\n")

    monkeypatch.setattr(trust, "_MOUNTINFO", str(fake))
    root_is("fuse.sshfs", f"rw,user_id={NOBODY},group_id={NOBODY},allow_other")
    assert refused(app) == ("/ is on a FUSE filesystem mounted by uid 65534, which decides every owner "
                            "and mode it shows; use a path on a filesystem root mounted")
    root_is("fuse", "rw,allow_other")
    assert "mounted by an unknown user" in refused(app)
    root_is("fuseblk", "rw,user_id=0,group_id=0")
    assert unsafe_reason(app, 0) is None
    root_is("fuse.sshfs", f"rw,user_id={SERVICE},group_id={SERVICE}")
    assert unsafe_reason(app, SERVICE) is None
    root_is("ext4", f"rw,user_id={NOBODY}")
    assert unsafe_reason(app, 0) is None


# --- exec by the fd ------------------------------------------------------------------------------

def run_fd(fd: int, inheritable: bool) -> tuple[int, str]:
    """os.execve(fd) in a child: (its exit code, what it printed)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            os.set_inheritable(fd, inheritable)
            os.execve(fd, ["app", "arg"], {"PATH": "/usr/bin:/bin"})
        except OSError as exc:
            os.write(2, f"exec failed: {exc}\n".encode())
        os._exit(127)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 4096):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def test_exec_by_the_fd_runs_the_checked_file_even_after_the_path_was_swapped(base):
    app = mkfile(base / "bin" / "app", "#!/bin/sh\necho original \"$@\"\n")
    fd, _ = open_trusted(app, 0)
    try:
        swapped = mkfile(base / "bin" / "swapped", "#!/bin/sh\necho swapped\n")
        os.rename(swapped, app)                         # what an attacker would do after the check
        assert not same_file(fd, app)
        # A #! script exec'd by fd: the kernel hands /bin/sh "/dev/fd/N", so N must survive the
        # exec. An inheritable O_PATH fd does (the shell reopens it through /proc).
        assert run_fd(fd, inheritable=True) == (0, "original arg\n")
        assert run_fd(fd, inheritable=False)[0] == 127   # close-on-exec: ENOENT, nothing ran
    finally:
        os.close(fd)


def test_exec_by_the_fd_of_a_binary(base):
    true = os.path.realpath("/bin/true")
    app = base / "bin" / "true"
    mkdir(app.parent)
    app.write_bytes(Path(true).read_bytes())
    app.chmod(0o755)
    fd, _ = open_trusted(app, 0)
    try:
        assert run_fd(fd, inheritable=False) == (0, "")
    finally:
        os.close(fd)


# --- the config rule -----------------------------------------------------------------------------

def config(base, text="") -> Path:
    return mkfile(base / "etc" / "cadenza.toml", text, mode=0o644)


def test_config_in_a_safe_chain_has_no_problems(base):
    assert config_problems(config(base)) == []
    assert config_problems(config(base), writers=0o002) == []


def test_config_under_a_directory_others_can_write_further_up(base):
    path = config(base)
    base.chmod(0o757)
    assert config_problems(path) == [
        f"{base}: a directory on the way to {path} is writable by others (mode 0757), so they could "
        f"swap the config for another; run chmod o-w {base}"]
    base.chmod(0o775)
    assert config_problems(path, writers=0o002) == []
    assert "writable by group (mode 0775)" in config_problems(path)[0]


def test_a_symlinked_config_is_checked_where_it_really_is(base):
    drop = mkdir(base / "drop", 0o777)
    real = mkfile(drop / "cadenza.toml", "", mode=0o644)
    link = symlink(mkdir(base / "etc") / "cadenza.toml", real)
    problems = config_problems(link, writers=0o002)
    assert problems == [f"{drop}: a directory on the way to {link} is writable by others (mode 0777), "
                        f"so they could swap the config for another; run chmod o-w {drop}"]


def test_the_config_rule_keeps_its_own_messages_for_the_file_and_its_directory(base):
    path = config(base)
    path.chmod(0o666)
    (base / "etc").chmod(0o777)
    problems = config_problems(path)
    assert len(problems) == 2, problems                 # each said once, not again by the walk
    assert problems[0].startswith(f"{path}: the config file is writable by group and others (mode 0666)")
    assert problems[1].startswith(f"{base / 'etc'}: the directory holding cadenza.toml is writable")


def test_config_read_through_a_magic_link_is_not_refused_for_that(base):
    path = config(base)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert config_problems(f"/proc/self/fd/{fd}", writers=0o002) == []
    finally:
        os.close(fd)
