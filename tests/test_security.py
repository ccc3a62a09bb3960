"""CURVE: only authorized clients get anything, on DEALER and on SUB."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth

from conftest import RunningBroker
from zchat import BrokerUnreachable, Client, Message, NameTaken
from zchat.keys import KeyFileError, load_client_keys


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """Key pairs for the broker, alice, bob and mallory; alice and bob authorized."""
    result = subprocess.run(
        [sys.executable, "-m", "zchat.broker.keygen", "--dir", str(tmp_path / "keys"),
         "broker", "alice", "bob", "mallory"],
        capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.count("public key") == 4
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    for name in ("alice", "bob"):
        shutil.copy(tmp_path / "keys" / f"{name}.key", authorized)
    secret = tmp_path / "keys" / "alice.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    return tmp_path


@pytest.fixture
def secure_broker(start_broker: Callable[..., RunningBroker], keys: Path) -> RunningBroker:
    return start_broker("--secret-key", str(keys / "keys" / "broker.key_secret"),
                        "--authorized-keys", str(keys / "authorized"), "--heartbeat", "0.3")


def client_for(broker: RunningBroker, keys: Path, name: str) -> Client:
    return Client(broker.input, name, timeout=5,
                  keys=load_client_keys(keys / "keys" / "broker.key",
                                        keys / "keys" / f"{name}.key_secret"))


def test_authorized_clients_chat_encrypted(secure_broker: RunningBroker, keys: Path) -> None:
    alice = client_for(secure_broker, keys, "alice")
    bob = client_for(secure_broker, keys, "bob")
    try:
        alice.connect()
        bob.connect()
        alice.send("secret plans")
        for item in bob.events(timeout=5):
            if isinstance(item, Message):
                assert item.text == "secret plans"
                break
        else:
            raise AssertionError("bob got nothing")
    finally:
        alice.close()
        bob.close()
    secure_broker.wait_output("CURVE on", stderr=True)


def test_unauthorized_key_gets_nothing(secure_broker: RunningBroker, keys: Path) -> None:
    mallory = client_for(secure_broker, keys, "mallory")
    with pytest.raises(BrokerUnreachable):
        mallory.connect(timeout=2)
    secure_broker.wait_output("refused a client from 127.0.0.1: key .* is not authorized",
                              stderr=True)


def test_plaintext_client_gets_nothing_on_dealer_or_sub(secure_broker: RunningBroker,
                                                        keys: Path,
                                                        ctx: zmq.Context[Any]) -> None:
    alice = client_for(secure_broker, keys, "alice")
    try:
        alice.connect()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(secure_broker.input)
        dealer.send(msgpack.packb({"type": "ping", "id": "p"}))
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(secure_broker.broadcast)
        for i in range(5):
            alice.send(f"m{i}")
        # Heartbeats go out every 0.3 s: two seconds of silence is telling.
        assert not dealer.poll(2000)
        assert not sub.poll(500)
    finally:
        alice.close()


def test_key_options_go_together_and_bad_files_are_clear(keys: Path) -> None:
    half = subprocess.run(
        [sys.executable, "-m", "zchat.broker.main", "--secret-key",
         str(keys / "keys" / "broker.key_secret"), "--db", ":memory:"],
        capture_output=True, text=True, timeout=30)
    assert half.returncode == 2
    assert "go together" in half.stderr
    public_only = subprocess.run(
        [sys.executable, "-m", "zchat.broker.main", "--secret-key",
         str(keys / "keys" / "broker.key"), "--authorized-keys", str(keys / "authorized"),
         "--db", ":memory:"],
        capture_output=True, text=True, timeout=30)
    assert public_only.returncode == 2
    assert "no secret key" in public_only.stderr
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_client_keys(keys / "nope.key", keys / "keys" / "alice.key_secret")


def test_plaintext_broker_says_so(broker: RunningBroker) -> None:
    broker.wait_output("plaintext: anyone who reaches the ports can read", stderr=True)


def test_zchat_client_with_keys(secure_broker: RunningBroker, keys: Path) -> None:
    bob = client_for(secure_broker, keys, "bob")
    try:
        bob.connect()
        said = subprocess.run(
            [sys.executable, "-m", "zchat.clients.terminal", "--connect", secure_broker.input,
             "--name", "alice", "--server-key", str(keys / "keys" / "broker.key"),
             "--key", str(keys / "keys" / "alice.key_secret"), "--say", "over CURVE"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert said.returncode == 0, said.stderr
        for item in bob.events(timeout=10):
            if isinstance(item, Message):
                assert (item.sender, item.text) == ("alice", "over CURVE")
                break
        else:
            raise AssertionError("bob never heard alice")
    finally:
        bob.close()
    plain = subprocess.run(
        [sys.executable, "-m", "zchat.clients.terminal", "--connect", secure_broker.input,
         "--name", "eve", "--say", "let me in", "--timeout", "2"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    # Not "unreachable": the broker answered and wants keys (exit 7, handshake).
    assert plain.returncode == 7
    assert "handshake failed: does the broker need --server-key and --key?" in plain.stderr
    half = subprocess.run(
        [sys.executable, "-m", "zchat.clients.terminal", "--name", "eve", "--key", "x"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert half.returncode == 2
    assert "go together" in half.stderr


def test_a_name_is_bound_to_the_key_that_took_it(secure_broker: RunningBroker,
                                                 keys: Path) -> None:
    first = Client(secure_broker.input, "carol", timeout=5,
                   keys=load_client_keys(keys / "keys" / "broker.key",
                                         keys / "keys" / "alice.key_secret"))
    first.connect()
    first.leave("going")
    impostor = Client(secure_broker.input, "carol", timeout=5,
                      keys=load_client_keys(keys / "keys" / "broker.key",
                                            keys / "keys" / "bob.key_secret"))
    with pytest.raises(NameTaken, match="registered to another key"):
        impostor.connect()
    again = Client(secure_broker.input, "carol", timeout=5,
                   keys=load_client_keys(keys / "keys" / "broker.key",
                                         keys / "keys" / "alice.key_secret"))
    try:
        assert again.connect().name == "carol"
    finally:
        again.close()


def test_authorizing_a_key_needs_no_restart(secure_broker: RunningBroker, keys: Path) -> None:
    with pytest.raises(BrokerUnreachable):
        client_for(secure_broker, keys, "mallory").connect(timeout=2)
    shutil.copy(keys / "keys" / "mallory.key", keys / "authorized")
    mallory = client_for(secure_broker, keys, "mallory")
    try:
        assert mallory.connect(timeout=10).name == "mallory"
    finally:
        mallory.close()
    secure_broker.wait_output(r"3 client key\(s\) authorized", stderr=True)


def test_a_crowd_of_unknown_keys_makes_few_log_lines(secure_broker: RunningBroker,
                                                     keys: Path,
                                                     ctx: zmq.Context[Any]) -> None:
    public, _ = zmq.auth.load_certificate(keys / "keys" / "broker.key")
    strangers = []
    for _ in range(300):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.connect(secure_broker.input)
        strangers.append(sock)
    secure_broker.wait_output("is not authorized", stderr=True)
    secure_broker.wait_output(r"\d+ more like the last zap warning", stderr=True, timeout=15)
    refusals = [line for line in secure_broker.stderr_lines if "not authorized" in line]
    assert len(refusals) <= 5, f"{len(refusals)} log lines for 300 strangers"
