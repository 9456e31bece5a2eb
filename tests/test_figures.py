"""The worker's figures, both ends of the wire (cadenza/figures.py), without a process."""
from __future__ import annotations

from cadenza.figures import CLASSES, LATENCY_BUCKETS, Figures, status_class


def test_what_a_worker_sends_is_what_its_master_reads():
    sent = Figures(requests=7, responses=[0, 5, 1, 0, 1], buckets=[3, 4] + [0] * (len(LATENCY_BUCKETS) - 1),
                   seconds=0.25)
    read = Figures()
    assert read.update({k.upper(): v for k, v in sent.fields().items()})
    assert read == sent


def test_totals_only_grow_and_garbage_is_ignored():
    figures = Figures()
    figures.update({"CADENZA_REQUESTS": "10", "CADENZA_RESPONSES": "0,10,0,0,0"})
    # An application writing lower or broken totals to NOTIFY_SOCKET cannot make a counter go back.
    for fields in ({"CADENZA_REQUESTS": "0", "CADENZA_RESPONSES": "0,0,0,0,0"},
                   {"CADENZA_REQUESTS": "-1"}, {"CADENZA_REQUESTS": "1e9"}, {"CADENZA_RESPONSES": "1,2"},
                   {"CADENZA_LATENCY": "1,2;x"}, {"CADENZA_REQUESTS": "9" * 40}):
        figures.update(fields)
        assert figures.requests == 10 and figures.responses == [0, 10, 0, 0, 0], fields


def test_status_classes():
    assert [CLASSES[status_class(s)] for s in (101, 200, 304, 404, 503)] == list(CLASSES)
    assert CLASSES[status_class(0)] == "5xx" and CLASSES[status_class(700)] == "5xx"
