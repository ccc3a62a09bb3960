"""The interactive zchat-client in real terminals: tmux panes, a real broker.

Each test starts a private tmux server (``tmux -L zchat-test-<pid>-<n>``,
killed at teardown, and no other), runs clients in fixed-size detached
sessions, types with ``send-keys`` and reads the screens with
``capture-pane``, polling until the expected text shows (never a fixed
sleep). What a person would see is what is asserted: join lines with the
address, messages crossing, a half-typed line surviving incoming messages,
/who, /msg unseen by a third person, /quit announced, Tab and Up, a taken
name asked again, a closed terminal still leaving the room, and a broker
restart with nothing lost or doubled; rooms as irssi has them: windows
switched with Alt-N and Ctrl-N/Ctrl-P, the status line's activity markers,
a private room a third person cannot see, a kick seen by the whole room.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import RunningBroker, wait_item
from zchat import Client, Joined, Left, Message

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run)")

WIDTH, HEIGHT = 110, 30
_servers = itertools.count(1)


class Tmux:
    """A private tmux server whose sessions are zchat clients."""

    def __init__(self, tmp_path: Path) -> None:
        self.socket = f"zchat-test-{os.getpid()}-{next(_servers)}"
        config = tmp_path / f"{self.socket}.conf"
        # Dead panes stay readable (with their exit status); no status bar.
        config.write_text("set -g remain-on-exit on\nset -g status off\n"
                          "set -g history-limit 5000\n")
        self.base = ["tmux", "-u", "-L", self.socket, "-f", str(config)]
        # Not COLUMNS/LINES: xdist's workers set them (80x24), and a client
        # that believed them would wrap at 80 in a 110-column pane.
        inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.env = {**inherited, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "USER": "tester"}
        self.started = False

    def run(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True,
                              env=self.env, timeout=10)
        if done.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {done.stderr}")
        return done.stdout

    def client(self, session: str, *args: str) -> None:
        """Start ``zchat-client ARGS`` in a new session called ``session``."""
        self.session(session, " ".join([sys.executable, "-m", "zchat.clients.terminal", *args]))

    def session(self, session: str, command: str) -> None:
        """Run a shell ``command`` in a new session called ``session``."""
        # tmux runs this with sh -c; the shell prints how the command ended
        # (tmux's own pane_dead_status races the pane's end of file).
        self.run("new-session", "-d", "-s", session, "-x", str(WIDTH), "-y", str(HEIGHT),
                 f"{command}; echo [exited $?]")
        self.started = True

    def screen(self, session: str) -> str:
        """What the session shows, scrollback included, wrapped lines joined."""
        return self.run("capture-pane", "-p", "-J", "-S", "-1000", "-t", session)

    def prompt_line(self, session: str) -> str:
        """The last non-blank line of the visible screen: the input line."""
        lines = [line for line in self.run("capture-pane", "-p", "-t", session).splitlines()
                 if line.strip()]
        return lines[-1] if lines else ""

    def wait(self, session: str, pattern: str, timeout: float = 10.0) -> str:
        """Wait until the screen matches ``pattern`` (a regex); return the screen."""
        return self.wait_for(session, lambda screen: re.search(pattern, screen) is not None,
                             f"/{pattern}/", timeout)

    def wait_for(self, session: str, check: Callable[[str], bool], what: str,
                 timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(session)
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{session}: no {what} on screen:\n{screen}")
            time.sleep(0.05)  # polling interval, not a settle delay

    def wait_prompt(self, session: str, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (line := self.prompt_line(session)) != text:
            if time.monotonic() > deadline:
                raise AssertionError(f"{session}: input line is {line!r}, not {text!r}")
            time.sleep(0.05)

    def type(self, session: str, text: str, enter: bool = True) -> None:
        self.run("send-keys", "-t", session, "-l", text)
        if enter:
            self.run("send-keys", "-t", session, "Enter")

    def keys(self, session: str, *keys: str) -> None:
        self.run("send-keys", "-t", session, *keys)

    def exit_status(self, session: str, timeout: float = 10.0) -> int:
        """Wait for the client in ``session`` to exit; return its status."""
        screen = self.wait(session, r"\[exited \d+\]", timeout)
        return int(re.findall(r"\[exited (\d+)\]", screen)[-1])

    def kill_server(self) -> None:
        if self.started:
            subprocess.run([*self.base, "kill-server"], capture_output=True, env=self.env,
                           timeout=10)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    server.kill_server()


def count(screen: str, text: str) -> int:
    return screen.count(text)


def echoed(name: str, text: str) -> str:
    """A regex for ``name``'s line as the broker sent it back (time first),
    not the ``(pending) <name> ...`` line shown above the input meanwhile."""
    return rf"\d\d:\d\d <{name}> {text}"


def test_two_people_chat_and_a_third_joins(broker: RunningBroker, tmux: Tmux) -> None:
    ep = f"--connect {broker.input}"
    tmux.client("alice", "--name alice", ep)
    tmux.wait("alice", r"1 here: alice \(127\.0\.0\.1, you\)")
    tmux.wait_prompt("alice", "[alice]")
    tmux.type("alice", "hello, anyone here?")
    tmux.wait("alice", r"\d\d:\d\d <alice> hello, anyone here\?")

    # A newcomer gets context: the last messages and who is here.
    tmux.client("bob", "--name bob", ep)
    screen = tmux.wait("bob", r"2 here: alice \(127\.0\.0\.1\), bob \(127\.0\.0\.1, you\)")
    assert re.search(r"the last message:\n\d\d:\d\d <alice> hello, anyone here\?", screen)
    tmux.wait("alice", r"--> bob \(127\.0\.0\.1\) joined")

    # What alice is typing survives bob's messages arriving above it.
    tmux.wait_prompt("bob", "[bob]")
    tmux.type("alice", "half-typed", enter=False)
    tmux.wait_prompt("alice", "[alice] half-typed")
    tmux.type("bob", "hi alice")
    tmux.type("bob", "/me waves")
    tmux.wait("alice", r"<bob> hi alice\n.*\* bob waves")
    # (polled: the prompt is redrawn just after the lines printed above it)
    tmux.wait_prompt("alice", "[alice] half-typed")
    tmux.type("alice", " line")
    tmux.wait("bob", r"<alice> half-typed line")

    # A private message is marked private on both sides and unseen by carol.
    tmux.client("carol", "--name carol", ep)
    tmux.wait("alice", r"--> carol \(127\.0\.0\.1\) joined")
    tmux.wait_prompt("carol", "[carol]")
    tmux.type("alice", "/msg bob just between us")
    tmux.wait("alice", r"\[private to bob\] just between us")
    # bob's private messages with alice have their own window (irssi's
    # query): the status line marks it, Alt-3 shows it.
    tmux.wait("bob", r"\[2:#lobby\] 1:status 3:alice\+1!")
    tmux.keys("bob", "M-3")
    tmux.wait("bob", r"\[private from alice\] just between us\n\[3:alice\]")
    tmux.type("alice", "public again")
    screen = tmux.wait("carol", r"<alice> public again")
    assert "just between us" not in screen

    tmux.type("carol", "/who")
    tmux.wait("carol", r"3 here: alice \(127\.0\.0\.1\), bob \(127\.0\.0\.1\), "
                       r"carol \(127\.0\.0\.1, you\)")
    # Tab completes a name, Up recalls the last line.
    tmux.wait_prompt("carol", "[carol]")
    tmux.type("carol", "/msg b", enter=False)
    tmux.keys("carol", "Tab")
    tmux.wait_prompt("carol", "[carol] /msg bob")
    tmux.keys("carol", "C-u", "Up")
    tmux.wait_prompt("carol", "[carol] /who")
    tmux.keys("carol", "C-u")

    # Leaving, three ways: /quit with a reason, Ctrl-D, Ctrl-C.
    tmux.type("bob", "/quit lunch time")
    tmux.wait("alice", r"<-- bob \(127\.0\.0\.1\) left: lunch time")
    assert tmux.exit_status("bob") == 0
    assert "you left the chat" in tmux.screen("bob")
    tmux.wait_prompt("carol", "[carol]")
    tmux.keys("carol", "C-d")
    tmux.wait("alice", r"<-- carol \(127\.0\.0\.1\) left")
    assert tmux.exit_status("carol") == 0
    tmux.keys("alice", "C-c")
    assert tmux.exit_status("alice") == 0
    assert "Traceback" not in tmux.screen("alice") + tmux.screen("bob") + tmux.screen("carol")


def test_broker_restart_loses_and_doubles_nothing(
        start_broker: Callable[..., RunningBroker], tmux: Tmux) -> None:
    # A 5 s heartbeat: three silent ones would be 15 s before "offline".
    first = start_broker("--heartbeat", "5", "--rate", "0")
    ep = f"--connect {first.input}"
    tmux.client("ann", "--name ann", ep)
    tmux.wait("ann", r"1 here: ann")
    tmux.client("ben", "--name ben", ep)
    tmux.wait("ann", r"--> ben \(127\.0\.0\.1\) joined")
    tmux.wait_prompt("ann", "[ann]")
    tmux.type("ann", "before the restart")
    tmux.wait("ben", r"<ann> before the restart")

    first.stop(signal.SIGKILL)  # no goodbye: the connection drops
    killed = time.monotonic()
    for name in ("ann", "ben"):
        tmux.wait(name, r"-!- broker unreachable, retrying…", timeout=5)
    tmux.wait_prompt("ann", "[ann offline]", timeout=5)
    assert time.monotonic() - killed < 3, "offline should show within a few seconds"
    # What is typed meanwhile shows at once, marked as not sent yet.
    tmux.type("ann", "typed while the broker was down")
    tmux.wait("ann", r"\(pending\) <ann> typed while the broker was down\n.*\n\[ann offline\]",
              timeout=2)

    start_broker("--heartbeat", "0.5", "--rate", "0",
                 "--input", first.input, "--broadcast", first.broadcast)
    for name in ("ann", "ben"):
        screen = tmux.wait(name, r"(?s)-!- reconnected.*<ann> typed while the broker was down",
                           timeout=15)
        assert count(screen, "<ann> typed while the broker was down") == 1
        assert count(screen, "<ann> before the restart") == 1
        # Our own joining again is not news; the "reconnected" line says it.
        assert f"--> {name} (127.0.0.1) joined" not in screen.partition("reconnected")[2]
    tmux.wait_for("ann", lambda screen: "(pending)" not in screen, "pending line gone")
    tmux.wait_prompt("ann", "[ann]")
    tmux.type("ben", "all good?")
    screen = tmux.wait("ann", r"<ben> all good\?")
    assert count(screen, "<ann> typed while the broker was down") == 1


def test_taken_or_bad_name_is_asked_again(broker: RunningBroker, tmux: Tmux,
                                          ctx: zmq.Context[Any]) -> None:
    with Client(broker.input, "dora", context=ctx, timeout=5.0) as dora:
        tmux.client("second", "--name Dora", f"--connect {broker.input}")
        tmux.wait("second", r"the name Dora is taken; choose another\n")
        tmux.wait_prompt("second", "your name: tester")  # $USER, offered to edit
        tmux.keys("second", "C-u")
        tmux.type("second", "dora the second")
        tmux.wait("second", r"'dora the second' cannot be a name: .*whitespace")
        tmux.wait_prompt("second", "your name: tester")
        tmux.keys("second", "C-u")
        tmux.type("second", "dora2")
        tmux.wait("second", r"joined the lobby room at tcp://\S+ as dora2 "
                            r"\(your address: 127\.0\.0\.1\)")
        wait_item(dora, lambda i: isinstance(i, Joined) and i.name == "dora2")
        # Closing the terminal (SIGHUP) still leaves the room, with a reason.
        tmux.run("kill-session", "-t", "second")
        left = wait_item(dora, lambda i: isinstance(i, Left) and i.name == "dora2")
        assert (left.reason, left.detail) == ("leave", "terminal closed")


def test_unreachable_broker_is_retried_until_it_comes(
        start_broker: Callable[..., RunningBroker], tmux: Tmux) -> None:
    with socket.socket() as probe:  # a free port for the broker that is not there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    tmux.client("early", "--name early", f"--connect {endpoint}")
    tmux.wait("early", rf"broker unreachable at {endpoint}, retrying… \(Ctrl-C to give up\)")
    start_broker("--heartbeat", "0.5", "--input", endpoint)
    tmux.wait("early", r"joined the lobby room .* as early", timeout=15)
    assert "Traceback" not in tmux.screen("early")


def processes_mentioning(text: str) -> list[int]:
    """Pids of running processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # it ended meanwhile
    return found


