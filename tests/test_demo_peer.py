"""The Docker demo's ring peers: the game's rules alone, then three real peers.

``Relay`` is pure, so its rules are checked event by event. The last tests
run three ``python -m zchat.clients.demo_peer`` subprocesses against a real
broker on loopback, as the compose file runs them in three containers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from conftest import RunningBroker, wait_item
from zchat import Client, Message
from zchat.clients.demo_peer import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    Pass,
    Relay,
    parse_rooms,
)

RING = ["alice", "bob", "dave"]


def test_first_peer_throws_once_everyone_is_here() -> None:
    alice = Relay("alice", RING, rounds=2)
    assert alice.arrived("bob") is None
    assert alice.missing == ["dave"]
    assert alice.arrived("Dave") == Pass("bob", 1, 6)
    assert alice.arrived("dave") is None  # thrown once only


def test_only_the_first_peer_starts() -> None:
    bob = Relay("bob", RING)
    for name in RING:
        assert bob.arrived(name) is None


def test_the_named_taker_passes_to_the_next_in_the_ring() -> None:
    dave = Relay("dave", RING, rounds=1)
    assert dave.message("alice", "@bob 1/3 catch!") is None
    assert dave.message("bob", "@dave 2/3 catch! (bob at 10.0.0.2)") == Pass("alice", 3, 3)
    assert not dave.done  # the last hop has not come yet
    assert dave.unheard == []
    assert dave.message("dave", "@alice 3/3 catch!") is None  # our own, echoed by the room
    assert dave.done


def test_a_peer_is_done_only_when_the_last_hop_came_and_everyone_was_heard() -> None:
    bob = Relay("bob", RING, rounds=1)
    bob.message("alice", "@bob 1/3")
    bob.message("bob", "@dave 2/3")
    assert not bob.done and bob.unheard == ["dave"]
    bob.message("dave", "@alice 3/3")
    assert bob.done


@pytest.mark.parametrize("sender, text", [
    ("mallory", "@bob 1/3"),  # not in the ring
    ("alice", "@bob 1/4"),  # another game
    ("alice", "hello bob"),  # plain chat
    ("alice", "@bob one/3"),
])
def test_other_messages_do_not_move_the_ball(sender: str, text: str) -> None:
    bob = Relay("bob", RING, rounds=1)
    assert bob.message(sender, text) is None
    assert bob.last_hop == 0 and bob.heard == set()


def test_a_repeated_hop_is_ignored() -> None:
    bob = Relay("bob", RING, rounds=1)
    assert bob.message("alice", "@bob 1/3") == Pass("dave", 2, 3)
    assert bob.message("alice", "@bob 1/3") is None


@pytest.mark.parametrize("name, ring, rounds", [
    ("eve", RING, 1), ("alice", ["alice"], 1), ("alice", ["alice", "ALICE"], 1),
    ("alice", RING, 0),
])
def test_bad_rings_are_refused(name: str, ring: list[str], rounds: int) -> None:
    with pytest.raises(ValueError):
        Relay(name, ring, rounds)


def test_the_ball_crosses_rooms_and_starts_when_everyone_is_everywhere() -> None:
    alice = Relay("alice", RING, rounds=1, rooms=["lobby", "backstage"])
    for name in ("bob", "dave"):
        assert alice.arrived(name, "lobby") is None
    assert alice.missing == ["bob", "dave"]  # not in backstage yet
    assert alice.arrived("bob", "backstage") is None
    assert alice.arrived("dave", "backstage") == Pass("bob", 1, 3, "lobby")
    bob = Relay("bob", RING, rounds=1, rooms=["lobby", "backstage"])
    assert bob.message("alice", "@bob 1/3") == Pass("dave", 2, 3, "backstage")
    dave = Relay("dave", RING, rounds=1, rooms=["lobby", "backstage"])
    assert dave.message("bob", "@dave 2/3") == Pass("alice", 3, 3, "lobby")
    alice.departed("bob", "backstage")
    assert alice.missing == ["bob"]


def test_rooms_parse_with_private_ones_marked() -> None:
    assert parse_rooms("lobby, +Backstage") == [("lobby", False), ("backstage", True)]
    assert parse_rooms("") == [("lobby", False)]
    with pytest.raises(ValueError):
        parse_rooms("lobby,+no room")


def test_a_hop_reads_as_chat() -> None:
    assert Pass("bob", 4, 9).text("alice", "172.28.0.5") == "@bob 4/9 catch! (alice at 172.28.0.5)"


# ------------------------------------------------------------ real processes


def peer(broker: RunningBroker, name: str, *args: str,
         ring: str = "alice,bob,dave") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zchat.clients.demo_peer", "--name", name, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ZCHAT_CONNECT": broker.input, "ZCHAT_RING": ring,
             "ZCHAT_PACE": "0.05", "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def peers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_three_peers_pass_the_ball_round_through_a_real_broker(
    start_broker: Callable[..., RunningBroker], peers: list[subprocess.Popen[str]],
) -> None:
    broker = start_broker("--rate", "0")
    peers.extend(peer(broker, name, "--rounds", "2") for name in ("dave", "bob", "alice"))
    outputs = {}
    for name, proc in zip(("dave", "bob", "alice"), peers, strict=True):
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_OK, out
        outputs[name] = out
    for name, out in outputs.items():
        others = [other for other in RING if other != name]
        assert f"done: the ball went 6/6 round alice, bob, dave through #lobby; heard " \
               f"{', '.join(others)}" in out
        for other in others:
            assert re.search(rf"#lobby <{other}> @\w+ \d/6 catch!", out), out
    hops = [line for line in broker.stdout_lines if " catch! " in line]
    assert [re.search(r"(\d)/6", line)[1] for line in hops] == [str(n) for n in range(1, 7)]
    broker.wait_output(r"<-- alice \(127\.0\.0\.1\) left \[leave\]: the ball came round")


def test_the_ball_goes_through_a_private_room_nobody_else_sees(
    start_broker: Callable[..., RunningBroker], peers: list[subprocess.Popen[str]],
    ctx: zmq.Context[Any],
) -> None:
    broker = start_broker("--rate", "0")
    with Client(broker.input, "eve", context=ctx, timeout=5.0) as eve:  # lobby only
        peers.extend(peer(broker, name, "--rounds", "2", "--rooms", "lobby,+backstage")
                     for name in ("dave", "bob", "alice"))
        for name, proc in zip(("dave", "bob", "alice"), peers, strict=True):
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == EXIT_OK, out
            assert "through #lobby, #backstage" in out
            if name != "alice":
                assert "alice invited us to #backstage: entered" in out
            for hop in (1, 3, 5):
                assert re.search(rf"#lobby <\w+> @\w+ {hop}/6 catch!", out), out
            for hop in (2, 4, 6):
                assert re.search(rf"#backstage <\w+> @\w+ {hop}/6 catch!", out), out
        hops = [line for line in broker.stdout_lines if " catch! " in line]
        # The broker's screen: "HH:MM:SS #room seq ..."
        assert [line.split()[1] for line in hops] == ["#lobby", "#backstage"] * 3
        # eve, in lobby, heard the lobby's hops and nothing of backstage.
        said = []
        while not said or said[-1] != ("lobby", "5/6"):
            item = wait_item(eve, lambda i: isinstance(i, Message))
            said.append((item.room, item.text.split()[1]))
        assert said == [("lobby", "1/6"), ("lobby", "3/6"), ("lobby", "5/6")]
        assert "backstage" not in {room.name for room in eve.rooms()}


def test_a_peer_whose_ring_never_completes_exits_1_and_names_who_is_missing(
    start_broker: Callable[..., RunningBroker], peers: list[subprocess.Popen[str]],
) -> None:
    broker = start_broker()
    peers.append(peer(broker, "alice", "--timeout", "1", ring="alice,bob"))
    out, _ = peers[0].communicate(timeout=30)
    assert peers[0].returncode == EXIT_INCOMPLETE, out
    assert "waiting for bob" in out
    assert "timed out at hop 0/6; never heard: bob" in out
    broker.wait_output(r"<-- alice .* left \[leave\]: timed out")


def test_sigterm_makes_a_peer_leave_at_once(
    start_broker: Callable[..., RunningBroker], peers: list[subprocess.Popen[str]],
) -> None:
    broker = start_broker()
    peers.append(peer(broker, "alice", ring="alice,bob"))
    broker.wait_output(r"--> alice joined")
    peers[0].terminate()
    out, _ = peers[0].communicate(timeout=30)
    assert peers[0].returncode == EXIT_OK, out
    broker.wait_output(r"<-- alice .* left \[leave\]: stopped by SIGTERM")


def test_usage_errors_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zchat.clients.demo_peer", "--name", "eve", "--ring", "alice,bob"],
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")},
    )
    assert result.returncode == EXIT_USAGE
    assert "eve is not in the ring" in result.stderr
