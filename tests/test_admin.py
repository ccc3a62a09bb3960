"""zchat-admin and zchat-broker as real subprocesses: commands, exit codes, help."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import RawClient, RunningBroker


@pytest.fixture
def broker(start_broker: Callable[..., RunningBroker]) -> RunningBroker:
    """A broker whose silent members outlive a slow ``zchat-admin`` start.

    The raw clients here join and then wait on the tool without pinging; at
    the usual fixture's 0.5 s heartbeat they would be dropped after 1.5 s,
    which a Python start on a loaded machine can take.
    """
    return start_broker("--heartbeat", "2", "--rate", "0")


def admin(broker: RunningBroker | None, *args: str, timeout: float = 5.0,
          control: str | None = None) -> subprocess.CompletedProcess[str]:
    endpoint = control or (broker.control if broker else "")
    return subprocess.run(
        [sys.executable, "-m", "zchat.broker.admin", "--control", endpoint,
         "--timeout", str(timeout), *args],
        capture_output=True, text=True, timeout=timeout + 20,
    )


def test_stats_and_who(broker: RunningBroker, ctx: zmq.Context[Any]) -> None:
    client = RawClient(ctx, broker)
    client.join("alice")
    client.request({"type": "message", "text": "hi"})
    stats = admin(broker, "--json", "stats")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)["stats"]
    assert data["members"] == 1
    assert data["messages"] == 1
    assert data["seq"] == 2
    assert data["input"] == broker.input
    assert data["pid"] == broker.proc.pid
    who = admin(broker, "who")
    assert who.returncode == 0
    assert "alice" in who.stdout and "127.0.0.1" in who.stdout
    assert "1 member(s)" in who.stdout


def test_say_is_a_notice_for_everyone(broker: RunningBroker, ctx: zmq.Context[Any]) -> None:
    client = RawClient(ctx, broker)
    client.join("alice")
    result = admin(broker, "say", "maintenance", "at", "noon")
    assert (result.returncode, result.stdout.strip()) == (0, "ok")
    event = client.wait_event(lambda e: e["type"] == "notice")
    assert event["text"] == "maintenance at noon"
    broker.wait_output(r"\*\*\* notice: maintenance at noon")


def test_kick(broker: RunningBroker, ctx: zmq.Context[Any]) -> None:
    alice = RawClient(ctx, broker)
    alice.join("alice")
    watcher = RawClient(ctx, broker)
    watcher.join("watcher")
    result = admin(broker, "kick", "ALICE", "be", "nice")
    assert result.returncode == 0, result.stderr
    assert alice.recv() == {"type": "bye", "reason": "kicked", "detail": "be nice"}
    left = watcher.wait_event(lambda e: e["type"] == "left")
    assert (left["name"], left["reason"], left["detail"]) == ("alice", "kicked", "be nice")
    missing = admin(broker, "kick", "alice")
    assert missing.returncode == 1
    assert "no_such_user" in missing.stderr
    assert missing.stderr.count("\n") == 1  # one clear line, no traceback


def test_commands_one_after_another_and_two_at_once(broker: RunningBroker) -> None:
    for _ in range(5):
        assert admin(broker, "stats").returncode == 0
    argv = [sys.executable, "-m", "zchat.broker.admin", "--control", broker.control,
            "--timeout", "10", "--json", "stats"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outcomes = []
    for proc in procs:
        _, err = proc.communicate(timeout=30)
        outcomes.append((proc.returncode, err))
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes


def test_say_retried_is_not_said_twice(broker: RunningBroker, ctx: zmq.Context[Any]) -> None:
    # Two operators at once: each command runs exactly once.
    argv = [sys.executable, "-m", "zchat.broker.admin", "--control", broker.control,
            "--timeout", "10", "say"]
    procs = [subprocess.Popen([*argv, f"notice {i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    # Joined only now: a member silent for 3 heartbeats (1.5 s here) while
    # three Pythons start would be dropped, and its request refused.
    client = RawClient(ctx, broker)
    client.join("alice")
    history = client.request({"type": "history", "after": 0})["events"]
    notices = sorted(e["text"] for e in history if e["type"] == "notice")
    assert notices == ["notice 0", "notice 1", "notice 2"]


def test_shutdown_command_stops_broker(broker: RunningBroker) -> None:
    result = admin(broker, "shutdown")
    assert result.returncode == 0
    assert broker.proc.wait(10) == 0


def test_unreachable_broker_fails_fast_with_one_line() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = admin(None, "stats", timeout=1.0, control=f"tcp://127.0.0.1:{port}")
    assert result.returncode == 3
    assert result.stderr.startswith("zchat-admin: no answer from the broker")
    assert result.stderr.count("\n") == 1


def test_broker_help_and_bad_config(start_broker: Callable[..., RunningBroker]) -> None:
    helped = subprocess.run([sys.executable, "-m", "zchat.broker.main", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    for option in ("--input", "--broadcast", "--control", "--heartbeat", "--max-text", "--rate",
                   "--burst", "--history", "--hide-addresses", "--log-level", "ZCHAT_"):
        assert option in helped.stdout
    public = subprocess.run(
        [sys.executable, "-m", "zchat.broker.main", "--control", "tcp://0.0.0.0:5999"],
        capture_output=True, text=True, timeout=30)
    assert public.returncode == 2
    assert "not loopback" in public.stderr
    bad_env = subprocess.run([sys.executable, "-m", "zchat.broker.main"],
                             capture_output=True, text=True, timeout=30,
                             env={"ZCHAT_HEARTBEAT": "soon", "PATH": ""})
    assert bad_env.returncode == 2
    assert "ZCHAT_HEARTBEAT" in bad_env.stderr


def test_port_in_use_is_a_clear_error(broker: RunningBroker) -> None:
    clash = subprocess.run(
        [sys.executable, "-m", "zchat.broker.main", "--input", broker.input,
         "--broadcast", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0"],
        capture_output=True, text=True, timeout=30)
    assert clash.returncode == 3
    assert "cannot bind" in clash.stderr
    assert "Traceback" not in clash.stderr


def test_admin_help() -> None:
    helped = subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    for word in ("stats", "who", "kick", "say", "shutdown", "ZCHAT_CONTROL", "Exit codes"):
        assert word in helped.stdout


def broker_exit(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a zchat-broker that must stop at start; free ports for what is not under test."""
    defaults = {"--input": "tcp://127.0.0.1:0", "--broadcast": "tcp://127.0.0.1:0",
                "--control": "tcp://127.0.0.1:0", "--db": ":memory:"}
    for option in args[::2]:
        defaults.pop(option, None)
    argv = [arg for pair in defaults.items() for arg in pair]
    return subprocess.run([sys.executable, "-m", "zchat.broker.main", *argv, *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("where", ["under-a-file", "/proc/nope/history.db"])
def test_database_that_cannot_be_created_is_exit_4(tmp_path: Path, where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "plain").write_text("not a folder")
        where = str(tmp_path / "plain" / "history.db")
    result = broker_exit("--db", where)
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith(f"zchat-broker: cannot open history database {where}")
    assert result.stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(("option", "endpoint"), [
    *(("--input", bad) for bad in (
        "46131", "localhost:46131", "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://:46131",
        "tcp://127.0.0.1:99999", "tcp://127.0.0.1:port", "udp://127.0.0.1:46131", "ipc://", "")),
    ("--broadcast", "46132"), ("--broadcast", "tcp://*"), ("--control", "127.0.0.1:46133"),
])
def test_malformed_endpoint_is_a_configuration_error(option: str, endpoint: str) -> None:
    result = broker_exit(option, endpoint)
    assert result.returncode == 2, result.stderr
    role = option.removeprefix("--")
    assert result.stderr.startswith(f"zchat-broker: {role} endpoint {endpoint!r}: expected ")
    assert result.stderr.count("\n") == 1


def test_endpoint_from_the_environment_is_checked_too() -> None:
    result = subprocess.run([sys.executable, "-m", "zchat.broker.main", "--db", ":memory:"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "ZCHAT_INPUT": "46131"})
    assert result.returncode == 2, result.stderr
    assert "input endpoint '46131': expected tcp://HOST:PORT" in result.stderr


def test_kick_without_a_name_says_the_name_is_required_and_the_reason_optional() -> None:
    result = admin(None, "kick", control="tcp://127.0.0.1:1")
    assert result.returncode == 2
    assert "required: NAME\n" in result.stderr
    assert "REASON, shown to everyone, is optional" in result.stderr
    assert "required: NAME, REASON" not in result.stderr


def test_stats_for_people_give_the_uptime_with_its_unit(broker: RunningBroker) -> None:
    result = admin(broker, "stats")
    assert result.returncode == 0, result.stderr
    uptime = re.search(r"^uptime +(\S.*)$", result.stdout, re.MULTILINE)
    assert uptime is not None, result.stdout
    assert re.fullmatch(r"\d+:\d\d:\d\d", uptime.group(1)), uptime.group(0)
