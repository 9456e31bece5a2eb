"""Send one sd_notify message from this process: sendnotify.py 'READY=1'."""
import os
import socket
import sys

addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(sys.argv[1].encode(), b"\0" + addr[1:].encode() if addr.startswith("@") else addr)
