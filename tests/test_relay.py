"""zchat-relay with a real broker: the request path, the real address, the link's trust.

Every test runs a real ``zchat-broker`` with ``--relay-bind`` and real
``zchat-relay`` subprocesses on loopback ephemeral ports, and clients that
do not know they talk to a relay: the zchat library and raw v1/v2 clients.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RawClient, RunningBroker, unused_ports, wait_item, wait_line
from zchat import Client
from zchat.broker.relay import Relay, RelayConfig
from zchat.errors import HandshakeFailed, NameTaken
from zchat.keys import load_client_keys, make_keypair
from zchat.protocol import ClientStatus, Direct, Message
from zchat.session import Status

RELAY_LISTENING = re.compile(r"zchat-relay listening input=(\S+) broadcast=(\S+)")
RELAY_LINK = re.compile(r"relay=(\S+) relay-broadcast=(\S+)")


@dataclass
class Keys:
    """Key pairs for a broker, its relays and some clients, in one directory."""

    root: Path
    relays: Path = field(init=False)  # the broker's --relay-keys
    clients: Path = field(init=False)  # --authorized-keys (broker and relays)

    def __post_init__(self) -> None:
        self.relays = self.root / "relays"
        self.clients = self.root / "clients"
        self.relays.mkdir(parents=True)
        self.clients.mkdir()
        make_keypair(self.root, "broker")
        for name in ("relay-a", "relay-b"):
            public, _ = make_keypair(self.root, name)
            (self.relays / public.name).write_bytes(public.read_bytes())
        make_keypair(self.root, "stranger")  # a key no one admits
        for name in ("alice", "bob"):
            public, _ = make_keypair(self.root, name)
            (self.clients / public.name).write_bytes(public.read_bytes())

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")


@dataclass
class RunningRelay:
    """A ``zchat-relay`` subprocess and what it printed."""

    proc: subprocess.Popen[str]
    input: str
    broadcast: str
    lines: list[str]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(10)

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def wait_log(self, pattern: str, timeout: float = 10.0, *, count: int = 1) -> str:
        """Wait until ``count`` lines of the relay's output match ``pattern``."""
        return wait_line(self.lines, pattern, timeout, count=count, what="relay")


