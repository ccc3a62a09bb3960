"""The fixtures themselves work: a real broker answers a raw client."""

from __future__ import annotations


def test_raw_client_joins_real_broker(raw):  # type: ignore[no-untyped-def]
    client = raw()
    welcome = client.join("alice")
    assert welcome["type"] == "welcome"
    assert welcome["name"] == "alice"