def test_demo_script_runs_a_room_and_stops_what_it_started(tmux: Tmux) -> None:
    demo = Path(__file__).resolve().parent.parent / "demo.sh"
    tmux.session("demo", f"env ZCHAT_DEMO_PORTS='0 0 0' PYTHON={sys.executable} {demo} erin")
    screen = tmux.wait("demo", r"<greeter> welcome, erin! here now: greeter, helper",
                       timeout=30)
    found = re.search(r"a broker at (tcp://127\.0\.0\.1:\d+),", screen)
    assert found, screen
    endpoint = found.group(1)
    tmux.wait_prompt("demo", "[erin]")
    tmux.type("demo", "!roll 20")
    tmux.wait("demo", r"<helper> erin rolls \d+ \(1-20\)")
    # The bots are in #dev too, erin's third window.
    tmux.keys("demo", "M-3")
    wait_visible(tmux, "demo", r"<greeter> welcome, erin!(.|\n)*\[3:#dev\] 1:status 2:#lobby\n")
    tmux.type("demo", "/quit")
    assert tmux.exit_status("demo") == 0
    # The bots (started with the endpoint) and the broker (its port) are gone too.
    deadline = time.monotonic() + 10
    while left_over := processes_mentioning(endpoint):
        if time.monotonic() > deadline:
            raise AssertionError(f"demo.sh left processes running: {left_over}")
        time.sleep(0.05)
    port = int(endpoint.rpartition(":")[2])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_kicked_client_says_why_and_exits_5(broker: RunningBroker, tmux: Tmux) -> None:
    tmux.client("kim", "--name kim", f"--connect {broker.input}")
    tmux.wait_prompt("kim", "[kim]")
    subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--control", broker.control,
                    "kick", "kim", "too loud"], check=True, capture_output=True, timeout=20)
    screen = tmux.wait("kim", r"-!- disconnected: kicked by the operator: too loud")
    assert tmux.exit_status("kim") == 5
    assert "Traceback" not in screen


