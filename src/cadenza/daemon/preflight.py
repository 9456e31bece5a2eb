"""The pre-flight of an upgrade (DESIGN §4.2 step 2): everything checked before anything is forked.

A refusal changes nothing and says why. What passes is a Plan holding an fd of the very
launcher that was checked: the new master is exec'd from that fd, so a swap of the path after
the check (or of any symlink or directory on its way) cannot change what runs.
"""

from __future__ import annotations

import os
from ..records import record

from .. import config as C
from ..trust import Untrusted, config_problems, open_trusted


_MISSING = os.strerror(2)   # "No such file or directory"


class UpgradeRefused(Exception):
    """The pre-flight failed: nothing was started, the running generation keeps serving."""


@record
class Plan:
    exec_fd: int            # O_PATH fd of the checked launcher; the succession closes it
    exec_path: str          # its real path, for messages
    directory: str          # unresolved: the new master's cwd
    release: str            # what `directory` resolves to now
    config_path: str | None

    def close(self) -> None:
        if self.exec_fd >= 0:
            os.close(self.exec_fd)
            self.exec_fd = -1


def check(cfg: C.Config, argv: list[str], service_uid: int | None = None) -> Plan:
    exec_path = cfg.exec_path
    if exec_path is None:
        raise UpgradeRefused("no exec_path: set app.root (exec_path defaults to ROOT/shared/bin/cadenza) "
                             "or app.exec_path, and write it with `cadenza pin --root ROOT`")
    uid = os.geteuid() if service_uid is None else service_uid
    directory = str(cfg.directory) if cfg.directory else os.getcwd()
    try:
        release = C.resolve_release(cfg)
    except C.ReleaseError as exc:
        raise UpgradeRefused(str(exc)) from None
    config_path = _check_new_config(cfg, argv, directory)
    fd, real = open_pinned(exec_path, uid)
    return Plan(fd, real, directory, release, config_path)


def open_pinned(path, service_uid: int) -> tuple[int, str]:
    """exec_path exists, is an executable file, and nobody but root or the service user can
    replace it or anything on its way."""
    try:
        fd, real = open_trusted(path, service_uid)
    except Untrusted as exc:
        text = str(exc)
        if text.endswith(_MISSING):
            where = text.removesuffix(f": {_MISSING}")
            text = f"is unusable: {_MISSING} ({where})"
        else:
            text = f"is unsafe: {text}"
        raise UpgradeRefused(f"pinned path {path} {text}; fix it or rewrite it with "
                             "`cadenza pin --root ROOT`") from None
    st = os.fstat(fd)
    if not (st.st_mode & 0o111) or not os.access(f"/proc/self/fd/{fd}", os.X_OK):
        os.close(fd)
        raise UpgradeRefused(f"pinned path {path} is not executable; run `cadenza pin --root ROOT`")
    return fd, real


def _check_new_config(running: C.Config, argv: list[str], directory: str) -> str | None:
    """The new master reads its config as `cadenza run ARGV` does in `directory`: check that now."""
    from ..cli import parse_run_argv   # the one parser of `cadenza run`'s arguments
    try:
        args, command = parse_run_argv(argv)
    except ValueError as exc:
        raise UpgradeRefused(f"the next generation's arguments {argv!r} are not valid: {exc}") from None
    path = C.discover(args.config, directory)
    try:
        cfg = C.from_run_args(args, command, directory)
    except C.ConfigError as exc:
        raise UpgradeRefused(f"the new release's config is invalid:\n{exc}") from None
    unsafe = config_problems(path, writers=0o002) if path else []
    if unsafe:
        raise UpgradeRefused("the new release's config is unsafe:\n" + "\n".join(unsafe))
    problems = []
    if cfg.app.name != running.app.name:
        problems.append(f"{path}: app.name is {cfg.app.name!r}, but this service runs {running.app.name!r}; "
                        "a release must keep the app's name (its control socket and units depend on it)")
    if running.exec_path is not None and cfg.exec_path is None:
        problems.append(f"{path}: sets neither app.root nor app.exec_path, so the generation it starts "
                        "could never be upgraded again; keep [app] root in every release")
    if problems:
        raise UpgradeRefused("the new release's config is refused:\n" + "\n".join(problems))
    return os.fspath(path) if path else None
