"""A Flask application; /slow?s=N answers after N seconds with a 256 KiB body ending in "end"."""

import os
import time
from pathlib import Path

from flask import Flask, Response, request

TAG = Path(__file__).resolve().parent.name   # ROOT/releases/TAG/app.py
app = Flask(__name__)


@app.get("/")
def index():
    return Response(f"release {TAG} pid {os.getpid()}\n", mimetype="text/plain")


@app.get("/slow")
def slow():
    seconds = float(request.args.get("s", "1"))
    time.sleep(seconds)
    head = f"release {TAG} pid {os.getpid()} slept {seconds:g}s\n"
    return Response(head + "." * (256 * 1024 - len(head) - 4) + "end\n", mimetype="text/plain")