def test_refused_lines_are_one_notice_each(start_broker: Callable[..., RunningBroker],
                                           tmux: Tmux) -> None:
    broker = start_broker("--heartbeat", "0.5", "--max-text", "20", "--burst", "2",
                          "--rate", "0.01")
    tmux.client("rita", "--name rita", f"--connect {broker.input}")
    tmux.wait_prompt("rita", "[rita]")
    tmux.type("rita", "/msg zed are you there?")
    screen = tmux.wait("rita", r"-!- nobody called zed is here, not sent: are you there\?")
    assert "[private to zed]" not in screen  # only what was delivered is echoed
    tmux.type("rita", "this line is longer than twenty characters")
    tmux.wait("rita", r"-!- too long \(42 characters\), not sent: this line is longer")
    for text in ("a1", "a2", "a3"):  # a burst of 2, then 1 per 100 s
        tmux.type("rita", text)
    # The third waits its turn, shown as pending; it is not thrown away.
    screen = tmux.wait("rita", r"<rita> a2(.|\n)*\(pending\) <rita> a3\n.*\n\[rita\]")
    assert "rate limited" not in screen and "Traceback" not in screen


# ------------------------------------------ what irssi and weechat users expect


def test_a_mistyped_endpoint_is_one_line_and_exit_2(tmux: Tmux) -> None:
    tmux.client("typo", "--name zz", "--connect localhost:46101")
    assert tmux.exit_status("typo") == 2
    screen = tmux.screen("typo")
    assert "zchat-client: bad endpoint 'localhost:46101': expected tcp://HOST:PORT\n" in screen
    assert "Traceback" not in screen


