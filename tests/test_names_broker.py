"""Look-alike names against a real zchat-broker, from a raw DEALER.

``alice`` joins; an attacker's own connection, speaking raw ZeroMQ and
MessagePack, tries every look-alike of her name (and the invisible, blank,
mixed-script and bidi tricks) and gets ``name_taken`` or ``bad_name``; honest
names in other scripts still join, and the room never shows a second alice.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import pytest
from test_names import HONEST, REFUSED, SAME_AS_ALICE

from conftest import RawClient

Raw = Callable[[], RawClient]


def test_look_alikes_of_a_member_get_name_taken_or_bad_name(raw: Raw) -> None:
    alice = raw()
    assert alice.join("alice")["type"] == "welcome"
    composed = raw()
    assert composed.join("alic\u00e9")["type"] == "welcome"
    attacker = raw()
    expected = {name: "name_taken" for name in SAME_AS_ALICE.values()}
    expected["alice\u0301"] = "name_taken"  # decomposed: the composed one is here
    expected.update({name: "bad_name" for name in REFUSED.values()})
    expected.update({
        "\u0430lice": "bad_name",  # Cyrillic a among Latin letters
        "\uff41lice": "name_taken",  # fullwidth a
        "alice\u034f": "bad_name", "alice\ufe0f": "bad_name", "alice\U000e0100": "bad_name",
        "\u3164": "bad_name", "\u2800": "bad_name", "\u115f\u1160": "bad_name",
    })
    for i, (name, code) in enumerate(expected.items()):
        # Silent members are dropped after a few heartbeats: keep both here.
        for member in (alice, composed):
            assert member.request({"type": "ping"})["type"] == "pong"
        reply = attacker.request({"type": "join", "name": name, "id": f"j{i}"})
        assert (reply["type"], reply.get("code"), reply["id"]) == ("error", code, f"j{i}"), (
            ascii(name), reply)
        assert reply["detail"]
    # The attacker never joined, and the room holds the two it held.
    assert attacker.request({"type": "who"})["code"] == "not_joined"
    members = alice.request({"type": "who"})["members"]
    assert sorted(m["name"] for m in members) == ["alice", "alic\u00e9"]


def test_honest_names_in_other_scripts_join_under_their_nfkc_form(raw: Raw) -> None:
    watcher = raw()
    assert watcher.join("alice")["type"] == "welcome"
    shown_names: set[str] = set()
    for name in [*HONEST[1:], "\uff22\uff4f\uff42"]:  # the last is a fullwidth Bob
        shown = unicodedata.normalize("NFKC", name)
        assert watcher.request({"type": "ping"})["type"] == "pong"  # not dropped as silent
        welcome = raw().join(name)
        assert (welcome["type"], welcome["name"]) == ("welcome", shown), ascii(name)
        event = watcher.wait_event(lambda e, shown=shown: e.get("type") == "joined"
                                   and e["name"] == shown)
        assert event["name"] == shown
        shown_names.add(shown)
    # Each was announced to the room under the name it shows.
    assert len(shown_names) == len(HONEST)


@pytest.mark.parametrize("target", ["ALICE", "\uff41lice", "\u0430\u04cf\u0456\u0441\u0435"])
def test_a_dm_to_a_look_alike_reaches_the_one_it_looks_like(raw: Raw, target: str) -> None:
    alice = raw()
    assert alice.join("alice")["type"] == "welcome"
    bob = raw()
    assert bob.join("bob")["type"] == "welcome"
    assert bob.request({"type": "dm", "to": target, "text": "hi", "id": "d"})["type"] == "ack"
    dm = alice.recv()
    assert (dm["type"], dm["from"], dm["text"]) == ("dm", "bob", "hi")
