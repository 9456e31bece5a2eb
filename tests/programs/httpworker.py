"""A command worker with nothing but the stdlib: HTTP/1.1 on the listener at fd 3.

Answers every request with "release <name of its working directory> pid <pid>" and
"Connection: close"; says READY=1 once listening (unless HTTPWORKER_NOTIFY=0: then whoever started
it says so); on SIGTERM or SIGINT stops accepting, finishes the request in hand and exits 0.
"""
import os
import signal
import socket
import sys

stopping = False


def stop(*_):
    global stopping
    stopping = True


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
listener = socket.socket(fileno=3)
listener.settimeout(0.2)   # so a stop is seen between connections
body = f"release {os.path.basename(os.getcwd())} pid {os.getpid()}\n".encode()
addr = os.environ["NOTIFY_SOCKET"]
if os.environ.get("HTTPWORKER_NOTIFY") != "0":
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
        b"READY=1", "\0" + addr[1:] if addr.startswith("@") else addr)
while not stopping:
    try:
        conn, _ = listener.accept()
    except (TimeoutError, InterruptedError):
        continue
    with conn:
        conn.settimeout(5)
        request = b""
        try:
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            if request:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError as exc:
            print(f"httpworker: {exc!r}", file=sys.stderr)
sys.exit(0)
