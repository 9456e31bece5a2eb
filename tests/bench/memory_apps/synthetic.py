"""A WSGI app that holds about 100 MB of Python objects made at import time, as a large code base
and its libraries do: many small objects under reference counting and the cycle collector, not
one bytes blob (which no refcount or collection ever writes to, so it would share perfectly).

- Code, about a quarter: generated modules of classes, methods, functions and constants,
  imported from $SYNTHETIC_CODE (written, and compiled to .pyc, by `python codegen.py DIR`),
  so each import unmarshals code objects the way real imports do.
- Data, the rest: records (dicts of strings, ints, floats, tuples and lists), an index by
  name and per-category lists, built by code at import time.

$SYNTHETIC_MB scales both (default 100). Each request does what a view does: it calls the
handlers of its route (always the same few code paths), reads a fixed page of records and five
random ones, and answers a small text body with an X-Worker-Pid header.
"""
from __future__ import annotations

import importlib
import os
import random
import sys
from pathlib import Path

import codegen

RECORDS = max(1, int(110_000 * codegen.SCALE))   # about 75 MB of data
CATEGORIES = 64
ROUTES = 16


def _import_code() -> list:
    directory = os.environ.get("SYNTHETIC_CODE")
    if not directory or not (Path(directory) / "synthetic_code").is_dir():
        raise RuntimeError(f"SYNTHETIC_CODE={directory!r} holds no synthetic_code package: "
                           "run `python codegen.py DIR` and set SYNTHETIC_CODE=DIR")
    sys.path.insert(0, directory)
    return [importlib.import_module(f"synthetic_code.m{i:04d}") for i in range(codegen.MODULES)]


def _build_data(rnd: random.Random) -> tuple[list[dict], dict[str, dict], list[list[dict]]]:
    words = [f"word{n}" for n in range(2000)]
    records = []
    for n in range(RECORDS):
        records.append({
            "id": n,
            "name": f"record-{n:07d}",
            "title": " ".join(rnd.choice(words) for _ in range(4)),
            "price": rnd.random() * 100,
            "tags": [rnd.choice(words) for _ in range(3)],
            "dims": (rnd.randrange(100), rnd.randrange(100), rnd.randrange(100)),
            "category": n % CATEGORIES,
        })
    index = {r["name"]: r for r in records}
    by_category = [[] for _ in range(CATEGORIES)]
    for r in records:
        by_category[r["category"]].append(r)
    return records, index, by_category


CODE = _import_code()
RECORDS_LIST, INDEX, BY_CATEGORY = _build_data(random.Random(100))


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    route = sum(path.encode()) % ROUTES
    total = 0
    for module in CODE[route::ROUTES][:4]:            # the same few code paths for a route
        total += sum(map(len, (module.handler_0(route), module.handler_1(route))))
    page = RECORDS_LIST[route * 100:route * 100 + 100]
    picked = [INDEX[f"record-{random.randrange(RECORDS):07d}"] for _ in range(5)]
    body = (f"route {route}: {total}, {len(page)} records from {page[0]['name']}, "
            + ", ".join(f"{r['name']} {r['title']} {r['price']:.2f}" for r in picked) + "\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("X-Worker-Pid", str(os.getpid()))])
    return [body]