def test_a_pasted_text_arrives_whole_and_in_order(
        start_broker: Callable[..., RunningBroker], tmux: Tmux, ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--heartbeat", "0.5")  # the defaults: a burst of 20, then 10/s
    lines = [f"pasted line {n}" for n in range(1, 31)]
    with Client(broker.input, "reader", context=ctx, timeout=5.0) as reader:
        tmux.client("paster", "--name paster", f"--connect {broker.input}")
        tmux.wait_prompt("paster", "[paster]")
        tmux.run("set-buffer", "-b", "paste", "\n".join(lines) + "\n")
        tmux.run("paste-buffer", "-p", "-b", "paste", "-t", "paster")
        got: list[str] = []
        while len(got) < len(lines):
            item = wait_item(reader, lambda i: isinstance(i, Message) and i.sender == "paster")
            got.append(item.text)
    assert got == lines
    screen = tmux.wait_for("paster", lambda s: "(pending)" not in s and
                           "<paster> pasted line 30" in s, "all lines sent")
    assert "rate limited" not in screen


def test_ctrl_c_clears_a_half_typed_line_and_leaves_on_an_empty_one(
        broker: RunningBroker, tmux: Tmux) -> None:
    tmux.client("cc", "--name cc", f"--connect {broker.input}")
    tmux.wait_prompt("cc", "[cc]")
    tmux.type("cc", "half a thought", enter=False)
    tmux.wait_prompt("cc", "[cc] half a thought")
    tmux.keys("cc", "C-c")
    tmux.wait_prompt("cc", "[cc]")
    tmux.type("cc", "still here")
    tmux.wait("cc", echoed("cc", "still here"))
    tmux.keys("cc", "C-c")
    assert tmux.exit_status("cc") == 0


def test_page_up_scrolls_back_and_page_down_returns(
        broker: RunningBroker, tmux: Tmux, ctx: zmq.Context[Any]) -> None:
    tmux.client("pager", "--name pager", f"--connect {broker.input}")
    tmux.wait_prompt("pager", "[pager]")
    with Client(broker.input, "talker", context=ctx, timeout=5.0) as talker:
        for n in range(2 * HEIGHT):
            talker.send_nowait(f"filler {n}")
        talker.send("the end")
        tmux.wait("pager", r"<talker> the end")
    tmux.wait_prompt("pager", "[pager]")
    tmux.keys("pager", "PageUp")
    deadline = time.monotonic() + 10
    while (mode := tmux.run("display", "-p", "-t", "pager",
                            "#{pane_in_mode} #{scroll_position}").split()) [0] != "1":
        if time.monotonic() > deadline:
            raise AssertionError(f"PageUp did not scroll back: {mode}")
        time.sleep(0.05)
    assert int(mode[1]) > 0
    for _ in range(3):
        tmux.keys("pager", "PageDown")
    deadline = time.monotonic() + 10
    while tmux.run("display", "-p", "-t", "pager", "#{pane_in_mode}").strip() != "0":
        if time.monotonic() > deadline:
            raise AssertionError("PageDown at the bottom did not return to the chat")
        time.sleep(0.05)


def test_long_lines_wrap_under_the_text(broker: RunningBroker, tmux: Tmux,
                                        ctx: zmq.Context[Any]) -> None:
    tmux.client("belle", "--name belle", f"--connect {broker.input}")
    tmux.wait_prompt("belle", "[belle]")
    long = " ".join(f"word{n:03d}" for n in range(40))  # 319 characters, 110 columns
    with Client(broker.input, "bob", context=ctx, timeout=5.0) as bob:
        bob.send(long)
        screen = tmux.wait("belle", r"word039")
        indent = " " * len("00:00 <bob> ")
        shown = [line for line in screen.splitlines() if "word0" in line]
        assert len(shown) >= 3 and all(len(line) < WIDTH for line in shown)
        assert all(line.startswith(indent) and line[len(indent)] != " " for line in shown[1:])


def test_a_private_message_rings_the_bell(broker: RunningBroker, tmux: Tmux,
                                          ctx: zmq.Context[Any]) -> None:
    tmux.client("belle", "--name belle", f"--connect {broker.input}")
    tmux.wait_prompt("belle", "[belle]")
    with Client(broker.input, "bob", context=ctx, timeout=5.0) as bob:
        bob.send("no bell for this")
        tmux.wait("belle", r"<bob> no bell for this")
        assert tmux.run("display", "-p", "-t", "belle", "#{window_bell_flag}").strip() == "0"
        bob.dm("belle", "psst")
        tmux.wait("belle", r"3:bob\+1!")
        tmux.keys("belle", "M-3")
        tmux.wait("belle", r"\[private from bob\] psst")
    deadline = time.monotonic() + 5
    while tmux.run("display", "-p", "-t", "belle", "#{window_bell_flag}").strip() != "1":
        if time.monotonic() > deadline:
            raise AssertionError("no bell for a private message")
        time.sleep(0.05)


def pane_process(tmux: Tmux, session: str) -> int:
    """The pid of the client that the session's shell started."""
    shell = int(tmux.run("display", "-p", "-t", session, "#{pane_pid}"))
    deadline = time.monotonic() + 10
    while not (children := Path(f"/proc/{shell}/task/{shell}/children").read_text().split()):
        if time.monotonic() > deadline:
            raise AssertionError("the client process did not start")
        time.sleep(0.05)
    return int(children[0])


def test_a_lost_history_shows_only_the_last_messages(
        start_broker: Callable[..., RunningBroker], tmux: Tmux, ctx: zmq.Context[Any]) -> None:
    first = start_broker("--heartbeat", "0.5", "--rate", "0")
    tmux.client("hana", "--name hana", "--history 3", f"--connect {first.input}")
    tmux.wait_prompt("hana", "[hana]")
    client = pane_process(tmux, "hana")
    # hana sleeps through the broker's restart and the new room's first talk.
    os.kill(client, signal.SIGSTOP)
    try:
        first.stop(signal.SIGKILL)
        second = start_broker("--heartbeat", "0.5", "--rate", "0",
                              "--input", first.input, "--broadcast", first.broadcast)
        with Client(second.input, "newsie", context=ctx, timeout=5.0) as newsie:
            for n in range(10):
                newsie.send(f"new room talk {n}")
            os.kill(client, signal.SIGCONT)
            screen = tmux.wait("hana", r"(?s)reconnected.*the last 3 messages:\n.*"
                                       r"<newsie> new room talk 7\n.*talk 8\n.*talk 9\n",
                               timeout=15)
            newsie.send("live again")
            screen = tmux.wait("hana", r"<newsie> live again")
    finally:
        os.kill(client, signal.SIGCONT)
    after = screen.partition("reconnected")[2]
    assert "new room talk 6" not in after and "--> newsie" not in after
    assert "--> hana" not in after


def test_own_leave_and_join_are_not_shown_across_a_broker_shutdown(
        start_broker: Callable[..., RunningBroker], tmux: Tmux, tmp_path: Path) -> None:
    db = str(tmp_path / "history.db")
    first = start_broker("--heartbeat", "0.5", "--rate", "0", "--db", db)
    tmux.client("sid", "--name sid", f"--connect {first.input}")
    tmux.wait_prompt("sid", "[sid]")
    tmux.type("sid", "before")
    tmux.wait("sid", echoed("sid", "before"))
    first.stop(signal.SIGTERM)
    tmux.wait_prompt("sid", "[sid offline]")
    start_broker("--heartbeat", "0.5", "--rate", "0", "--db", db,
                 "--input", first.input, "--broadcast", first.broadcast)
    tmux.wait("sid", r"-!- reconnected", timeout=15)
    tmux.wait_prompt("sid", "[sid]")
    tmux.type("sid", "after")
    screen = tmux.wait("sid", echoed("sid", "after"))
    assert "sid (127.0.0.1) left" not in screen and "--> sid" not in screen
    assert count(screen, "<sid> before") == 1


def test_a_wrong_server_key_says_so_and_exits_7(
        start_broker: Callable[..., RunningBroker], tmux: Tmux, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "zchat.broker.keygen", "--dir", str(tmp_path),
                    "broker", "other", "kay"], capture_output=True, timeout=30, check=True)
    (tmp_path / "authorized").mkdir()
    shutil.copy(tmp_path / "kay.key", tmp_path / "authorized")
    broker = start_broker("--secret-key", str(tmp_path / "broker.key_secret"),
                          "--authorized-keys", str(tmp_path / "authorized"))
    tmux.client("kay", "--name kay", f"--connect {broker.input}",
                f"--server-key {tmp_path / 'other.key'}", f"--key {tmp_path / 'kay.key_secret'}")
    assert tmux.exit_status("kay") == 7
    screen = tmux.screen("kay")
    assert "zchat-client: handshake failed: wrong server key?" in screen
    assert "unreachable" not in screen and "Traceback" not in screen


