"""The scriptable ``zchat-client``: lines in, events out, an exit code.

How a run goes:

1. Join (``--timeout`` or 10 s; exit 3 if the broker does not answer, 4 if
   the name is taken). Fetch the recent room history if ``--history`` or
   ``--expect`` needs it: names heard there count for ``--expect``, so two
   scripted clients find each other whichever started first.
2. A printer thread prints every event, one per line (text, or JSON with
   ``--json``), flushing each so a pipe reader sees it at once.
3. The main thread sends each ``--say`` text, then each line of stdin (read
   by a small thread straight from the file descriptor), one at a time: each
   waits for the broker's ack, paced by the broker's token bucket kept on
   our side (``zchat.clients.outbox.TokenBucket``), so lines go as fast as
   the broker takes them and are not refused for speed; a stricter broker's
   ``rate_limited`` is waited out. Any amount of input arrives complete and
   in order. In ``--commands`` mode an unknown ``/word`` is a usage error:
   nothing more is sent, exit 2.
4. At end of input it waits until its own messages came back from the room
   and were printed, and until every ``--expect`` name was heard, then
   leaves and exits 0, or with ``--stay`` keeps printing until SIGINT or
   SIGTERM (which leave and exit 0 at any time).

Rooms: the client enters ``Options.rooms`` (``--join``'s, lobby without
it, and ``--room``'s) when it joins; said lines go to ``--room`` (else the
first room entered), and ``/join #room`` in ``--commands`` mode moves them
there. When more than lobby alone is in play, each printed room event says
its room (``12:00:01 #dev <bob> hi``); ``--json`` lines always carry it.

What is printed is the same in every run: every room event and private
message, but never our own ``joined`` or ``left`` lines (whether our leave
came back before we closed would be a race; the connection is ours to know),
and always the echo of each of our own messages.

Exit codes are the ``EXIT_*`` of ``zchat.clients.terminal``; errors are one
line on stderr, never a traceback.

Defines ``run_script`` and the ``Script`` run it drives.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType
from typing import Any, TextIO

from zchat import (
    BrokerUnreachable,
    Client,
    ClientClosed,
    Direct,
    HandshakeFailed,
    Joined,
    Joins,
    Left,
    Message,
    NameTaken,
    Notice,
    ProtocolError,
    RateLimited,
    RequestFailed,
    Status,
)
from zchat.protocol import ROOM, ClientStatus, check_name, fold_name

from .commands import (
    Clear,
    CloseWindow,
    Help,
    Invalid,
    Invite,
    JoinRoom,
    Kick,
    ListRooms,
    Mode,
    Nick,
    PartRoom,
    Private,
    Query,
    Quit,
    RoomAction,
    Say,
    Topic,
    Who,
    Window,
    parse_line,
)
from .options import (
    EXIT_CLOSED,
    EXIT_HANDSHAKE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_UNSENT,
    EXIT_USAGE,
    Options,
    on_signals,
)
from .outbox import DEFAULT_BURST, DEFAULT_RATE, MARGIN, TokenBucket
from .render import (
    Item,
    SentPrivate,
    View,
    in_room,
    item_json,
    joins_others,
    render,
    room_refusal,
    to_plain,
    who_line,
)

__all__ = ["Script", "run_script"]

CONTEXT_EVENTS = 100  # how far back "recently heard" and --history look
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # backoff after rate_limited (a stricter broker)
ECHO_WAIT = 5.0  # at most, for our own messages to come back before leaving


class Stop(BaseException):
    """SIGTERM or SIGHUP: leave and exit 0 (a BaseException, like KeyboardInterrupt)."""


class Failed(Exception):
    """The run cannot go on; ``code`` is the exit code, the message its reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


