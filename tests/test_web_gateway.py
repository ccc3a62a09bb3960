"""zchat-web without a browser: its page protocol (pure) and the gateway over real sockets.

The pure half checks ``zchat.web.wire``: what the page may send, and that a
name's colour is the terminal client's. The real half runs a broker and a
``zchat-web`` subprocess and speaks to it as a tab would, with the
``websockets`` client: the printed address for port 0, the plain-http
warning and TLS, the static page and its headers, the Origin check, the
per-socket limits, a line resent after a socket reconnect going out once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import RunningBroker, wait_item
from zchat import Client, Left, Message
from zchat.display import name_colour
from zchat.keys import make_keypair
from zchat.protocol import Direct, Joined, Joins, Member
from zchat.web.server import Config, parse_config
from zchat.web.wire import (
    Dm,
    Hello,
    PageError,
    Say,
    colour,
    item_json,
    parse_request,
    xterm_rgb,
)

SERVING = re.compile(r"serving (\S+) ")

# ------------------------------------------------------------------ pure


def test_requests_parse_into_their_classes() -> None:
    assert parse_request('{"type": "hello", "name": "alice"}') == Hello("alice")
    assert parse_request('{"type": "hello", "name": "a", "token": "t", "after": 3}') == \
        Hello("a", "t", 3)
    assert parse_request('{"type": "say", "id": "1", "text": "hi"}') == Say("1", "hi")
    assert parse_request('{"type": "dm", "id": "2", "to": "bob", "text": "x"}') == \
        Dm("2", "bob", "x")


@pytest.mark.parametrize("frame", [
    b"{}", "not json", "[]", '{"type": "nope"}', '{"type": "say", "text": "no id"}',
    '{"type": "say", "id": 5, "text": "x"}', '{"type": "hello", "name": "a", "after": -1}',
    '{"type": "hello", "name": "a", "after": true}',
    '{"type": "say", "id": "' + "x" * 65 + '", "text": "x"}',
])
def test_anything_else_is_a_page_error(frame: str | bytes) -> None:
    with pytest.raises(PageError):
        parse_request(frame)


def test_colours_are_the_terminal_clients() -> None:
    # xterm's table at a few known points, and a name's colour through it.
    assert xterm_rgb(16) == "#000000"
    assert xterm_rgb(196) == "#ff0000"
    assert xterm_rgb(173) == "#d7875f"
    assert xterm_rgb(244) == "#808080"
    assert colour("Alice") == colour("alice") == xterm_rgb(name_colour("alice"))


def test_items_carry_room_seq_and_colour() -> None:
    body = item_json(Joined(3, 1.5, "bob", "10.0.0.7"), 9.0)
    assert body == {"type": "joined", "room": "lobby", "seq": 3, "ts": 1.5, "name": "bob",
                    "addr": "10.0.0.7", "colour": colour("bob")}
    assert item_json(Message(4, 2.0, "bob", "<b>"), 9.0)["text"] == "<b>"
    assert item_json(Direct("eve", "psst", 3.0), 9.0)["from"] == "eve"


def test_a_joins_item_lists_each_member_with_its_colour() -> None:
    members = (Member("bob", "10.0.0.7"), Member("<i>carol</i>", "x"))
    body = item_json(Joins("big", 5, 1.5, members), 9.0)
    assert body == {"type": "joins", "room": "big", "seq": 5, "ts": 1.5, "count": 2,
                    "members": [{"name": "bob", "addr": "10.0.0.7", "colour": colour("bob")},
                                {"name": "<i>carol</i>", "addr": "x",
                                 "colour": colour("<i>carol</i>")}]}
    assert json.loads(json.dumps(body)) == body  # a JSON frame to the page as it is


def test_options_come_from_zchat_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCHAT_UPSTREAM", "tcp://10.0.0.1:5555")
    monkeypatch.setenv("ZCHAT_LISTEN", "0.0.0.0:0")
    monkeypatch.setenv("ZCHAT_MAX_SESSIONS", "7")
    config = parse_config([])
    assert (config.upstream, config.listen, config.max_sessions) == \
        ("tcp://10.0.0.1:5555", "0.0.0.0:0", 7)
    assert parse_config(["--listen", "[::1]:0"]).listen_address() == ("::1", 0)
    with pytest.raises(SystemExit):
        parse_config(["--upstream", "localhost:5555"])
    with pytest.raises(ValueError):
        Config(listen="nope").listen_address()


# ------------------------------------------------------------------ real


class Gateway:
    def __init__(self, upstream: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zchat.web.server", "--upstream", upstream,
             "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline()
        self.said = [self.first]
        while self.first and "relay" not in self.said[-1]:  # the last line at start
            self.said.append(self.proc.stdout.readline())
        self.second = "".join(self.said[1:])
        match = SERVING.search(self.first)
        if match is None:
            self.stop()
            raise AssertionError(f"zchat-web did not start: {self.first!r}")
        self.url = match.group(1)
        self.ws = self.url.replace("http", "ws", 1) + "ws"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def gateway(broker: RunningBroker) -> Iterator[Gateway]:
    gw = Gateway(broker.input, "--rate", "20", "--burst", "20", "--max-frame", "4096")
    yield gw
    gw.stop()


# What a frame held beyond the message a helper was waiting for, per socket.
_unread: weakref.WeakKeyDictionary[ClientConnection, list[dict[str, Any]]] = \
    weakref.WeakKeyDictionary()


async def _next(ws: ClientConnection) -> list[dict[str, Any]]:
    """The messages of the next frame (one object, or an array of them in order)."""
    left = _unread.pop(ws, [])
    if left:
        return left
    body = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return body if isinstance(body, list) else [body]


async def _until(ws: ClientConnection, kind: str, **match: Any) -> dict[str, Any]:
    while True:
        messages = await _next(ws)
        for at, body in enumerate(messages):
            if body["type"] == kind and all(body.get(k) == v for k, v in match.items()):
                _unread[ws] = messages[at + 1:]
                return body


async def _hello(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", **fields}))
    while True:
        messages = await _next(ws)
        for at, body in enumerate(messages):
            if body["type"] in ("welcome", "error"):
                _unread[ws] = messages[at + 1:]
                return body


def test_port_zero_is_printed_and_plain_http_is_said(gateway: Gateway) -> None:
    assert re.match(r"http://127\.0\.0\.1:[1-9]\d*/$", gateway.url)
    assert "plain http" in gateway.second
    assert "the broker sees this gateway's address for every browser" in gateway.second


def test_the_page_is_served_with_a_strict_policy(gateway: Gateway) -> None:
    with urllib.request.urlopen(gateway.url, timeout=10) as reply:
        page = reply.read().decode()
        assert "<script src=\"app.js\"" in page
        assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("app.js", "style.css"):
        with urllib.request.urlopen(gateway.url + path, timeout=10) as reply:
            assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(gateway.url + "../pyproject.toml", timeout=10)
    assert missing.value.code == 404
    missing.value.close()


def test_another_sites_page_cannot_open_a_session(gateway: Gateway) -> None:
    async def attempt() -> None:
        async with connect(gateway.ws, origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(attempt())
    assert refused.value.response.status_code == 403


def test_a_line_resent_after_a_reconnect_goes_out_once(
        gateway: Gateway, broker: RunningBroker) -> None:
    async def scenario() -> tuple[int, int, int]:
        async with connect(gateway.ws) as ws:
            welcome = await _hello(ws, name="alice")
            await ws.send(json.dumps({"type": "say", "id": "line-1", "text": "once"}))
            first = await _until(ws, "ack", id="line-1")
        # The socket dropped; the tab comes back with its token and sends it again.
        async with connect(gateway.ws) as ws:
            again = await _hello(ws, name="alice", token=welcome["token"], after=0)
            assert again["resumed"] is True
            await ws.send(json.dumps({"type": "say", "id": "line-1", "text": "once"}))
            second = await _until(ws, "ack", id="line-1")
            await ws.send(json.dumps({"type": "say", "id": "line-2", "text": "twice?"}))
            third = await _until(ws, "ack", id="line-2")
            await ws.send(json.dumps({"type": "leave"}))
        return first["seq"], second["seq"], third["seq"]

    first, second, third = asyncio.run(scenario())
    assert first == second and third == first + 1
    with Client(broker.input, "judge") as judge:
        texts = [e.text for e in judge.history(0) if isinstance(e, Message)]
    assert texts == ["once", "twice?"]


def test_a_refused_name_is_said_and_the_socket_closed(gateway: Gateway) -> None:
    async def scenario() -> tuple[dict[str, Any], int | None]:
        async with connect(gateway.ws) as ws:
            reply = await _hello(ws, name="has space")
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return reply, ws.close_code
    reply, code = asyncio.run(scenario())
    assert reply["code"] == "bad_name" and code == 4001


def test_per_socket_limits_close_a_flooding_or_oversized_tab(gateway: Gateway) -> None:
    async def flood() -> int | None:
        async with connect(gateway.ws) as ws:
            await _hello(ws, name="flood")
            with pytest.raises(ConnectionClosed):
                for _ in range(200):
                    await ws.send(json.dumps({"type": "who"}))
                    await asyncio.sleep(0)
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    async def oversized() -> int | None:
        async with connect(gateway.ws) as ws:
            await _hello(ws, name="big")
            await ws.send(json.dumps({"type": "say", "id": "x", "text": "x" * 8000}))
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code

    assert asyncio.run(flood()) == 1008
    assert asyncio.run(oversized()) == 1009


def test_tls_when_given_a_certificate(broker: RunningBroker, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    gw = Gateway(broker.input, "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert gw.url.startswith("https://")
        assert "plain http" not in gw.second
        context = ssl.create_default_context(cafile=str(cert))

        async def scenario() -> dict[str, Any]:
            async with connect(gw.ws, ssl=context) as ws:
                return await _hello(ws, name="secure")
        assert asyncio.run(scenario())["name"] == "secure"
    finally:
        gw.stop()


# ------------------------------------------------------------------ real addresses


@pytest.fixture
def relay_keys(tmp_path: Path) -> Path:
    """The broker's key pair and the gateway's relay key pair (admitted by the broker)."""
    root = tmp_path / "keys"
    (root / "relays").mkdir(parents=True)
    make_keypair(root, "broker")
    public, _ = make_keypair(root, "web")
    (root / "relays" / public.name).write_bytes(public.read_bytes())
    return root


@pytest.fixture
def relay_broker(start_broker: Any, relay_keys: Path) -> tuple[RunningBroker, str]:
    broker = start_broker("--relay-bind", "tcp://127.0.0.1:0", "--relay-broadcast",
                          "tcp://127.0.0.1:0", "--relay-keys", str(relay_keys / "relays"),
                          "--relay-secret-key", str(relay_keys / "broker.key_secret"),
                          "--rate", "0", "--heartbeat", "2")
    line = broker.wait_output(r" relay=\S+")
    link = re.search(r" relay=(\S+)", line)
    assert link is not None
    return broker, link.group(1)


def test_through_its_relay_the_broker_sees_each_browsers_own_address(
        relay_broker: tuple[RunningBroker, str], relay_keys: Path) -> None:
    broker, link = relay_broker
    gw = Gateway(link, "--upstream-key", str(relay_keys / "broker.key"),
                 "--relay-key", str(relay_keys / "web.key_secret"),
                 "--forwarded-allow", "127.0.0.1")
    try:
        assert "the broker sees each browser's address" in gw.second
        with Client(broker.input, "carol", timeout=10) as carol:
            async def scenario() -> dict[str, Any]:
                # A tab behind the trusted proxy (its X-Forwarded-For is believed)...
                async with connect(gw.ws, additional_headers={
                        "X-Forwarded-For": "198.51.100.1, 203.0.113.9"}) as ws:
                    welcome = await _hello(ws, name="alice")
                    await ws.send(json.dumps({"type": "say", "id": "1", "text": "hi"}))
                    await _until(ws, "ack", id="1")
                    await ws.send(json.dumps({"type": "leave"}))
                    return welcome

            welcome = asyncio.run(scenario())
            assert welcome["addr"] == "203.0.113.9"
            joined = wait_item(carol, lambda i: isinstance(i, Joined) and i.name == "alice")
            said = wait_item(carol, lambda i: isinstance(i, Message) and i.sender == "alice")
            left = wait_item(carol, lambda i: isinstance(i, Left) and i.name == "alice")
            assert (joined.addr, said.text, left.addr, left.reason) == \
                ("203.0.113.9", "hi", "203.0.113.9", "leave")
            who = {m.name: m.addr for m in carol.who()}
            assert "alice" not in who
    finally:
        gw.stop()


def test_forwarded_for_is_ignored_from_a_peer_not_named(gateway: Gateway) -> None:
    async def scenario() -> dict[str, Any]:
        async with connect(gateway.ws, additional_headers={"X-Forwarded-For": "6.6.6.6"}) as ws:
            return await _hello(ws, name="mallory")
    assert asyncio.run(scenario())["addr"] == "127.0.0.1"


def test_a_kicked_session_ends_its_tab_for_good(gateway: Gateway, broker: RunningBroker) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        seen: list[dict[str, Any]] = []
        async with connect(gateway.ws) as ws:
            await _hello(ws, name="victim")
            subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--control",
                            broker.control, "kick", "victim"], check=True, timeout=30,
                           capture_output=True)
            with pytest.raises(ConnectionClosed):
                while True:
                    seen.extend(await _next(ws))
            return seen, ws.close_code
    seen, code = asyncio.run(scenario())
    assert code == 4002  # the page does not reconnect
    assert any(m.get("item", {}).get("state") == "closed" for m in seen), seen


def test_a_replay_longer_than_the_backlog_still_reaches_a_returning_tab(
        broker: RunningBroker) -> None:
    gw = Gateway(broker.input, "--log-items", "20", "--backlog", "5", "--rate", "0")
    try:
        async def scenario() -> list[int]:
            async with connect(gw.ws) as ws:
                welcome = await _hello(ws, name="chatty")
                for n in range(30):  # one at a time: this tab reads all it is sent
                    await ws.send(json.dumps({"type": "say", "id": str(n), "text": f"m{n}"}))
                    await _until(ws, "ack", id=str(n))
            async with connect(gw.ws) as ws:
                await _hello(ws, name="chatty", token=welcome["token"], after=0)
                numbers: list[int] = []
                while len(numbers) < 20:
                    numbers += [m["n"] for m in await _next(ws) if m["type"] == "item"]
                return numbers
        numbers = asyncio.run(scenario())
        assert numbers == sorted(numbers) and len(numbers) == 20  # the last 20, in order
    finally:
        gw.stop()
