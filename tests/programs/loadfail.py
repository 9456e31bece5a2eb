"""A command worker that cannot load its application, the way the built-in worker reports it.

loadfail.py GATE: while the file GATE does not exist it says READY=1 and waits for SIGTERM
(then exits 0); once it exists, a new worker says STATUS=<the first line of GATE> and exits 3
("the application could not be loaded") at once.
"""
import os
import signal
import socket
import sys

addr = os.environ["NOTIFY_SOCKET"]
target = b"\0" + addr[1:].encode() if addr.startswith("@") else addr
notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    with open(sys.argv[1]) as gate:
        reason = gate.readline().strip()
except FileNotFoundError:
    reason = None
if reason is not None:
    notify.sendto(f"STATUS={reason}".encode(), target)
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
notify.sendto(b"READY=1", target)
while True:
    signal.pause()
