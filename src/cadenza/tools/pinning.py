"""Pinned launchers: ROOT/shared/bin/cadenza and ROOT/shared/bin/supervisorctl.

Every generation is exec'd from the pinned path, never from the release it runs, because
deploy tools prune releases: unicorn and gunicorn re-exec `releases/OLD/bin/...` and die with
ENOENT. A launcher finds the release at exec time, through the `current` symlink:
- a venv per release: ROOT/current/.venv/bin/cadenza when it exists;
- otherwise a shared venv: the Python given to `cadenza pin --python` (or the one running it).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .. import config as C
from ..trust import unsafe_reason


class PinError(Exception):
    pass


def _launcher(root: Path, program: str, fallback: list[str] | None, extra: list[str]) -> str:
    q = shlex.quote
    args = " ".join(q(a) for a in extra)
    args = f"{args} " if args else ""
    lines = [
        "#!/bin/sh",
        f"# Written by `cadenza pin --root {root}`; rewrite it with the same command.",
        "# It finds the release at exec time, so pruning old releases never breaks an upgrade.",
        f"root={q(str(root))}",
        f'if [ -x "$root/current/.venv/bin/{program}" ]; then',
        f'    exec "$root/current/.venv/bin/{program}" {args}"$@"',
        "fi",
    ]
    if fallback:
        lines.append(f'exec {" ".join(q(a) for a in fallback)} {args}"$@"')
    else:
        lines.append(f'echo "$0: no $root/current/.venv/bin/{program}: deploy a release with its venv, '
                     f'or pin a shared venv with cadenza pin --python" >&2')
        lines.append("exit 127")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    import tempfile   # here, not at the top: it pulls in hashlib (OpenSSL), megabytes in every master
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def shared_python(root: Path, python: str | None) -> str | None:
    """The shared venv's Python, or None when the running one lives inside a release."""
    candidate = os.path.abspath(python or sys.executable)
    if python and not os.access(candidate, os.X_OK):
        raise PinError(f"--python {python} is not an executable file")
    inside = os.path.realpath(candidate)
    for part in ("releases", "current"):
        if python is None and (candidate.startswith(f"{root}/{part}/") or
                               inside.startswith(os.path.realpath(root / part) + "/")):
            return None   # would be pruned with its release: only current/.venv is used
    return candidate


def pin(root: Path, python: str | None = None, socket: str | None = None, unit: str | None = None) -> list[Path]:
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise PinError(f"--root {root} is not a directory; create it (it holds current/, releases/, shared/)")
    cfg_path = C.discover(None, root / "current")
    cfg = C.defaults()
    if socket is None and cfg_path is not None:
        try:
            cfg = C.load(cfg_path)
        except C.ConfigError as exc:
            raise PinError(f"cannot read the control socket from {cfg_path}:\n{exc}") from None
    bindir = root / "shared" / "bin"
    bindir.mkdir(mode=0o755, parents=True, exist_ok=True)
    reason = unsafe_reason(bindir, os.geteuid(), directory=True)
    if reason:
        raise PinError(f"refusing to pin into {bindir}: {reason}")
    py = shared_python(root, python)
    # Without --unit, supervisorctl asks the master which unit it runs in.
    ctl_args = ["-s", socket or str(cfg.control_socket), *(["-u", unit] if unit else [])]
    written = []
    for program, module, extra in (("cadenza", "cadenza", []),
                                   ("supervisorctl", "cadenza.supervisorctl", ctl_args)):
        fallback = [py, "-m", module] if py else None
        path = bindir / program
        _write_atomically(path, _launcher(root, program, fallback, extra))
        written.append(path)
    return written