class Script:
    """One scripted session on a joined ``client``."""

    def __init__(self, options: Options, client: Client, out: TextIO, err: TextIO,
                 deadline: float | None) -> None:
        self.options = options
        self.client = client
        self.out = out
        self.err = err
        self.me = client.name
        self.view = View(client.name, clock="%H:%M:%S")
        self.deadline = deadline  # time.monotonic() when --timeout runs out
        self.unsent = 0
        self.leave_reason: str | None = None
        self._heard: set[str] = set()
        self._closed: str | None = None  # why the broker closed us, once it did
        # Per room: the highest seq of our own acked messages, and printed.
        self._sent_seq: dict[str, int] = {}
        self._printed_seq: dict[str, int] = {}
        entered = client.entered_rooms
        # Where said lines go: --room, else the first room entered.
        self.room = options.room or (entered[0] if entered else ROOM)
        # With rooms other than lobby alone, each room event says its room.
        self.rooms_shown = options.rooms != (ROOM,)
        welcome = client.welcome
        self._bucket = TokenBucket(
            (welcome.rate if welcome and welcome.rate is not None else DEFAULT_RATE) * MARGIN,
            welcome.burst if welcome and welcome.burst is not None else DEFAULT_BURST,
            time.monotonic())
        self._changed = threading.Condition()
        self._print_lock = threading.Lock()
        self._out_broken = False
        self._printer = threading.Thread(target=self._print_events, name="zchat-printer",
                                         daemon=True)

    # ------------------------------------------------------------ output

    def show(self, item: Item) -> None:
        if self.options.json:
            text = json.dumps(item_json(item, self.me), ensure_ascii=False)
        else:
            line = render(item, self.view)
            room = getattr(item, "room", None)
            if self.rooms_shown and isinstance(room, str):
                line = in_room(line, room)
            text = to_plain(line)
        self.write(text)

    def write(self, text: str) -> None:
        with self._print_lock:
            if self._out_broken:
                return
            try:
                self.out.write(text + "\n")
                self.out.flush()
            except (BrokenPipeError, ValueError):
                # The reader went away (`| head -1`): keep chatting, stop printing.
                self._out_broken = True

    def warn(self, text: str) -> None:
        print(f"zchat-client: {text}", file=self.err, flush=True)

    def _note(self, item: Item) -> None:
        with self._changed:
            if isinstance(item, Message | Direct):
                self._heard.add(fold_name(item.sender))
            elif isinstance(item, Status) and item.state == ClientStatus.CLOSED:
                self._closed = item.detail or "closed"
            self._changed.notify_all()

    def _mine(self, item: Item) -> bool:
        """Our own joined or left event: never printed (see the module doc)."""
        if isinstance(item, Joins):
            return not joins_others(item, self.me)  # only us: as our own `joined`
        return isinstance(item, Joined | Left) and fold_name(item.name) == fold_name(self.me)

    def _print_events(self) -> None:
        for item in self.client.events():
            self._note(item)
            if not self._mine(item):
                self.show(item)
            seq = getattr(item, "seq", None)
            room = getattr(item, "room", None)
            if isinstance(seq, int) and isinstance(room, str):
                with self._changed:
                    self._printed_seq[room] = max(self._printed_seq.get(room, 0), seq)
                    self._changed.notify_all()
        with self._changed:
            self._closed = self._closed or "closed"
            self._changed.notify_all()

    # ------------------------------------------------------------ the run

    def start(self) -> None:
        """Show the connection, the context the options ask for, then go live."""
        first = self.client.next_event(timeout=0)
        if first is not None:
            self._note(first)
            self.show(first)
        if self.options.history or self.options.expect:
            for room in self.client.entered_rooms:
                self._recent(room)
        self._printer.start()

    def _recent(self, room: str) -> None:
        """The room's recent history: names heard there, and --history's lines."""
        state = self.client.room_state(room)
        if state is None:
            return
        after = max(0, state.last_seq - CONTEXT_EVENTS)
        recent = [e for e in self.client.history(after, room=room, limit=CONTEXT_EVENTS,
                                                 timeout=self._left(10.0))
                  if e.seq <= state.last_seq]
        for event in recent:
            if isinstance(event, Message):
                self._note(event)
        said = [e for e in recent if isinstance(e, Message | Notice)]
        for event in said[-self.options.history:] if self.options.history else []:
            self.show(event)

    def run(self, read_stdin: bool) -> int:
        for text in self.options.say:
            if not self.submit(text, literal=True):
                return EXIT_OK
        if read_stdin:
            lines = _read_lines(sys.stdin.fileno())
            while (line := self._next_line(lines)) is not None:
                if not self.submit(line, literal=not self.options.commands):
                    return EXIT_OK
        self.wait_echoed()
        self.wait_heard(self.options.expect)
        if self.options.stay:
            self.wait_closed()
        return EXIT_UNSENT if self.unsent else EXIT_OK

    def finish(self) -> None:
        """Leave (announced to the room) and print what is still queued."""
        self.client.leave(self.leave_reason)
        if self._printer.is_alive():
            self._printer.join(5.0)

    # ----------------------------------------------------------- helpers

    def _left(self, default: float | None = None) -> float | None:
        """Seconds left before --timeout (``default`` without one)."""
        if self.deadline is None:
            return default
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Failed(EXIT_TIMEOUT, f"timeout after {self.options.timeout:g} s")
        return left

    def _check_closed(self) -> None:
        if self._closed is not None:
            raise Failed(EXIT_CLOSED, f"disconnected: {self._closed}")

    def _next_line(self, lines: queue.Queue[str | None]) -> str | None:
        while True:
            self._check_closed()
            wait = self._left(0.5)
            try:
                return lines.get(timeout=min(0.5, wait if wait is not None else 0.5))
            except queue.Empty:
                continue

    def submit(self, line: str, literal: bool) -> bool:
        """Send one input line; False when it asked to quit."""
        command = parse_line(line) if not literal else (Say(line) if line.strip() else None)
        if command is None:
            return True
        if isinstance(command, Say):
            room = self.room
            seq = self._deliver(lambda: self.client.send_nowait(command.text, room=room),
                                command.text)
            if isinstance(seq, int):
                self._sent_seq[room] = max(self._sent_seq.get(room, 0), seq)
        elif isinstance(command, Private):
            if self._deliver(lambda: self.client.dm_nowait(command.to, command.text),
                             command.text) is not False:
                self.show(SentPrivate(command.to, command.text, time.time()))
        elif isinstance(command, Who):
            members = self.client.who(room=self.room, timeout=self._left())
            self.write(to_plain(who_line(members, self.view, time.time())))
        elif isinstance(command, JoinRoom | PartRoom | Topic | Invite | Kick | RoomAction
                        | Mode):
            self._room_command(command)
        elif isinstance(command, Quit):
            self.leave_reason = command.reason
            return False
        elif isinstance(command, Help):
            self.warn("in scriptable mode: /msg NAME TEXT, /me ACTION, /who, /join #ROOM "
                      "(lines then go there), /part, /topic, /invite, /kick, /ban, /unban, "
                      "/op, /deop, /mode, /quit [REASON]")
        elif isinstance(command, Clear):
            pass  # there is no screen to clear
        elif isinstance(command, Nick):
            raise Failed(EXIT_USAGE, "/nick: a name is kept for the whole session "
                                     "(use --name)")
        elif isinstance(command, Invalid | ListRooms | Query | Window | CloseWindow):
            why = command.why if isinstance(command, Invalid) else \
                f"{line.split()[0]} is for the interactive client"
            # A script with a command we do not know is a wrong script:
            # stop before sending anything that was meant to come after it.
            raise Failed(EXIT_USAGE, f"{why}; stopped at {line[:60]!r}")
        return True

    def _room_command(self, command: JoinRoom | PartRoom | Topic | Invite | Kick | RoomAction
                      | Mode) -> None:
        """A room command in --commands mode: /join makes its room the one
        lines go to, as a window would; a refusal is a line on stderr."""
        client, timeout = self.client, self._left()
        room = self.room
        try:
            if isinstance(command, JoinRoom):
                client.enter(command.room, private=command.private, timeout=timeout)
                self.room = command.room
                self.rooms_shown = True
            elif isinstance(command, PartRoom):
                parted = command.room or room
                self.wait_echoed()  # what we said there is printed before we go
                client.part(parted, command.reason, timeout=timeout)
                if parted == self.room:  # lines go back to the first room we are in
                    self.room = next(iter(client.entered_rooms), ROOM)
            elif isinstance(command, Topic):
                client.topic(room, command.text or "")
            elif isinstance(command, Invite):
                client.invite(command.room or room, command.name)
            elif isinstance(command, Kick):
                client.kick(room, command.name, command.reason)
            elif isinstance(command, RoomAction):
                getattr(client, command.action)(room, command.name)
            else:
                client.mode(room, **command.changes)
        except RequestFailed as exc:
            self.unsent += 1
            self.warn(room_refusal(type(command).__name__.lower(), room, exc.code))

    def _deliver(self, send: Callable[[], Future[Any]], text: str) -> Any:
        """Send until acked, at the broker's pace; the ack's result (a seq for
        a message, None for a dm), or False if refused."""
        backoff = RETRY_MIN
        while True:
            self._check_closed()
            while not self._bucket.take(now := time.monotonic()):
                time.sleep(self._bucket.ready_at(now) - now)  # the broker's pace, not a guess
            future = send()
            try:
                return future.result(self._left())
            except FutureTimeout:
                raise Failed(EXIT_TIMEOUT, f"timeout after {self.options.timeout:g} s: "
                                           "a line was not acknowledged") from None
            except RateLimited:
                # A broker stricter than we knew: it refills our bucket over time.
                self._bucket.empty(time.monotonic())
                time.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX)
            except ClientClosed as exc:
                raise Failed(EXIT_CLOSED, f"disconnected: {self._closed or exc}") from None
            except RequestFailed as exc:
                self.unsent += 1
                self.warn(f"not sent ({exc.code}: {exc.detail}): {text[:60]!r}")
                return False

    def wait_echoed(self) -> None:
        """Until our own messages came back from the room and were printed,
        so that every run prints them (a leave may otherwise cut them off)."""
        deadline = time.monotonic() + ECHO_WAIT
        if self.deadline is not None:
            deadline = min(deadline, self.deadline)
        with self._changed:
            while self._closed is None and any(
                    self._printed_seq.get(room, 0) < seq for room, seq in self._sent_seq.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return  # not worth failing for: they were delivered
                self._changed.wait(left)

    def wait_heard(self, names: list[str]) -> None:
        """Wait until each name said something (or --timeout)."""
        wanted = {fold_name(name): name for name in names}
        with self._changed:
            while missing := [n for key, n in wanted.items() if key not in self._heard]:
                self._check_closed()
                try:
                    wait = self._left(None)
                except Failed:
                    raise Failed(EXIT_TIMEOUT, f"timeout after {self.options.timeout:g} s: "
                                               f"did not hear from {', '.join(missing)}") from None
                self._changed.wait(wait)

    def wait_closed(self) -> None:
        """--stay: until a signal, or until the broker closes us."""
        with self._changed:
            while self._closed is None:
                self._changed.wait()
        self._check_closed()


def _read_lines(fd: int) -> queue.Queue[str | None]:
    """Lines of ``fd`` as they come, then None; read by a daemon thread.

    ``os.read`` rather than ``sys.stdin``: a thread blocked inside a buffered
    file would hold its lock while the interpreter shuts down.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            pending += decoder.decode(chunk, final=not chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                lines.put(line.removesuffix("\r"))
            if not chunk:
                if pending:
                    lines.put(pending)
                lines.put(None)
                return

    threading.Thread(target=pump, name="zchat-stdin", daemon=True).start()
    return lines


def run_script(options: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the scriptable client; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    name = options.name or ""

    def fail(code: int, reason: str) -> int:
        print(f"zchat-client: {reason}", file=err, flush=True)
        return code

    try:
        check_name(name)
    except ProtocolError as exc:
        return fail(EXIT_USAGE, f"bad name {name!r}: {exc.detail}")
    # --timeout counts from the start: joining is part of the run.
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    on_signals(_raise_stop, signal.SIGTERM, signal.SIGHUP)
    client = Client(options.connect, name, keys=options.keys, rooms=options.rooms)
    script: Script | None = None
    try:
        try:
            client.connect(timeout=options.join_timeout)
        except HandshakeFailed as exc:
            return fail(EXIT_HANDSHAKE, f"{exc} ({options.connect})")
        except BrokerUnreachable:
            return fail(EXIT_UNREACHABLE, f"broker unreachable at {options.connect} "
                                          f"(no answer within {options.join_timeout:g} s)")
        except RequestFailed as exc:
            reason = f"name {name!r} is taken" if isinstance(exc, NameTaken) else exc.detail
            return fail(EXIT_REFUSED, f"join refused: {reason}")
        script = Script(options, client, out, err, deadline)
        script.start()
        read_stdin = not (sys.stdin.isatty() and (options.say or options.expect or options.stay))
        return script.run(read_stdin)
    except Failed as exc:
        return fail(exc.code, str(exc))
    except BrokerUnreachable as exc:
        return fail(EXIT_TIMEOUT, f"timeout: {exc}")
    except ClientClosed as exc:
        return fail(EXIT_CLOSED, f"disconnected: {exc}")
    except (KeyboardInterrupt, Stop):
        return EXIT_OK
    finally:
        # A second signal while leaving must not cut the leave short.
        on_signals(signal.SIG_IGN, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
        if script is not None:
            script.finish()
        else:
            client.close()
