"""A minimal command worker: records what it was given, says READY=1, exits 0 on SIGTERM.

    envworker.py OUTDIR        writes OUTDIR/<worker id>.json with its env, pid and fds 3..n
"""
import json
import os
import signal
import socket
import sys

out = sys.argv[1]
fds = int(os.environ.get("LISTEN_FDS", "0"))
info = {
    "pid": os.getpid(),
    "env": dict(os.environ),
    "fds": [{"fd": fd, "family": socket.socket(fileno=os.dup(fd)).family.name,
             "listening": socket.socket(fileno=os.dup(fd)).getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
            for fd in range(3, 3 + fds)],
}
path = os.path.join(out, f"{os.environ.get('CADENZA_WORKER_ID', 'x')}.json")
with open(path + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(path + ".tmp", path)
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=envworker up", b"\0" + addr[1:].encode() if addr.startswith("@") else addr)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
