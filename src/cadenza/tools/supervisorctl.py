"""`supervisorctl`: talks to a running cadenza master over its control socket.

Exit codes (DESIGN §2): 0 done; 1 the operation failed (for `upgrade`: the old generation is
still serving); 2 usage or config error; 3 cannot reach the master; 4 permission denied.
"""

from __future__ import annotations

# Only what every command needs: `systemctl reload` waits for this program's start-up, so the
# config (tomllib, pathlib) is imported only when no -s, -u or
# $CADENZA_CONTROL_SOCKET names the socket, and doctor's and status's helpers when asked.
import argparse
import json
import os
import signal
import socket
import struct
import sys
import time

from ..control.protocol import DENIED, FAILED, OK, UNREACHABLE, USAGE, BadAnswer, encode, parse_event

EPILOG = """exit codes: 0 done; 1 the operation failed (for upgrade: the old generation is still
serving); 2 usage or config error; 3 cannot reach the master; 4 permission denied.
SIGTERM ends the wait with 0 (systemd sends it to ExecReload= when the service stops).

The control socket is -s SOCKET, else control.socket of -c FILE, else /run/cadenza/NAME/control.sock
for -u NAME[.service], else $CADENZA_CONTROL_SOCKET, else that of ./cadenza.toml. A master whose
user cannot write /run/cadenza keeps it in $XDG_RUNTIME_DIR/cadenza/NAME/ (else /tmp/cadenza-UID/
cadenza/NAME/): looked for there too."""


class Failure(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supervisorctl", description="Control a running cadenza master.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-s", "--socket", metavar="SOCKET", help="control socket path")
    p.add_argument("-c", "--config", metavar="FILE", help="read control.socket from this cadenza.toml")
    p.add_argument("-u", "--unit", metavar="UNIT", help="the systemd unit (default: the one the master "
                                                        "runs in; also picks /run/cadenza/NAME/control.sock)")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="generations, workers, releases, last upgrade, unit state")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    up = sub.add_parser("upgrade", help="start the next generation and wait until it serves")
    up.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="give up waiting after this long (default: wait for the master's outcome)")
    up.add_argument("--no-wait", action="store_true", help="return once the new generation was started")
    up.add_argument("--canary", type=int, metavar="K", help="start the next generation with K workers, judge "
                    "its 5xx rate and crashes after upgrade.canary_duration, then promote or roll it back")
    sub.add_parser("metrics", help="the Prometheus text of [metrics] listen, whether or not it is set")
    sub.add_parser("rollback", help="make the generation kept warm (upgrade.rollback_window) main again")
    sub.add_parser("restart", help="rolling restart of the workers, same generation")
    scale = sub.add_parser("scale", help="set the number of workers: N, +N or -N")
    scale.add_argument("count", metavar="N|+N|-N")
    sub.add_parser("stop", help="graceful stop of the master and its workers")
    sub.add_parser("doctor", help="what in the unit or the service would break an upgrade, with the fix")
    return p


def socket_path(args) -> str:
    if args.socket:
        return args.socket
    if args.config:
        return _from_config(args.config)
    if args.unit:
        name = args.unit.removesuffix(".service")
        return f"/run/cadenza/{name}/control.sock"
    if os.environ.get("CADENZA_CONTROL_SOCKET"):
        return os.environ["CADENZA_CONTROL_SOCKET"]
    from .. import config as C
    return _from_config(C.discover(None))


def _from_config(path) -> str:
    """The control socket of the config at `path` (None: the built-in defaults)."""
    from .. import config as C
    from .. import runtime
    try:
        return os.fspath(runtime.find_control_socket(C.defaults() if path is None else C.load(path)))
    except C.ConfigError as exc:
        raise Failure(USAGE, f"cannot read the control socket from {path}:\n{exc}") from None


CONNECT_TIMEOUT = 10.0   # how long connect() waits while the master's accept queue is full
HOW_TO_PICK = "(-s SOCKET, -c FILE or -u UNIT picks another socket)"


