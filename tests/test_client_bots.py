"""The demo bots: their replies (pure), and the bots CLI against a real broker."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from conftest import RunningBroker, wait_item
from zchat import BrokerUnreachable, Client, Direct, Joined, Left, Message, Status
from zchat.clients.bots import GREET_AGAIN_AFTER, Greeter, Helper, Reply, join_until


def test_greeter_welcomes_newcomers_once_in_a_while() -> None:
    greeter = Greeter("greeter", members=lambda room: ["greeter", "alice", "bob"])
    assert greeter.on_item(Joined(2, 0.0, "bob", "1.2.3.4"), now=100.0) == [
        Reply("welcome, bob! here now: alice, greeter")]
    # bob reconnects (a broker restart): no second welcome soon after.
    assert greeter.on_item(Joined(5, 0.0, "Bob", "1.2.3.4"), now=130.0) == []
    assert greeter.on_item(Joined(9, 0.0, "bob", "x"), now=130.0 + GREET_AGAIN_AFTER) != []
    assert greeter.on_item(Joined(3, 0.0, "greeter", "x"), now=100.0) == []  # not itself
    alone = Greeter("greeter", members=lambda room: ["greeter", "zoe"])
    assert alone.on_item(Joined(2, 0.0, "zoe", "x"), 0.0) == [
        Reply("welcome, zoe! here now: greeter")]


def test_greeter_answers_a_hello_that_names_it() -> None:
    greeter = Greeter("greeter")
    assert greeter.on_item(Message(4, 0.0, "ann", "Hi greeter!"), 0.0) == [Reply("hello, ann!")]
    assert greeter.on_item(Message(4, 0.0, "ann", "hi everyone"), 0.0) == []
    assert greeter.on_item(Message(4, 0.0, "ann", "greeter is a bot"), 0.0) == []
    assert greeter.on_item(Message(4, 0.0, "greeter", "hello greeter"), 0.0) == []


def test_helper_answers_commands() -> None:
    helper = Helper("helper", members=lambda room: ["bob", "Alice", "helper"],
                    roll=lambda sides: sides, clock=lambda now: f"T{now:g}")
    said = [helper.answer(text, "ann", 5.0) for text in
            ("!time", "!echo  hi  there ", "!echo", "!roll", "!roll 20", "!roll x", "!who",
             "!HELP", "hello", "!unknown")]
    assert said == [
        "it is T5", "hi  there", "echo what? (!echo TEXT)", "ann rolls 6 (1-6)",
        "ann rolls 20 (1-20)", "ann rolls 6 (1-6)", "3 here: Alice, bob, helper",
        "I answer !time, !echo TEXT, !roll [SIDES] and !who (in private too)", None, None,
    ]


def test_helper_answers_in_the_room_or_in_private() -> None:
    helper = Helper("helper", clock=lambda now: "now")
    assert helper.on_item(Message(1, 0.0, "ann", "!time"), 0.0) == [Reply("it is now")]
    assert helper.on_item(Direct("ann", "!time", 0.0), 0.0) == [Reply("it is now", to="ann")]
    assert helper.on_item(Direct("ann", "hey", 0.0), 0.0) == [
        Reply("I am a bot; try !help", to="ann")]
    assert helper.on_item(Message(1, 0.0, "helper", "!time"), 0.0) == []  # never itself
    assert helper.on_item(Status("reconnected"), 0.0) == []


def test_bots_answer_in_the_room_they_were_asked_in() -> None:
    rooms = {"dev": ["greeter", "ann", "bob"], "ops": ["greeter", "cy"]}
    greeter = Greeter("greeter", members=lambda room: rooms[room])
    assert greeter.on_item(Joined(2, 0.0, "cy", "x", "ops"), now=1.0) == [
        Reply("welcome, cy! here now: greeter", room="ops")]
    assert greeter.on_item(Joined(3, 0.0, "cy", "x", "dev"), now=2.0) == [  # each room greets
        Reply("welcome, cy! here now: ann, bob, greeter", room="dev")]
    assert greeter.on_item(Message(3, 0.0, "ann", "hi greeter", "dev"), 0.0) == [
        Reply("hello, ann!", room="dev")]
    helper = Helper("helper", members=lambda room: rooms[room])
    assert helper.on_item(Message(4, 0.0, "bob", "!who", "dev"), 0.0) == [
        Reply("3 here: ann, bob, greeter", room="dev")]
    assert helper.on_item(Message(4, 0.0, "cy", "!who", "ops"), 0.0) == [
        Reply("2 here: cy, greeter", room="ops")]


def test_bots_cli_chats_on_a_real_broker_and_leaves_on_sigterm(
        broker: RunningBroker, ctx: zmq.Context[Any]) -> None:
    with Client(broker.input, "ann", context=ctx, timeout=5.0) as ann:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zchat.clients.bots", "helper", "greeter",
             "--name", "hal", "--connect", broker.input],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            joined: set[str] = set()
            while len(joined) < 2:  # in either order
                joined.add(wait_item(ann, lambda i: isinstance(i, Joined)).name)
            assert joined == {"hal", "greeter"}
            ann.send("!echo ping")
            wait_item(ann, lambda i: isinstance(i, Message) and (i.sender, i.text) == (
                "hal", "ping"))
            ann.dm("hal", "!roll 2")
            wait_item(ann, lambda i: isinstance(i, Direct) and i.sender == "hal"
                      and i.text.startswith("ann rolls "))
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=5)
        assert proc.returncode == 0, err
        assert "hal: joined" in out and "greeter: joined" in out
        gone: dict[str, tuple[str, str]] = {}
        while len(gone) < 2:  # the two bots leave in either order
            left = wait_item(ann, lambda i: isinstance(i, Left))
            gone[left.name] = (left.reason, left.detail)
        assert gone == {"hal": ("leave", "bot stopped"), "greeter": ("leave", "bot stopped")}


def test_a_bot_waits_with_one_client_for_a_broker_that_comes_later(
        start_broker: Callable[..., RunningBroker]) -> None:
    with socket.socket() as probe:  # a free port for the broker that is not there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    stop = threading.Event()
    with pytest.raises(BrokerUnreachable):
        join_until(endpoint, "early", stop, give_up=0.3)
    got: list[Client | None] = []
    waiter = threading.Thread(target=lambda: got.append(join_until(endpoint, "late", stop, 20)))
    waiter.start()
    try:
        start_broker("--input", endpoint)
        waiter.join(20)
        assert got and got[0] is not None and got[0].connected
    finally:
        stop.set()
        waiter.join(5)
        for client in got:
            if client is not None:
                client.close()
    stop.set()
    assert join_until(endpoint, "never", stop, None) is None  # stopped: no join at all
