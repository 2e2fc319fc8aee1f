"""Metric children looked up once: prometheus_client's ``labels()`` validates, builds a
tuple and takes a lock on every call (about 3 µs), and a request counts a dozen things.
Nothing here removes a child, so a cached one is always the metric's own."""

from __future__ import annotations

_children: dict[tuple, object] = {}


def child(metric, *values: str):
    """``metric.labels(*values)``, cached."""
    key = (id(metric), values)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*values)
    return c