def test_quitting_right_after_a_paste_still_sends_it_all(
        start_broker: Callable[..., RunningBroker], tmux: Tmux, ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--heartbeat", "0.5")  # the defaults: a burst of 20, then 10/s
    lines = [f"last words {n}" for n in range(1, 26)]
    with Client(broker.input, "reader", context=ctx, timeout=5.0) as reader:
        tmux.client("quitter", "--name quitter", f"--connect {broker.input}")
        tmux.wait_prompt("quitter", "[quitter]")
        tmux.run("set-buffer", "-b", "paste", "\n".join([*lines, "/quit bye"]) + "\n")
        tmux.run("paste-buffer", "-p", "-b", "paste", "-t", "quitter")
        got: list[str] = []
        left = wait_item(reader, lambda i: (isinstance(i, Message) and got.append(i.text))
                         or (isinstance(i, Left) and i.name == "quitter"))
    assert got == lines
    assert (left.reason, left.detail) == ("leave", "bye")
    assert tmux.exit_status("quitter") == 0


def test_page_up_outside_tmux_opens_the_session_in_a_pager(broker: RunningBroker,
                                                          tmux: Tmux) -> None:
    if shutil.which("less") is None:
        pytest.skip("needs less")
    # As in a plain terminal: the client cannot see that tmux runs it.
    tmux.session("plain", f"env -u TMUX -u TMUX_PANE {sys.executable} -m zchat.clients.terminal "
                          f"--name plain --connect {broker.input}")
    tmux.wait_prompt("plain", "[plain]")
    tmux.type("plain", "remember this")
    # Sent, not pending: the pager shows what was said, not the input area.
    tmux.wait("plain", echoed("plain", "remember this"))
    tmux.keys("plain", "PageUp")
    deadline = time.monotonic() + 10
    while tmux.run("display", "-p", "-t", "plain", "#{alternate_on}").strip() != "1":
        if time.monotonic() > deadline:
            raise AssertionError("PageUp opened no pager")
        time.sleep(0.05)
    # less draws its page after the screen switch: wait for the page.
    while not ("<plain> remember this" in (pager := tmux.run("capture-pane", "-p", "-t", "plain"))
               and "joined the lobby room" in pager):
        if time.monotonic() > deadline:
            raise AssertionError(f"the pager shows no session:\n{pager}")
        time.sleep(0.05)
    tmux.keys("plain", "q")
    tmux.wait_prompt("plain", "[plain]")
    tmux.type("plain", "back in the chat")
    tmux.wait("plain", echoed("plain", "back in the chat"))


# ------------------------------------------------------------------ rooms


def visible(tmux: Tmux, session: str) -> str:
    """What the session shows now, without its scrollback (and without the
    blanks a redraw may leave at the end of a line)."""
    screen = tmux.run("capture-pane", "-p", "-J", "-t", session)
    return "\n".join(line.rstrip(" ") for line in screen.split("\n"))


def wait_visible(tmux: Tmux, session: str, pattern: str, timeout: float = 10.0) -> str:
    """Wait until the visible screen matches ``pattern``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        screen = visible(tmux, session)
        if re.search(pattern, screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"{session}: no /{pattern}/ on the screen:\n{screen}")
        time.sleep(0.05)  # polling interval, not a settle delay


def test_two_people_in_two_rooms_switch_windows(broker: RunningBroker, tmux: Tmux) -> None:
    ep = f"--connect {broker.input}"
    tmux.client("alice", "--name alice", "--join '#dev,#ops'", ep)
    wait_visible(tmux, "alice", r"\[2:#dev\] 1:status 3:#ops\n\[alice\]")
    tmux.client("bob", "--name bob", "--join dev,ops", ep)  # the # is optional
    wait_visible(tmux, "bob", r"\[2:#dev\] 1:status 3:#ops\n\[bob\]")
    tmux.wait("alice", r"--> bob \(127\.0\.0\.1\) joined")

    # Each line goes to the room of the window it was typed in.
    tmux.type("bob", "this is about dev")
    wait_visible(tmux, "alice", r"<bob> this is about dev")
    tmux.keys("bob", "M-3")
    wait_visible(tmux, "bob", r"\[3:#ops\] 1:status 2:#dev\n\[bob\]")
    tmux.type("bob", "and this about ops")
    # alice, in #dev, sees only that #ops has news; Alt-3 shows it. Two
    # lines: bob's join there, then his line (waiting for +1 matched the join
    # alone, before the line, and failed when the line came first).
    screen = wait_visible(tmux, "alice", r"\[2:#dev\] 1:status 3:#ops\+2\n")
    assert "about ops" not in screen
    tmux.keys("alice", "M-3")
    screen = wait_visible(tmux, "alice",
                          r"<bob> and this about ops(.|\n)*\[3:#ops\] 1:status 2:#dev\n")
    assert "about dev" not in screen  # the screen is #ops's alone
    # Ctrl-P goes back to #dev, with its lines.
    tmux.keys("alice", "C-p")
    wait_visible(tmux, "alice", r"<bob> this is about dev(.|\n)*\[2:#dev\] 1:status 3:#ops\n")

    # A line naming bob in a room he is not looking at is a mention (!).
    tmux.type("alice", "bob: are you there?")
    wait_visible(tmux, "bob", r"\[3:#ops\] 1:status 2:#dev\+1!\n")
    tmux.keys("bob", "C-n")  # from the last window round to the first
    wait_visible(tmux, "bob", r"\[1:status\] 2:#dev\+1! 3:#ops\n")
    tmux.keys("bob", "C-n")
    wait_visible(tmux, "bob", r"<alice> bob: are you there\?(.|\n)*\[2:#dev\] 1:status 3:#ops\n")

    # Tab completes room names; /part closes the window.
    tmux.type("bob", "/part #o", enter=False)
    tmux.keys("bob", "Tab")
    tmux.wait_prompt("bob", "[bob] /part #ops")
    tmux.keys("bob", "Enter")
    wait_visible(tmux, "bob", r"you left #ops(.|\n)*\[2:#dev\] 1:status\n")
    wait_visible(tmux, "alice", r"\[2:#dev\] 1:status 3:#ops\+1\n")  # in #ops, not here
    tmux.keys("alice", "M-3")
    wait_visible(tmux, "alice", r"<-- bob \(127\.0\.0\.1\) left the room")
    tmux.keys("alice", "C-c")
    assert tmux.exit_status("alice") == 0


def test_a_private_room_is_unseen_by_a_third_person(broker: RunningBroker, tmux: Tmux) -> None:
    ep = f"--connect {broker.input}"
    for name in ("alice", "bob", "carol"):
        tmux.client(name, f"--name {name}", ep)
        tmux.wait_prompt(name, f"[{name}]")
    tmux.wait("alice", r"--> carol \(127\.0\.0\.1\) joined")
    tmux.type("alice", "/join -private #secret")
    wait_visible(tmux, "alice", r"you are in #secret \(private \(invite only\)\)")
    wait_visible(tmux, "alice", r"\[3:#secret\] 1:status 2:#lobby\n")
    tmux.type("alice", "/invite bob")
    wait_visible(tmux, "alice", r"invited bob to #secret")
    wait_visible(tmux, "bob", r"alice invites you to #secret: /join #secret")
    tmux.type("bob", "/join #secret")
    wait_visible(tmux, "bob", r"2 here: @alice \(127\.0\.0\.1\), bob \(127\.0\.0\.1, you\)")
    tmux.type("alice", "the plan is in the cake")
    wait_visible(tmux, "bob", r"<alice> the plan is in the cake")

    # carol: no #secret in /list, and no way in without an invitation.
    tmux.type("carol", "/list")
    screen = wait_visible(tmux, "carol", r"-!- 1 room:\n.*#lobby +3")
    tmux.type("carol", "/join #secret")
    wait_visible(tmux, "carol", r"cannot enter #secret: it is invite only, or you are banned")
    screen = tmux.screen("carol")
    assert "the plan" not in screen and "#secret" not in screen.replace("/join #secret", "") \
        .replace("cannot enter #secret", "")
    wait_visible(tmux, "carol", r"\[2:#lobby\] 1:status\n")  # no window for #secret


def test_a_kick_is_seen_by_everyone_in_the_room(broker: RunningBroker, tmux: Tmux) -> None:
    ep = f"--connect {broker.input}"
    tmux.client("alice", "--name alice", "--join '#dev'", ep)  # makes #dev: its operator
    wait_visible(tmux, "alice", r"1 here: @alice")
    for name in ("bob", "carol"):
        tmux.client(name, f"--name {name}", "--join '#dev'", ep)
        wait_visible(tmux, name, r"\[2:#dev\] 1:status\n")
    tmux.wait("alice", r"--> carol \(127\.0\.0\.1\) joined")
    # Only an operator kicks.
    tmux.type("carol", "/kick bob")
    wait_visible(tmux, "carol", r"cannot kick from #dev: only its operators may")
    tmux.type("alice", "/kick bob too noisy")
    for name in ("alice", "bob", "carol"):
        wait_visible(tmux, name, r"<-- bob \(127\.0\.0\.1\) was kicked by alice: too noisy")
    # bob's window stays, to say so; what he types there goes nowhere.
    wait_visible(tmux, "bob", r"\[2:#dev\] 1:status  \(not in #dev: /join #dev\)\n")
    tmux.type("bob", "hello?")
    wait_visible(tmux, "bob", r"you are not in #dev: /join #dev")
    # Operators: alice gives carol the op, everyone sees it.
    tmux.type("alice", "/op carol")
    for name in ("alice", "carol"):
        wait_visible(tmux, name, r"mode/#dev \[\+o carol\] by alice")
    tmux.type("carol", "/topic release on friday")
    wait_visible(tmux, "alice", r"carol changed the topic of #dev to: release on friday")
    wait_visible(tmux, "alice", r"\[2:#dev\] 1:status  #dev: release on friday\n")
    assert "hello?" not in tmux.screen("alice")
