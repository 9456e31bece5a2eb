"""Every response carries X-Release: the name of the release directory this code was loaded from."""

import os
import time
from pathlib import Path

from django.http import HttpResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.utils.html import escape

TAG = Path(__file__).resolve().parents[1].name   # ROOT/releases/TAG/proj/views.py
BIG = bytes(range(256)) * 4096                     # 1 MiB, every byte value at every offset mod 256


def tagged(response):
    response["X-Release"] = TAG
    return response


def index(request):
    return tagged(HttpResponse(f"release {TAG} pid {os.getpid()}\n", content_type="text/plain"))


def form(request):
    """GET: a form with the CSRF token (and the csrftoken cookie); POST: echoes `value`."""
    if request.method == "POST":
        return tagged(HttpResponse(f"echo {request.POST['value']}\n", content_type="text/plain"))
    token = escape(get_token(request))
    return tagged(HttpResponse(
        '<form method="post" action="/form">'
        f'<input type="hidden" name="csrfmiddlewaretoken" value="{token}">'
        '<input name="value"><button>send</button></form>\n'))


def stream(request):
    """`n` chunks "chunk I\\n"; with `gate`, the chunks after the first wait until that file exists."""
    count, gate = int(request.GET.get("n", "5")), request.GET.get("gate")

    def chunks():
        yield b"chunk 0\n"
        deadline = time.monotonic() + 10
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, count):
            yield f"chunk {i}\n".encode()
    return tagged(StreamingHttpResponse(chunks(), content_type="text/plain"))


def big(request):
    return tagged(HttpResponse(BIG, content_type="application/octet-stream"))
