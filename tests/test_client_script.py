"""The scriptable zchat-client as scripts use it: a real subprocess on a pipe.

Each test runs ``python -m zchat.clients.terminal`` with stdin and stdout on
pipes (so it is in scriptable mode) against a real broker, and checks what a
script can rely on: every line delivered once and in order, events printed
(text or JSON lines), --say/--expect/--stay/--timeout, and the exit codes
with their one-line reasons.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import RunningBroker, unused_ports
from zchat import Client, Direct, Joined, Left, Message
from zchat.client import Item

CLIENT = [sys.executable, "-m", "zchat.clients.terminal"]


def run_client(broker: RunningBroker | str, *args: str, stdin: str = "",
               timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    endpoint = broker if isinstance(broker, str) else broker.input
    return subprocess.run([*CLIENT, "--connect", endpoint, *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


class Running:
    """A client subprocess whose stdout lines are collected as they come."""

    def __init__(self, broker: RunningBroker, *args: str) -> None:
        self.proc = subprocess.Popen([*CLIENT, "--connect", broker.input, *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no such line; got: {self.lines}")

    def finish(self, timeout: float = 10.0) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(broker: RunningBroker, *args: str) -> Running:
        running = Running(broker, *args)
        started.append(running)
        return running

    yield start
    for running in started:
        running.release()


@pytest.fixture
def listen(ctx: zmq.Context[Any], broker: RunningBroker) -> Iterator[Callable[[str], Client]]:
    """Library clients on the ``broker``, closed at teardown."""
    clients: list[Client] = []

    def join(name: str) -> Client:
        client = Client(broker.input, name, context=ctx, timeout=5.0)
        client.connect()
        clients.append(client)
        return client

    yield join
    for client in clients:
        client.close()


def collect(client: Client, done: Callable[[list[Item]], bool],
            timeout: float = 10.0) -> list[Item]:
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while not done(items):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"condition not met; got {items}")
        item = client.next_event(timeout=left)
        if item is not None:
            items.append(item)
    return items


def texts_from(items: list[Item], sender: str) -> list[str]:
    return [i.text for i in items if isinstance(i, Message) and i.sender == sender]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------- sending


def test_every_input_line_arrives_once_in_order_despite_rate_limits(
        start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--heartbeat", "0.5", "--burst", "5", "--rate", "50")
    with Client(broker.input, "reader", context=ctx, timeout=5.0) as reader:
        lines = [f"line {n}" for n in range(30)]
        result = run_client(broker, "--name", "pipe", stdin="\n".join(lines) + "\n\n")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        items = collect(reader, lambda got: any(isinstance(i, Left) for i in got))
    assert texts_from(items, "pipe") == lines  # the blank line is not sent
    left = [i for i in items if isinstance(i, Left)]
    assert [(i.name, i.reason) for i in left] == [("pipe", "leave")]


def test_events_are_plain_lines_with_recent_history(
        broker: RunningBroker, listen: Callable[[str], Client]) -> None:
    bob = listen("bob")
    for n in range(4):
        bob.send(f"said before pipe came, {n}")
    # pipe hears bob in the history shown on joining, so --expect is met at once.
    result = run_client(broker, "--name", "pipe", "--history", "6", "--expect", "bob",
                        "--timeout", "10", stdin="first\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(" -!- connected (your address: 127.0.0.1)")
    assert [line[9:] for line in lines[1:5]] == [  # all four: fewer than asked for
        f"<bob> said before pipe came, {n}" for n in range(4)]
    assert all(line[:8].replace(":", "").isdigit() for line in lines)  # HH:MM:SS first
    items = collect(bob, lambda got: any(isinstance(i, Left) for i in got))
    assert texts_from(items, "pipe") == ["first"]


def test_say_and_expect_find_each_other_whoever_starts_first(
        broker: RunningBroker, spawn: Callable[..., Running]) -> None:
    first = spawn(broker, "--name", "ann", "--say", "hi from ann", "--expect", "ben",
                  "--timeout", "15")
    first.wait_line(lambda line: "<ann> hi from ann" in line)
    # ann spoke before ben was there: ben hears her in the room's recent history.
    second = run_client(broker, "--name", "ben", "--say", "hi from ben", "--expect", "ann",
                        "--timeout", "15")
    assert second.returncode == 0, second.stderr
    code, stderr = first.finish()
    assert code == 0, stderr
    assert any("<ben> hi from ben" in line for line in first.lines)


def test_json_lines_and_stay_until_sigterm(broker: RunningBroker, spawn: Callable[..., Running],
                                           listen: Callable[[str], Client]) -> None:
    bot = spawn(broker, "--name", "jbot", "--json", "--stay")
    bot.wait_line(lambda line: '"connected"' in line)
    carol = listen("carol")
    carol.send("hello \x1b[31m jbot")
    carol.dm("jbot", "psst")
    bot.wait_line(lambda line: '"psst"' in line)
    bot.proc.send_signal(signal.SIGTERM)
    code, stderr = bot.finish()
    assert (code, stderr) == (0, "")
    events = [json.loads(line) for line in bot.lines]  # every line is one JSON object
    assert events[0] == {"type": "status", "state": "connected", "detail": "127.0.0.1"}
    assert {"type": "joined", "name": "carol", "addr": "127.0.0.1"}.items() <= events[1].items()
    said = [e for e in events if e["type"] == "message"]
    assert [(e["from"], e["text"]) for e in said] == [("carol", "hello \x1b[31m jbot")]
    assert [e for e in events if e["type"] == "dm"] == [
        {"type": "dm", "from": "carol", "to": "jbot", "text": "psst", "ts": pytest.approx(
            time.time(), abs=60)}]
    # SIGTERM made it leave, announced to the room.
    gone = collect(carol, lambda got: any(isinstance(i, Left) for i in got))
    assert [(i.name, i.reason) for i in gone if isinstance(i, Left)] == [("jbot", "leave")]


def test_commands_mode_sends_private_messages_and_actions(
        broker: RunningBroker, listen: Callable[[str], Client]) -> None:
    bob = listen("bob")
    carl = listen("carl")
    script = "/msg bob for bob only\n/me waves\n//slash\n/quit done here\nnot sent\n"
    result = run_client(broker, "--name", "cmd", "--commands", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "[private to bob] for bob only" in result.stdout
    bob_items = collect(bob, lambda got: any(isinstance(i, Left) for i in got))
    assert [(d.sender, d.text) for d in bob_items if isinstance(d, Direct)] == [
        ("cmd", "for bob only")]
    assert texts_from(bob_items, "cmd") == ["/me waves", "/slash"]
    assert [i.detail for i in bob_items if isinstance(i, Left)] == ["done here"]
    carl_items = collect(carl, lambda got: any(isinstance(i, Left) for i in got))
    assert not [i for i in carl_items if isinstance(i, Direct)]


# -------------------------------------------------------------- exit codes


def test_expect_times_out_with_exit_1(broker: RunningBroker) -> None:
    result = run_client(broker, "--name", "waiter", "--expect", "godot", "--timeout", "1")
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        "zchat-client: timeout after 1 s: did not hear from godot")


def test_broker_unreachable_exits_3() -> None:
    with socket.socket() as probe:  # a port with nobody listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_client(f"tcp://127.0.0.1:{port}", "--name", "lonely", "--timeout", "0.5",
                        "--say", "anyone?")
    assert result.returncode == 3
    assert one_line(result.stderr) == (
        f"zchat-client: broker unreachable at tcp://127.0.0.1:{port} "
        "(no answer within 0.5 s)")


def test_connect_takes_several_endpoints_and_fails_over_to_one_that_answers(
        broker: RunningBroker, listen: Callable[[str], Client]) -> None:
    # --connect as the library takes it (relays: tcp://r1:5555,tcp://r2:5555):
    # the first names a port nobody listens on, so the client moves on.
    bob = listen("bob")
    dead = unused_ports(1)[0]
    result = run_client(f"tcp://127.0.0.1:{dead},{broker.input}", "--name", "ferry",
                        "--timeout", "10", "--say", "crossed over")
    assert result.returncode == 0, result.stderr
    assert "crossed over" in texts_from(
        collect(bob, lambda got: "crossed over" in texts_from(got, "ferry")), "ferry")
    # A malformed one among them is a usage error, said before any socket.
    bad = run_client(f"{broker.input},tcp://nowhere", "--name", "ferry", "--say", "x")
    assert bad.returncode == 2
    assert one_line(bad.stderr) == "zchat-client: bad endpoint 'tcp://nowhere': expected tcp://HOST:PORT"


def test_taken_name_exits_4(broker: RunningBroker, listen: Callable[[str], Client]) -> None:
    listen("Taken")
    result = run_client(broker, "--name", "taken", "--say", "hi")
    assert result.returncode == 4
    assert one_line(result.stderr) == "zchat-client: join refused: name 'taken' is taken"


def test_bad_name_is_a_usage_error(broker: RunningBroker) -> None:
    result = run_client(broker, "--name", "two words", "--say", "hi")
    assert result.returncode == 2
    assert "bad name 'two words'" in one_line(result.stderr)


def test_refused_line_is_reported_and_exits_6(
        start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--heartbeat", "0.5", "--max-text", "10")
    with Client(broker.input, "reader", context=ctx, timeout=5.0) as reader:
        result = run_client(broker, "--name", "wordy", stdin="far too long a line\nshort\n")
        items = collect(reader, lambda got: any(isinstance(i, Left) for i in got))
    assert result.returncode == 6
    assert "not sent (too_large" in one_line(result.stderr)
    assert texts_from(items, "wordy") == ["short"]


def test_help_documents_options_commands_and_exit_codes() -> None:
    result = subprocess.run([*CLIENT, "--help"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0
    for word in ("--name", "--connect", "--say", "--expect", "--timeout", "--stay", "--json",
                 "/msg NAME TEXT", "/me ACTION", "/who", "/quit", "ZCHAT_NAME", "exit codes:"):
        assert word in result.stdout


# ------------------------------------------------- endpoints and handshakes


@pytest.mark.parametrize("endpoint", [
    "localhost:46101", "tcp://127.0.0.1", "tcp://*:46101", "udp://127.0.0.1:46101", "",
])
def test_a_bad_endpoint_is_one_line_and_exit_2(endpoint: str) -> None:
    result = run_client(endpoint, "--name", "zz", stdin="hi\n")
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == \
        f"zchat-client: bad endpoint {endpoint!r}: expected tcp://HOST:PORT"


def test_an_unresolvable_host_exits_3_at_once() -> None:
    started = time.monotonic()
    result = run_client("tcp://nohost.invalid:46101", "--name", "zz", stdin="hi\n")
    assert result.returncode == 3
    assert "cannot resolve host 'nohost.invalid'" in one_line(result.stderr)
    assert time.monotonic() - started < 8  # not the 10 s join timeout


def test_a_wrong_server_key_is_a_failed_handshake_exit_7(
        start_broker: Callable[..., RunningBroker], tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "zchat.broker.keygen", "--dir", str(tmp_path),
                    "broker", "other", "ann"], capture_output=True, timeout=30, check=True)
    (tmp_path / "authorized").mkdir()
    shutil.copy(tmp_path / "ann.key", tmp_path / "authorized")
    broker = start_broker("--secret-key", str(tmp_path / "broker.key_secret"),
                          "--authorized-keys", str(tmp_path / "authorized"))
    result = run_client(broker, "--name", "ann", "--server-key", str(tmp_path / "other.key"),
                        "--key", str(tmp_path / "ann.key_secret"), stdin="hi\n")
    assert result.returncode == 7
    assert "handshake failed: wrong server key?" in one_line(result.stderr)


# -------------------------------------------------- determinism and pacing


def test_own_echo_always_and_own_leave_never_printed(broker: RunningBroker) -> None:
    for run in range(6):
        result = run_client(broker, "--name", f"echo{run}", stdin=f"run {run} says hi\n")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert [line.split(" ", 1)[1] for line in lines if "says hi" in line] == \
            [f"<echo{run}> run {run} says hi"], result.stdout
        assert not any(f"echo{run} (" in line for line in lines), result.stdout


def test_a_paste_is_paced_not_refused(start_broker: Callable[..., RunningBroker],
                                      ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--heartbeat", "0.5")  # the defaults: a burst of 20, then 10/s
    lines = [f"line {n}" for n in range(30)]
    with Client(broker.input, "reader", context=ctx, timeout=5.0) as reader:
        result = run_client(broker, "--name", "paster", stdin="\n".join(lines) + "\n")
        assert result.returncode == 0, result.stderr
        items = collect(reader, lambda got: any(isinstance(i, Left) for i in got))
    assert texts_from(items, "paster") == lines
    # Paced at the budget's pace, not slower (no refusals, no back-off): the
    # broker's own times of the first and last line, so that the client's
    # start, slow on a loaded machine, does not count. 20 at once, then 10/s.
    stamps = [i.ts for i in items if isinstance(i, Message) and i.sender == "paster"]
    paced = stamps[-1] - stamps[0]
    stats = subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--control",
                            broker.control, "stats"], capture_output=True, text=True,
                           timeout=20, check=True).stdout
    assert re.search(r"^rate_limited\s+0\b", stats, re.MULTILINE), stats  # none refused
    assert paced < 4, f"30 lines took {paced:.2f} s from the first to the last"


def test_an_unknown_command_is_a_usage_error(broker: RunningBroker,
                                             listen: Callable[[str], Client]) -> None:
    reader = listen("reader")
    result = run_client(broker, "--name", "cmd", "--commands",
                        stdin="before\n/bogus thing\nafter\n")
    assert result.returncode == 2
    assert "unknown command /bogus" in one_line(result.stderr)
    items = collect(reader, lambda got: any(isinstance(i, Left) for i in got))
    assert texts_from(items, "cmd") == ["before"]


def test_nick_in_a_script_is_a_usage_error(broker: RunningBroker) -> None:
    result = run_client(broker, "--name", "cmd", "--commands", stdin="/nick other\n")
    assert result.returncode == 2
    assert "a name is kept for the whole session" in one_line(result.stderr)


# ------------------------------------------------------------------ rooms


@pytest.fixture
def member(ctx: zmq.Context[Any], broker: RunningBroker) -> Iterator[Callable[..., Client]]:
    """Library clients in the rooms named, closed at teardown."""
    clients: list[Client] = []

    def join(name: str, *rooms: str) -> Client:
        client = Client(broker.input, name, context=ctx, timeout=5.0, rooms=rooms)
        client.connect()
        clients.append(client)
        return client

    yield join
    for client in clients:
        client.close()


def test_room_sends_to_that_room_and_join_enters_the_others(
        broker: RunningBroker, member: Callable[..., Client]) -> None:
    dana = member("dana", "dev", "ops")
    result = run_client(broker, "--name", "pipe", "--join", "#dev,#ops", "--room", "ops",
                        stdin="for ops only\n")
    assert result.returncode == 0, result.stderr
    # Beyond lobby alone, each printed event says its room.
    assert re.search(r"^\d\d:\d\d:\d\d #ops <pipe> for ops only$", result.stdout, re.M), \
        result.stdout
    items = collect(dana, lambda got: sum(isinstance(i, Left) for i in got) == 2)
    assert [(i.room, i.text) for i in items if isinstance(i, Message)] == [
        ("ops", "for ops only")]
    assert sorted(i.room for i in items if isinstance(i, Joined)) == ["dev", "ops"]


def test_join_and_room_come_from_the_environment_too(
        broker: RunningBroker, member: Callable[..., Client]) -> None:
    erik = member("erik", "dev")
    result = subprocess.run([*CLIENT, "--connect", broker.input, "--name", "envy"],
                            input="from the environment\n", capture_output=True, text=True,
                            timeout=20, env={**os.environ, "ZCHAT_JOIN": "lobby",
                                             "ZCHAT_ROOM": "#DEV"})
    assert result.returncode == 0, result.stderr
    items = collect(erik, lambda got: any(isinstance(i, Message) for i in got))
    assert [(i.room, i.text) for i in items if isinstance(i, Message)] == [
        ("dev", "from the environment")]


def test_json_lines_carry_the_room(broker: RunningBroker, spawn: Callable[..., Running],
                                   member: Callable[..., Client]) -> None:
    bot = spawn(broker, "--name", "jroom", "--json", "--stay", "--join", "lobby,dev")
    bot.wait_line(lambda line: '"connected"' in line)
    fay = member("fay", "lobby", "dev")
    fay.send("in dev", room="dev")
    fay.send("in lobby")
    bot.wait_line(lambda line: '"in lobby"' in line)
    bot.proc.send_signal(signal.SIGTERM)
    code, stderr = bot.finish()
    assert (code, stderr) == (0, "")
    said = [json.loads(line) for line in bot.lines if '"message"' in line]
    assert [(e["room"], e["text"]) for e in said] == [("dev", "in dev"), ("lobby", "in lobby")]


def test_commands_mode_joins_and_parts_rooms(
        broker: RunningBroker, member: Callable[..., Client]) -> None:
    gus = member("gus", "lobby")
    script = "in lobby\n/join #side\nin side\n/topic side talk\n/part #side done\nlobby again\n"
    result = run_client(broker, "--name", "mover", "--commands", stdin=script)
    assert result.returncode == 0, result.stderr
    assert re.search(r"#side <mover> in side", result.stdout), result.stdout
    items = collect(gus, lambda got: any(isinstance(i, Left) for i in got))
    assert texts_from(items, "mover") == ["in lobby", "lobby again"]  # side's line stayed there
    assert {"side"} == {r.name for r in gus.rooms()} - {"lobby"}
    assert [e.text for e in gus.history(0, room="side") if isinstance(e, Message)] == ["in side"]


@pytest.mark.parametrize("option", ["--join=#bad room", "--join=dev,-x", "--room=a/b"])
def test_a_bad_room_name_is_a_usage_error(option: str) -> None:
    result = subprocess.run([*CLIENT, "--name", "x", "--say", "hi", option],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert "cannot be a room" in result.stderr