def request(path: str, message: dict, timeout: float | None):
    """Yields every event the master sends, the final {"done": ...} one last. Every way of not
    getting that far is a Failure: DENIED for the socket's file mode, UNREACHABLE for the rest."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _connect(sock, path)
        try:
            sock.sendall(encode(message))
        except (BrokenPipeError, ConnectionResetError):
            pass   # it answered (a refusal) and hung up before reading: its answer is still ours to read
        except OSError as exc:
            raise _lost(path, exc.strerror or exc) from None
        deadline = None if timeout is None else time.monotonic() + timeout
        buf = b""
        while True:
            while b"\n" not in buf:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Failure(FAILED, f"gave up waiting after {timeout:g}s; the master goes on: "
                                              "see `supervisorctl status`")
                    sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError as exc:
                    raise _lost(path, exc.strerror or exc) from None
                if not chunk:
                    raise _lost(path, "end of file" if not buf else "end of file in the middle of a line")
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            try:
                event = parse_event(line)
            except BadAnswer as exc:
                raise Failure(UNREACHABLE, f"{path} answered with something that is not cadenza's control "
                                           f"protocol: {exc}; is it a cadenza control socket? "
                                           f"{HOW_TO_PICK}") from None
            yield event
            if event.get("done"):
                return


def _connect(sock: socket.socket, path: str) -> None:
    # SO_SNDTIMEO bounds how long a blocking connect() waits for room in a full backlog;
    # it then fails with EAGAIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack(
        "ll", int(CONNECT_TIMEOUT), int(CONNECT_TIMEOUT % 1 * 1e6)))
    try:
        sock.connect(str(path))
    except PermissionError:
        raise Failure(DENIED, f"permission denied on {path}: ask for access to the control socket "
                              "(control.allow_users / allow_groups)") from None
    except FileNotFoundError:
        raise Failure(UNREACHABLE, f"cannot reach the master: no control socket at {path}; is it running? "
                                   f"{HOW_TO_PICK}") from None
    except ConnectionRefusedError:
        raise Failure(UNREACHABLE, f"cannot reach the master: nothing listens on {path} (the socket of a "
                                   f"master that is gone); is it running? {HOW_TO_PICK}") from None
    except BlockingIOError:
        raise Failure(UNREACHABLE, f"cannot reach the master at {path}: its queue of connections stayed full "
                                   f"for {CONNECT_TIMEOUT:g}s (it is stuck, or flooded with connections); "
                                   "see its log and `systemctl status`") from None
    except OSError as exc:
        raise Failure(UNREACHABLE, f"cannot reach the master at {path}: {exc.strerror or exc}; is it running? "
                                   f"{HOW_TO_PICK}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))


def _lost(path: str, why) -> Failure:
    return Failure(UNREACHABLE, f"lost the master at {path} before its final answer ({why}): it may have "
                                "stopped or restarted; see `supervisorctl status` and its log")


def doctor(args) -> int:
    from .doctor import diagnose
    status = None
    try:
        for event in request(socket_path(args), {"cmd": "status"}, 10):
            status = event.get("status")
    except Failure as exc:
        print(f"note: {exc} (checking the unit only)")
    unit = args.unit or (status or {}).get("systemd_unit")
    if not unit:
        raise Failure(USAGE, "doctor needs the unit: -u UNIT (the master runs in none it could name)")
    findings, props = diagnose(unit, status)
    for problem, fix in findings:
        print(f"PROBLEM {problem}\n    fix: {fix}")
    if not findings:
        print(f"ok: {unit} has what an upgrade needs (systemd {props.get('Version') or '?'})")
    return FAILED if findings else OK


def run(args) -> int:
    if args.command == "doctor":
        return doctor(args)
    path = socket_path(args)
    message = {"cmd": args.command}
    if args.command == "upgrade":
        message["no_wait"] = args.no_wait
        if args.canary is not None:
            message["canary"] = args.canary
    if args.command == "scale":
        message["count"] = args.count
    timeout = getattr(args, "timeout", None)
    last = ""
    for event in request(path, message, timeout):
        if not event.get("done"):
            last = event.get("text", "")
            print(f"{time.strftime('%H:%M:%S')} {last}", flush=True)
            continue
        if args.command == "status" and event["ok"]:
            status = event.get("status", {})
            unit = args.unit or status.get("systemd_unit")
            if unit:
                status["unit"] = unit_state(unit)
            print(json.dumps(status, indent=2) if args.json else format_status(status))
        elif args.command == "metrics" and event["ok"]:
            sys.stdout.write(event.get("metrics", ""))
        elif event.get("text") and not event["ok"]:
            print(event["text"], file=sys.stderr)
        elif event.get("text") and event["text"] != last:
            print(event["text"])
        for line in event.get("output") or []:
            print(f"  | {line}", file=sys.stderr)
        if event["ok"] and isinstance(event.get("exiting"), int):
            wait_for_exit(event["exiting"])
        return int(event.get("code", FAILED))
    return FAILED


def unit_state(unit: str) -> dict:
    from .systemd import unit_properties
    return unit_properties(unit)


def format_status(st: dict) -> str:
    state = st.get("state")
    if state == "taking over":   # main, while the previous generation still drains
        state = f"serving (generation {(st.get('generation') or 1) - 1} still draining)"
    lines = [f"{st.get('app')}: generation {st.get('generation')} {state}"
             f"{'' if st.get('main') else ' (not main yet)'}, master pid {st.get('pid')}, up {st.get('age')}s",
             f"  release   {st.get('release')}{'' if st.get('release_exists') else '  (DELETED)'}",
             f"  listeners {', '.join(st.get('listeners', []))}"]
    workers = st.get("workers", [])
    ready = sum(1 for w in workers if w["state"] == "ready")
    lines.append(f"  workers   {ready}/{st.get('target_workers')} ready")
    pre = st.get("preloader")
    if pre:
        after = f", imported the app in {pre['ready_after']:.2f}s" if pre.get("ready_after") is not None else ""
        pid = f"pid {pre['pid']} " if pre.get("pid") is not None else ""
        lines.append(f"  preloader {pid}{pre['state']}{after}, started {pre['starts']} time(s)"
                     + (f"; last: {pre['failure']}" if pre.get("failure") else ""))
    for w in workers:
        lines.append(f"    {w['id']:>3}  pid {w['pid']:<8} {w['state']:<9} age {w['age']:>8}s  "
                     f"{_worker_figures(w)}")
    up = st.get("upgrading")
    if up:
        lines.append(f"  upgrading to generation {up['generation']} (pid {up['pid']}, {up['state']}, "
                     f"{up.get('progress') or 'starting'}) from {up['release']}")
    canary = st.get("canary")
    if canary:
        when = f", judged in {canary['judging_in']}s" if canary.get("judging_in") is not None else ""
        lines.append(f"  canary    generation {canary['generation']} (pid {canary['pid']}) with "
                     f"{canary['workers']} worker(s): {canary['state']}{when}")
    last = st.get("last_upgrade")
    if last:
        verdict = "ok" if last["ok"] else f"FAILED: {last['reason']}"
        lines.append(f"  last upgrade to generation {last['generation']}: {verdict} ({last['duration']}s)")
    unit = st.get("unit")
    if unit:
        lines.append("  unit      " + " ".join(f"{k}={v}" for k, v in unit.items()))
    return "\n".join(lines)


def _worker_figures(w: dict) -> str:
    """Requests served (of its limit), unique memory, restarts, and why its slot last restarted."""
    served = f"{w.get('requests', 0)}" + (f"/{w['max_requests']}" if w.get("max_requests") else "")
    memory = w.get("memory")
    text = (f"requests {served:<11} memory {f'{memory / 2**20:.1f} MB' if memory is not None else '-':<9} "
            f"restarts {w['restarts']}")
    last = w.get("last_restart")
    if last:
        text += f"  last restart {last.get('cause')}: {last.get('detail')}"
    return text


class Terminated(Exception):
    pass


EXIT_WAIT = 10.0   # a drained master exits in milliseconds; this only bounds a stuck one


def wait_for_exit(pid: int) -> None:
    """Return once the old master that answered has exited: until then its working directory is
    still in the old release. Skipped when `pid` is not a cadenza master seen from here (another
    pid namespace), and bounded by EXIT_WAIT."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return   # gone already
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            if not file.read().startswith(b"cadenza master"):
                return
        select.select([fd], [], [], EXIT_WAIT)
    except OSError:
        pass
    finally:
        os.close(fd)


def _on_term(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    # systemd SIGTERMs ExecReload= when the service stops during an upgrade; the master then
    # abandons the upgrade itself. Exiting non-zero would mark an operator's stop as failed.
    signal.signal(signal.SIGTERM, _on_term)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return USAGE if exc.code else OK
    try:
        return run(args)
    except Failure as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return FAILED
    except Terminated:
        print("supervisorctl: stopped waiting (SIGTERM); the master carries the operation on or "
              "abandons it: see `supervisorctl status`", file=sys.stderr)
        return OK


if __name__ == "__main__":
    sys.exit(main())