def _pump(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def launch_relay(upstream: str, keys: Keys, name: str, *args: str) -> RunningRelay:
    """Start ``zchat-relay`` in front of ``upstream``; return it once it listens."""
    return wait_listening(*spawn_relay(upstream, keys, name, *args))


def spawn_relay(upstream: str, keys: Keys, name: str,
                *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``zchat-relay`` without waiting (the broker may start meanwhile)."""
    argv = [sys.executable, "-m", "zchat.broker.relay_main",
            "--upstream", upstream, "--upstream-key", keys.public("broker"),
            "--relay-key", keys.secret(name),
            "--input", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()
    return proc, lines


def wait_listening(proc: subprocess.Popen[str], lines: list[str]) -> RunningRelay:
    """The relay of ``spawn_relay`` once it printed its endpoints."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in list(lines):
            match = RELAY_LISTENING.search(line)
            if match:
                return RunningRelay(proc, match.group(1), match.group(2), lines)
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    raise AssertionError("relay did not start:\n" + "".join(lines))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def relay_broker_args(keys: Keys, *extra: str) -> tuple[str, ...]:
    return ("--relay-bind", "tcp://127.0.0.1:0", "--relay-broadcast", "tcp://127.0.0.1:0",
            "--relay-keys", str(keys.relays), "--relay-secret-key", keys.secret("broker"),
            "--rate", "0", *extra)


def relay_endpoint(broker: RunningBroker) -> str:
    line = broker.wait_output(r"relay=")
    match = RELAY_LINK.search(line)
    assert match is not None
    return match.group(1)


@pytest.fixture
def start_relay() -> Iterator[Callable[..., RunningRelay]]:
    started: list[RunningRelay] = []

    def start(upstream: str, keys: Keys, name: str = "relay-a", *args: str) -> RunningRelay:
        relay = launch_relay(upstream, keys, name, *args)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.release()


@pytest.fixture
def relayed(start_broker: Callable[..., RunningBroker], start_relay: Callable[..., RunningRelay],
            keys: Keys) -> tuple[RunningBroker, RunningRelay, RunningRelay]:
    """A broker with two relays, A and B, in front of it."""
    broker = start_broker(*relay_broker_args(keys))
    upstream = relay_endpoint(broker)
    return broker, start_relay(upstream, keys, "relay-a"), start_relay(upstream, keys, "relay-b")


def admin(broker: RunningBroker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--control",
                           broker.control, *args],
                          capture_output=True, text=True, timeout=20, check=False)


# --------------------------------------------------------------------- tests


def test_a_message_crosses_from_relay_a_to_relay_b_and_to_a_direct_client(
        relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    broker, relay_a, relay_b = relayed
    with Client(relay_a.input, "alice", timeout=10) as alice, \
            Client(relay_b.input, "bob", timeout=10) as bob, \
            Client(broker.input, "carol", timeout=10) as carol:
        for client in (alice, bob, carol):
            client.connect()
        # welcome names the relay's broadcast endpoint, not the broker's.
        assert alice.welcome is not None and alice.welcome.pub.endswith(
            relay_a.broadcast.rpartition(":")[2])
        seq = alice.send("hello across relays")
        for reader in (bob, carol, alice):
            item = wait_item(reader, lambda e: getattr(e, "text", None) == "hello across relays")
            assert item.seq == seq
        back = bob.send("and back")
        got = wait_item(alice, lambda e: getattr(e, "text", None) == "and back")
        assert got.seq == back and got.sender == "bob"


def test_raw_v1_and_v2_clients_through_a_relay(
        ctx: zmq.Context[Any], relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    _, relay_a, relay_b = relayed
    v1 = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    v2 = RawClient(ctx, relay_b)  # type: ignore[arg-type]
    welcome = v1.join("oldtimer")
    assert welcome["type"] == "welcome" and welcome["room"] == "lobby"
    assert welcome["pub"] == relay_a.broadcast.rpartition(":")[2] or \
        welcome["pub"] == relay_a.broadcast
    welcome2 = v2.join("newcomer", rooms=["lobby", "den"])
    assert welcome2["rooms"] == ["lobby", "den"]
    v1.wait_event(lambda e: e.get("type") == "joined" and e["name"] == "newcomer")
    ack = v2.request({"type": "message", "text": "in the den", "room": "den", "id": "m1"})
    assert ack == {"type": "ack", "id": "m1", "seq": ack["seq"], "room": "den"}
    v2.wait_event(lambda e: e.get("text") == "in the den" and e["room"] == "den")
    ack1 = v1.request({"type": "message", "text": "lobby only", "id": "m2"})
    assert ack1["type"] == "ack"
    v2.wait_event(lambda e: e.get("text") == "lobby only")
    # Replies reach the right client: who, history, ping, dm.
    members = v2.request({"type": "who", "room": "lobby", "id": "w"})
    assert {m["name"] for m in members["members"]} == {"oldtimer", "newcomer"}
    hist = v1.request({"type": "history", "after": 0, "id": "h"})
    assert [e.get("text") for e in hist["events"] if e["type"] == "message"] == ["lobby only"]
    v1.request({"type": "dm", "to": "newcomer", "text": "psst", "id": "d"})
    dm = v2.recv()
    assert dm["type"] == "dm" and dm["from"] == "oldtimer" and dm["text"] == "psst"
    # A bad frame through a relay is answered as a broker answers it.
    v1.send_raw(b"\xc1")
    assert v1.recv()["code"] == "bad_frame"
    v1.send_raw(b"a", b"b")
    assert v1.recv()["code"] == "bad_frame"


def test_private_room_events_reach_members_through_relays(
        ctx: zmq.Context[Any], relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    _, relay_a, relay_b = relayed
    owner = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    guest = RawClient(ctx, relay_b)  # type: ignore[arg-type]
    owner.join("owner")
    guest.join("guest")
    assert owner.request({"type": "enter", "room": "vault", "private": True,
                          "id": "e"})["type"] == "entered"
    owner.request({"type": "invite", "room": "vault", "name": "guest", "id": "i"})
    invited = guest.recv()
    assert invited["type"] == "invited" and invited["room"] == "vault"
    entered = guest.request({"type": "enter", "room": "vault", "id": "g"})
    assert entered["type"] == "entered"
    owner.request({"type": "message", "room": "vault", "text": "secret", "id": "s"})
    while (event := guest.recv())["type"] != "message":
        pass
    assert event["text"] == "secret" and event["room"] == "vault"


def test_the_broker_sees_each_clients_real_address(
        ctx: zmq.Context[Any], relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    broker, relay_a, _ = relayed
    # The relay reaches the broker from 127.0.0.1; this client comes from
    # 127.0.0.7 (libzmq's "source;destination" form), so the address the
    # broker reports can only be the client's.
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    port = relay_a.input.rpartition(":")[2]
    client.connect(f"tcp://127.0.0.7:0;127.0.0.1:{port}")
    client.send(msgpack.packb({"type": "join", "name": "faraway"}))
    assert client.poll(10_000)
    welcome = msgpack.unpackb(client.recv())
    assert welcome["type"] == "welcome" and welcome["addr"] == "127.0.0.7"
    who = admin(broker, "who")
    assert who.returncode == 0, who.stderr
    assert re.search(r"faraway\s.*127\.0\.0\.7", who.stdout), who.stdout


def test_a_client_cannot_claim_to_be_a_relay(
        ctx: zmq.Context[Any], keys: Keys,
        relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    broker, relay_a, _ = relayed
    fake_meta = msgpack.packb({"addr": "6.6.6.6", "key": None})
    forged = msgpack.packb({"type": "join", "name": "spoofed"})
    link = relay_endpoint(broker)

    # 1. The relay endpoint without CURVE, and with a key the broker does not
    # admit: the handshake fails, so nothing sent there is ever read.
    for keypair in (None, "stranger"):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED)
        if keypair is not None:
            load_client_keys(keys.public("broker"), keys.secret(keypair)).apply(sock)
        sock.connect(link)
        sock.send_multipart([b"R", b"zfake", fake_meta, forged])
        deadline = time.monotonic() + 10
        event = None
        while time.monotonic() < deadline and monitor.poll(1000):
            event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
            if event != zmq.EVENT_HANDSHAKE_SUCCEEDED and event != zmq.EVENT_CONNECTED:
                break
        assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert not sock.poll(200)
        sock.disable_monitor()
        monitor.close()

    # 2. Relay frames sent to the client input are one bad multipart request.
    impostor = RawClient(ctx, broker)
    impostor.send_raw(b"R", b"zfake", fake_meta, forged)
    assert impostor.recv()["code"] == "bad_frame"

    # 3. A direct connection announcing a relayed member's id (their first
    # bytes are 0x00 0xff, then a slot, then the client's id on its relay)
    # cannot speak for that member: brute-forcing the slot is hopeless, and
    # even the right id is dropped unread. (The victim joins only now: a raw
    # client does not ping, and the broker's heartbeat here is 0.5 s.)
    victim = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    victim.join("victim")
    for slot in range(3):
        assert victim.request({"type": "ping", "id": f"p{slot}"})["type"] == "pong"
        squatter = ctx.socket(zmq.DEALER)
        squatter.setsockopt(zmq.LINGER, 0)
        squatter.setsockopt(zmq.ROUTING_ID, b"\x00\xff" + slot.to_bytes(4, "big") + b"zzzz")
        squatter.connect(broker.input)
        squatter.send(msgpack.packb({"type": "message", "text": "as you", "id": "x"}))
        assert not squatter.poll(300)
    who = victim.request({"type": "who", "id": "w"})
    names = {m["name"] for m in who.get("members", [])}
    assert who["type"] == "members", who
    assert names == {"victim"}
    assert "spoofed" not in admin(broker, "who").stdout


def test_relay_curve_admits_known_keys_and_the_broker_binds_names_to_them(
        start_broker: Callable[..., RunningBroker], start_relay: Callable[..., RunningRelay],
        keys: Keys) -> None:
    broker = start_broker(*relay_broker_args(keys))
    upstream = relay_endpoint(broker)
    curve = ("--secret-key", keys.secret("broker"), "--authorized-keys", str(keys.clients))
    relay_a = start_relay(upstream, keys, "relay-a", *curve)
    relay_b = start_relay(upstream, keys, "relay-b", *curve)
    alice_keys = load_client_keys(keys.public("broker"), keys.secret("alice"))
    bob_keys = load_client_keys(keys.public("broker"), keys.secret("bob"))
    with Client(relay_a.input, "alice", keys=alice_keys, timeout=10) as alice, \
            Client(relay_b.input, "bob", keys=bob_keys, timeout=10) as bob:
        alice.connect()
        bob.connect()
        alice.send("encrypted hop")
        wait_item(bob, lambda e: getattr(e, "text", None) == "encrypted hop")
        # The broker got bob's key through relay B: the name is bound to it,
        # so alice's key cannot take "bob" through relay A.
        thief = Client(relay_a.input, "bob", keys=alice_keys, timeout=5)
        try:
            with pytest.raises(NameTaken, match="another key"):
                thief.connect()
        finally:
            thief.close()
    # A key the relay does not admit fails its handshake, as at a broker.
    stranger = load_client_keys(keys.public("broker"), keys.secret("stranger"))
    mallory = Client(relay_a.input, "mallory", keys=stranger, timeout=5)
    try:
        with pytest.raises(HandshakeFailed):
            mallory.connect()
    finally:
        mallory.close()


def test_a_clients_dropped_connection_reaches_the_broker(
        ctx: zmq.Context[Any], relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    _, relay_a, relay_b = relayed
    watcher = RawClient(ctx, relay_b)  # type: ignore[arg-type]
    watcher.join("watcher")
    leaver = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    welcome = leaver.join("leaver")
    # The same routing id on a new connection is a stranger, as at a broker:
    # the relay told the broker that the first connection closed.
    rid = b"zsame-id-123456"
    first = ctx.socket(zmq.DEALER)
    first.setsockopt(zmq.LINGER, 0)
    first.setsockopt(zmq.ROUTING_ID, rid)
    first.connect(relay_a.input)
    first.send(msgpack.packb({"type": "join", "name": "bound"}))
    assert first.poll(10_000) and msgpack.unpackb(first.recv())["type"] == "welcome"
    first.close(linger=0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        second = ctx.socket(zmq.DEALER)
        second.setsockopt(zmq.LINGER, 0)
        second.setsockopt(zmq.ROUTING_ID, rid)
        second.connect(relay_a.input)
        second.send(msgpack.packb({"type": "ping", "id": "p"}))
        # libzmq refuses an id still held by a connection it has not seen go:
        # then this one hears nothing, and the next try comes later.
        if second.poll(2000) and msgpack.unpackb(second.recv()).get("joined") is False:
            second.close(linger=0)
            break
        second.close(linger=0)
    else:
        raise AssertionError("the broker still takes the new connection for the member")
    assert welcome["type"] == "welcome"


# ------------------------------------------- the relay alone, against a fake broker


@dataclass
class FakeUpstream:
    """The broker's end of the link, played by the test: a ROUTER and an XPUB."""

    router: zmq.Socket[Any]
    xpub: zmq.Socket[Any]
    link: str
    feed: str

    def recv(self, timeout: float = 10.0) -> list[bytes]:
        assert self.router.poll(timeout * 1000), "the relay sent nothing upstream"
        return self.router.recv_multipart()

    def subscription(self, timeout: float = 10.0) -> bytes:
        assert self.xpub.poll(timeout * 1000), "no subscription reached the broker"
        return bytes(self.xpub.recv())


@pytest.fixture
def fake_upstream(ctx: zmq.Context[Any], keys: Keys) -> FakeUpstream:
    server = zmq.auth.load_certificate(keys.secret("broker"))
    socks = []
    for kind in (zmq.ROUTER, zmq.XPUB):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = server
        sock.bind("tcp://127.0.0.1:0")
        socks.append(sock)
    router, xpub = socks
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscription the relay sends
    return FakeUpstream(router, xpub, router.last_endpoint.decode(), xpub.last_endpoint.decode())


@pytest.fixture
def run_relay(ctx: zmq.Context[Any], keys: Keys,
              fake_upstream: FakeUpstream) -> Iterator[Callable[..., Relay]]:
    """Run an embedded Relay in a thread, against the fake upstream."""
    running: list[tuple[Relay, threading.Thread]] = []

    def run(**kwargs: Any) -> Relay:
        options = {"input": "tcp://127.0.0.1:0", "broadcast": "tcp://127.0.0.1:0",
                   **kwargs.pop("options", {})}
        config = RelayConfig(upstream=fake_upstream.link, upstream_key=keys.public("broker"),
                             relay_key=keys.secret("relay-a"),
                             upstream_broadcast=fake_upstream.feed, **options)
        relay = Relay(config, **kwargs)
        relay.bind()
        thread = threading.Thread(target=relay.run, daemon=True)
        thread.start()
        running.append((relay, thread))
        return relay

    yield run
    for relay, thread in running:
        relay.stop()
        thread.join(10)
        assert not thread.is_alive()


def test_the_relay_subscribes_upstream_only_to_what_its_clients_want(
        ctx: zmq.Context[Any], fake_upstream: FakeUpstream,
        run_relay: Callable[..., Relay]) -> None:
    relay = run_relay()
    assert relay.endpoints is not None

    def sub(topic: bytes) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, topic)
        sock.connect(relay.endpoints.broadcast)  # type: ignore[union-attr]
        return sock

    first = sub(b"lobby\x00")
    assert fake_upstream.subscription() == b"\x01lobby\x00"
    second = sub(b"lobby\x00")  # the relay already has it: nothing new upstream
    den = sub(b"den\x00")
    assert fake_upstream.subscription() == b"\x01den\x00"
    # Events go down through libzmq's proxy, each to those who want it.
    deadline = time.monotonic() + 10
    while not second.poll(50):
        assert time.monotonic() < deadline
        fake_upstream.xpub.send_multipart([b"lobby\x00", b"warm-up"])
    for topic, body in ((b"other\x00", b"nobody"), (b"lobby\x00", b"for lobby"),
                        (b"den\x00", b"for den")):
        fake_upstream.xpub.send_multipart([topic, body])
    for sock, wanted in ((first, b"for lobby"), (second, b"for lobby"), (den, b"for den")):
        while (got := sock.recv_multipart())[1] == b"warm-up":
            pass
        assert got[1] == wanted
    # The last lobby subscriber gone, the relay unsubscribes upstream.
    first.close(linger=0)
    second.close(linger=0)
    assert fake_upstream.subscription() == b"\x00lobby\x00"


def test_an_embedded_relay_takes_inproc_clients_addresses_from_its_hook(
        ctx: zmq.Context[Any], fake_upstream: FakeUpstream,
        run_relay: Callable[..., Relay]) -> None:
    told = {b"zbrowser-1": "203.0.113.9"}
    relay = run_relay(context=ctx, address_of=told.get,
                      options={"input": "inproc://relay-in", "broadcast": "inproc://relay-pub"})
    hello = fake_upstream.recv()
    assert hello[1] == b"H"
    relay_id = hello[0]
    browser = ctx.socket(zmq.DEALER)
    browser.setsockopt(zmq.LINGER, 0)
    browser.setsockopt(zmq.ROUTING_ID, b"zbrowser-1")
    browser.connect("inproc://relay-in")
    join = msgpack.packb({"type": "join", "name": "webby"})
    browser.send(join)
    _, tag, client, meta, payload = fake_upstream.recv()
    assert (tag, client, payload) == (b"R", b"zbrowser-1", join)
    assert msgpack.unpackb(meta) == {"addr": "203.0.113.9", "key": None}
    # The welcome comes back with the relay's own broadcast endpoint in it.
    welcome = {"type": "welcome", "name": "webby", "pub": "5556", "addr": "203.0.113.9"}
    fake_upstream.router.send_multipart([relay_id, b"R", client, b"w", msgpack.packb(welcome)])
    assert browser.poll(10_000)
    assert msgpack.unpackb(browser.recv())["pub"] == "inproc://relay-pub"
    relay.forget(b"zbrowser-1")
    assert fake_upstream.recv()[1:] == [b"G", b"zbrowser-1"]


def test_the_address_hook_is_never_asked_about_a_tcp_client(
        ctx: zmq.Context[Any], fake_upstream: FakeUpstream,
        run_relay: Callable[..., Relay]) -> None:
    relay = run_relay(address_of=lambda _rid: "6.6.6.6")
    assert fake_upstream.recv()[1] == b"H"
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(relay.endpoints.input)  # type: ignore[union-attr]
    client.send(msgpack.packb({"type": "ping"}))
    meta = fake_upstream.recv()[3]
    assert msgpack.unpackb(meta)["addr"] == "127.0.0.1"


# ------------------------------------------------------- losing the broker


def free_ports(count: int) -> list[int]:
    return unused_ports(count)


def test_a_broker_restart_behind_relays_is_survived_without_loss(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        start_relay: Callable[..., RunningRelay], keys: Keys, tmp_path: Path) -> None:
    ports = free_ports(5)
    fixed = ("--input", f"tcp://127.0.0.1:{ports[0]}", "--broadcast",
             f"tcp://127.0.0.1:{ports[1]}", "--control", f"tcp://127.0.0.1:{ports[2]}",
             "--relay-bind", f"tcp://127.0.0.1:{ports[3]}", "--relay-broadcast",
             f"tcp://127.0.0.1:{ports[4]}", "--relay-keys", str(keys.relays),
             "--relay-secret-key", keys.secret("broker"), "--rate", "0",
             "--db", str(tmp_path / "history.db"))
    broker = start_broker(*fixed)
    upstream = f"tcp://127.0.0.1:{ports[3]}"
    relay_a = start_relay(upstream, keys, "relay-a")
    relay_b = start_relay(upstream, keys, "relay-b")
    # A raw client sees what the relay says when its broker goes: its
    # connection closes, as a dead broker's would.
    raw = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    monitor = raw.dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    assert raw.request({"type": "ping", "id": "p"})["type"] == "pong"
    with Client(relay_a.input, "alice", timeout=20) as alice, \
            Client(relay_b.input, "bob", timeout=20) as bob:
        alice.connect()
        bob.connect()
        before = alice.send("before the restart")
        wait_item(bob, lambda e: getattr(e, "text", None) == "before the restart")
        broker.proc.kill()
        broker.proc.wait(5)
        assert monitor.poll(10_000), "the relay kept its client's connection"
        for relay in (relay_a, relay_b):
            relay.wait_log("lost the broker")
        wait_item(bob, lambda e: isinstance(e, Status)
                  and e.state == ClientStatus.DISCONNECTED, timeout=20)
        start_broker(*fixed)
        for relay in (relay_a, relay_b):
            relay.wait_log("connected to the broker", 20, count=2)
        wait_item(bob, lambda e: isinstance(e, Status)
                  and e.state == ClientStatus.RECONNECTED, timeout=30)
        after = alice.send("after the restart")
        assert after > before
        got = wait_item(bob, lambda e: getattr(e, "text", None) == "after the restart",
                        timeout=20)
        assert got.seq == after
        # Nothing acked was lost: the history through the new broker has both.
        texts = [getattr(e, "text", None) for e in bob.history(after=0)]
        assert texts.count("before the restart") == 1
        assert texts.count("after the restart") == 1


def test_a_dead_relays_clients_time_out_at_the_broker_as_dropped_connections(
        ctx: zmq.Context[Any], relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    broker, relay_a, relay_b = relayed
    doomed = RawClient(ctx, relay_a)  # type: ignore[arg-type]
    doomed.join("doomed")
    watcher = RawClient(ctx, relay_b)  # type: ignore[arg-type]
    watcher.join("watcher")
    relay_a.proc.kill()
    # The link's close reaches the broker at once; the member stays resumable
    # for 3 heartbeats (0.5 s here), then is announced gone, as a direct
    # client whose connection dropped.
    deadline = time.monotonic() + 10
    while True:
        watcher.send({"type": "ping"})  # keep the watcher alive meanwhile
        try:
            left = watcher.wait_event(lambda e: e.get("type") == "left", timeout=0.4)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "the dead relay's client never left"
    assert left["name"] == "doomed" and left["reason"] == "timeout"
    broker.wait_output("relay link from fd .* closed: 1 client", stderr=True)


def test_a_stopping_brokers_bye_reaches_a_client_of_a_relay_that_was_not_reading(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        start_relay: Callable[..., RunningRelay], keys: Keys) -> None:
    # The broker says bye and closes the link while the relay is held still:
    # when it runs again, its I/O thread reads the bye and the close before
    # its loop reads either. libzmq drops what a socket has not yet read when
    # its connection closes under ZMQ_IMMEDIATE; the relay must not lose it.
    broker = start_broker(*relay_broker_args(keys))
    relay = start_relay(relay_endpoint(broker), keys)
    alice = RawClient(ctx, relay)  # type: ignore[arg-type]
    alice.join("alice")
    relay.proc.send_signal(signal.SIGSTOP)
    try:
        assert broker.stop() == 0
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    while True:
        reply = alice.recv(max(0.1, deadline - time.monotonic()))
        if reply.get("type") == "bye":
            break
    assert reply["reason"] == "shutdown"
    relay.wait_log("lost the broker")


# ------------------------------------------------------------- fail-over


def collect(client: Client, last: Callable[[Any], bool], timeout: float = 30.0) -> list[Any]:
    """Every item ``client`` delivers, up to and including the first that is ``last``."""
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.next_event(timeout=left)
        if item is not None:
            items.append(item)
            if last(item):
                return items
    raise AssertionError(f"not heard in time; heard {items}")


def test_a_killed_relays_clients_carry_on_through_the_other_losing_and_duplicating_nothing(
        relayed: tuple[RunningBroker, RunningRelay, RunningRelay]) -> None:
    _, relay_a, relay_b = relayed
    both = f"{relay_a.input},{relay_b.input}"
    with Client(both, "alice", timeout=30) as alice, \
            Client(both, "carol", timeout=30) as carol, \
            Client(f"{relay_b.input},{relay_a.input}", "bob", timeout=30) as bob:
        for client in (alice, carol, bob):
            client.connect()
        alice.enter("vault", private=True)
        alice.invite("vault", "carol")
        carol.enter("vault")
        sent = [bob.send_nowait(f"pub {i}") for i in range(20)]
        secret = [carol.send_nowait(f"vault {i}", room="vault") for i in range(5)]
        for future in (*sent, *secret):
            future.result(30)
        killed = time.monotonic()
        relay_a.proc.kill()  # alice and carol are on it
        # Sent while relay A is dead: bob's on B go at once; carol's wait in
        # her session and go out again, with the same ids, through B; her dm too.
        sent += [bob.send_nowait(f"pub {i}") for i in range(20, 40)]
        secret += [carol.send_nowait(f"vault {i}", room="vault") for i in range(5, 10)]
        dm = threading.Thread(target=carol.dm, args=("bob", "through B"), daemon=True)
        dm.start()
        # Everything alice hears is kept: the events before the kill count too.
        heard = collect(alice, lambda e: isinstance(e, Status)
                        and e.state == ClientStatus.RECONNECTED)
        wait_item(carol, lambda e: isinstance(e, Status)
                  and e.state == ClientStatus.RECONNECTED, timeout=30)
        resumed = time.monotonic() - killed
        for future in (*sent, *secret):
            future.result(30)
        dm.join(30)
        assert not dm.is_alive()
        bob.send("the end")
        # Rooms have no order between them: read each up to its own last message.
        heard += collect(alice, lambda e: isinstance(e, Message) and e.text == "the end")
        if not any(isinstance(e, Message) and e.text == "vault 9" for e in heard):
            heard += collect(alice, lambda e: isinstance(e, Message) and e.text == "vault 9")
        texts = [f"{e.room}:{e.text}" if e.room != "lobby" else e.text
                 for e in heard if isinstance(e, Message)]
        assert [t for t in texts if t.startswith("pub ")] == [f"pub {i}" for i in range(40)]
        assert [t for t in texts if t.startswith("vault:")] == [
            f"vault:vault {i}" for i in range(10)]
        dms = []
        bob.send("dm check")
        while True:
            item = wait_item(bob, lambda e: isinstance(e, Direct | Message), timeout=30)
            if isinstance(item, Message) and item.text == "dm check":
                break
            if isinstance(item, Direct):
                dms.append(item.text)
        assert dms == ["through B"]
        print(f"relay fail-over: clients resumed {resumed:.2f} s after the kill")


# ------------------------------------------------------------ hostile input


def test_the_brokers_connection_bounds_hold_on_a_relay(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        start_relay: Callable[..., RunningRelay], keys: Keys) -> None:
    broker = start_broker(*relay_broker_args(keys))
    relay = start_relay(relay_endpoint(broker), keys, "relay-a",
                        "--join-timeout", "3", "--max-per-address", "3")

    def connection(routing_id: bytes | None = None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # a cut stays cut while we look
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(relay.input)
        return sock, monitor

    def events(monitor: zmq.Socket[Any], timeout: float) -> list[int]:
        seen = []
        while monitor.poll(timeout * 1000):
            seen.append(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
            if seen[-1] == zmq.EVENT_DISCONNECTED:
                break
        return seen

    # A stranger that never joins is cut after --join-timeout, by the relay.
    _idle, idle_monitor = connection()
    started = time.monotonic()
    assert events(idle_monitor, 10)[-1] == zmq.EVENT_DISCONNECTED
    assert 2 < time.monotonic() - started < 10
    relay.wait_log("no join within 3 s")
    # A routing id in libzmq's own form that libzmq did not make: cut, unread.
    forged, forged_monitor = connection(b"\x00\x00\x00\x00\x07")
    forged.send(msgpack.packb({"type": "join", "name": "forger"}))
    assert zmq.EVENT_DISCONNECTED in events(forged_monitor, 5)
    relay.wait_log("forged an automatic routing id")
    # A joined client stays; a fourth input connection from one address is cut at once.
    member = RawClient(ctx, relay)  # type: ignore[arg-type]
    assert member.join("member")["type"] == "welcome"
    extra = [connection() for _ in range(3)]
    # (within a second: before the join timeout could cut them too)
    cut = [mon for _, mon in extra if zmq.EVENT_DISCONNECTED in events(mon, 1)]
    assert len(cut) == 1, "three input connections besides the member's: one too many"
    relay.wait_log("more than 3 connections from one address")
    assert member.request({"type": "ping", "id": "p"})["type"] == "pong"
    assert "forger" not in admin(broker, "who").stdout
    # SIGTERM stops the relay cleanly (it is PID 1 in a container).
    assert relay.stop(signal.SIGTERM) == 0
    relay.wait_log("zchat.relay: stopped")
