"""The interactive ``zchat-client``: an input line at the bottom, the room above.

Why prompt_toolkit rather than a full-screen Textual UI: the terminal stays
a plain scrolling terminal, so scrollback, search, copy and paste and tmux
all work as people expect of irssi-like clients, and nothing is lost when
the program ends. ``print_formatted_text`` prints above the running prompt
(and ``patch_stdout`` catches any stray write), so incoming lines never
garble what the user is typing; input history and Tab completion are built
in. Textual would take the alternate screen, and is a large dependency for
one input line.

Why ``zchat.Client`` with an asyncio loop: the library's I/O thread hands
every item to ``Inbox.put``, which buffers until the loop runs and then
forwards with ``call_soon_threadsafe``. Rendering, the prompt and the
commands then all run on the one loop thread, so lines never interleave and
nothing needs a lock. Typing never waits for the network: typed lines go to
an ``Outbox`` (``zchat.clients.outbox``) that releases them at the broker's
pace, so a paste is never refused for speed; until the broker acks a line
it shows, dim and marked ``(pending)``, above the input line (also while
the broker is gone: the library keeps it and sends it after reconnecting).
A private message is echoed only once the broker took it. The first join
happens before the loop, in plain blocking code: a taken name is asked
again, an unreachable broker retried, and Ctrl-C there simply ends the
program.

What is shown: our own ``joined``/``left`` events are not (the connection
lines say it); after the broker lost its history (a new epoch) only the last
``--history`` messages of the new history are shown, under a header; a
private message or a line naming us rings the terminal bell; long lines
wrap with their continuation under the text. PageUp/PageDown scroll back:
in tmux through its copy mode, elsewhere in a pager (``less``) over what
this session showed.

Defines ``run_interactive``, ``Inbox`` and ``Session``.
"""

from __future__ import annotations

import asyncio
import collections
import getpass
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import ANSI
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.shortcuts import prompt

from zchat import (
    BrokerUnreachable,
    Client,
    ClientClosed,
    ClientError,
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
from zchat.display import name_colour, printable
from zchat.protocol import ROOM, ClientStatus, Invited, TopicChanged, check_name, fold_name

from .commands import (
    Clear,
    CloseWindow,
    Command,
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
    complete,
    parse_line,
)
from .commands import Window as GoWindow
from .options import EXIT_CLOSED, EXIT_HANDSHAKE, EXIT_OK, Options, on_signals
from .outbox import Outbox, Outgoing
from .render import (
    BOLD,
    DIM,
    GREEN,
    RED,
    YELLOW,
    Item,
    Line,
    SentPrivate,
    View,
    entered_line,
    help_lines,
    invited_line,
    joins_others,
    notice,
    pending_line,
    refusal,
    render,
    room_lines,
    room_refusal,
    to_ansi,
    wants_attention,
    who_line,
    wrap,
)
from .windows import Kind, Window, Windows, status_line

__all__ = ["Inbox", "Session", "run_interactive"]

FIRST_JOIN_ATTEMPT = 1.5  # seconds before saying that the broker does not answer
JOIN_ATTEMPT = 3.0  # seconds per join attempt while the broker is unreachable
CONTEXT_EVENTS = 200  # how far back to look for the last messages on joining
PENDING_SHOWN = 5  # pending lines drawn above the input line; the rest counted
SCROLLBACK = 5000  # lines kept for the pager
PUT_OUT = ("kicked", "banned", "closed")  # our own `left` reasons that keep the window


def show(lines: Iterable[Line], kept: collections.deque[str] | None = None) -> None:
    """Print lines above the prompt (or plainly when no prompt runs),
    wrapped to the terminal's width; ``kept`` collects them for scrolling back."""
    columns = shutil.get_terminal_size().columns
    painted = [to_ansi(part) for line in lines for part in wrap(line, columns)]
    if kept is not None:
        kept.extend(painted)
    if painted:
        print_formatted_text(ANSI("\n".join(painted)))


def last_messages(events: Iterable[Item], count: int, view: View, now: float) -> list[Line]:
    """``the last N messages:`` and those lines (none when there are none)."""
    said = [e for e in events if isinstance(e, Message | Notice)][-count:] if count else []
    if not said:
        return []
    heading = f"the last {len(said)} messages:" if said[1:] else "the last message:"
    return [notice(heading, now, view, GREEN), *(render(event, view, now) for event in said)]


class Inbox:
    """Carries items from the client's I/O thread to the asyncio loop.

    Items that come before the loop runs (while joining) are kept and
    handed over, in order, when ``attach`` is called.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._early: list[Item] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Item] | None = None

    def put(self, item: Item) -> None:
        with self._lock:
            if self._loop is None or self._queue is None:
                self._early.append(item)
                return
            loop, queue = self._loop, self._queue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: we are exiting

    def attach(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        with self._lock:
            for item in self._early:
                queue.put_nowait(item)
            self._early.clear()
            self._loop, self._queue = loop, queue
        return queue


class _NameCompleter(Completer):
    def __init__(self, names: Callable[[], list[str]], rooms: Callable[[], list[str]]) -> None:
        self.names = names
        self.rooms = rooms

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterable[Completion]:
        size, options = complete(document.text_before_cursor, self.names(), self.rooms())
        for option in options:
            yield Completion(option, start_position=-size, display=option.rstrip(": "))


class Session:
    """One joined chat session in the terminal, with its windows."""

    def __init__(self, options: Options, client: Client, inbox: Inbox) -> None:
        self.options = options
        self.client = client
        self.inbox = inbox
        self.view = View(client.name)
        self.online = True
        self.closed: str | None = None  # why the broker let us go, if it did
        self.quit_reason: str | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.outbox = Outbox(time.monotonic())
        if client.welcome is not None:
            self.outbox.set_limits(client.welcome.rate, client.welcome.burst)
        self._outbox_changed = asyncio.Event()
        self.kept: collections.deque[str] = collections.deque(maxlen=SCROLLBACK)
        self.windows = Windows()
        self.listed: set[str] = set()  # rooms the last /list named, for Tab
        # After a history_lost: the new history's events, up to this seq,
        # are gathered and only the last messages shown.
        self._catchup: list[Item] | None = None
        self._catchup_until = 0
        self.prompt = PromptSession[str](
            message=self._prompt_text,
            history=InMemoryHistory(),
            completer=_NameCompleter(self._names, self._rooms),
            complete_while_typing=False,
            reserve_space_for_menu=4,
            # The broker's own line shows what we said; the typed one goes.
            erase_when_done=True,
            key_bindings=self._key_bindings(),
        )

    def _key_bindings(self) -> KeyBindings:
        keys = KeyBindings()

        @keys.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            # As in a shell: Ctrl-C drops a half-typed line; on an empty
            # line it leaves.
            if event.app.current_buffer.text:
                event.app.current_buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt())

        @keys.add(Keys.BracketedPaste)
        def _paste(event: KeyPressEvent) -> None:
            # A pasted text goes out line by line, as if each line were
            # typed and entered (the rest after the last newline stays to be
            # edited): a paste never becomes one tall input taller than the
            # screen, which the terminal cannot redraw.
            data = event.data.replace("\r\n", "\n").replace("\r", "\n")
            buffer = event.app.current_buffer
            if "\n" not in data:
                buffer.insert_text(data)
                return
            text = buffer.document.text_before_cursor + data + buffer.document.text_after_cursor
            *entered, rest = text.split("\n")
            buffer.reset()
            buffer.insert_text(rest)
            for line in entered:
                if not self._enter(line):
                    event.app.exit(exception=EOFError())
                    return

        @keys.add("pageup")
        def _page_up(event: KeyPressEvent) -> None:
            self._scroll(up=True)

        @keys.add("pagedown")
        def _page_down(event: KeyPressEvent) -> None:
            self._scroll(up=False)

        # irssi's window keys: Alt-1..9 (Alt-0 is window 10), Ctrl-N, Ctrl-P.
        # They win over prompt_toolkit's own Ctrl-N/Ctrl-P (history, which
        # Up and Down still do).
        def go_to(number: int) -> Callable[[KeyPressEvent], None]:
            def go(event: KeyPressEvent) -> None:
                window = self.windows.go_number(number)
                if window is not None:
                    self._redraw()
            return go

        for digit in "1234567890":
            keys.add("escape", digit)(go_to(int(digit) or 10))

        @keys.add("c-n")
        def _next(event: KeyPressEvent) -> None:
            self.windows.step(1)
            self._redraw()

        @keys.add("c-p")
        def _previous(event: KeyPressEvent) -> None:
            self.windows.step(-1)
            self._redraw()

        return keys

    def _scroll(self, up: bool) -> None:
        pane = os.environ.get("TMUX_PANE")
        if os.environ.get("TMUX") and pane and shutil.which("tmux"):
            # tmux keeps the scrollback: its copy mode scrolls it, and -e
            # leaves copy mode again once PageDown reaches the bottom.
            if up:
                subprocess.run(["tmux", "copy-mode", "-e", "-u", "-t", pane],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=5,
                               check=False)
            return
        if not up:
            return  # the session is always at the bottom
        pager = shutil.which("less")
        if pager is None:
            self.say("scroll back with your terminal (Shift-PageUp)")
            return
        text = "\n".join(self.kept) + "\n"

        def page() -> None:
            subprocess.run([pager, "-R", "+G"], input=text.encode(), check=False)

        self._keep(asyncio.ensure_future(run_in_terminal(page, in_executor=True)))

    # ------------------------------------------------------------ windows

    def show(self, lines: Iterable[Line]) -> None:
        """Print lines on the screen now (they belong to the current window)."""
        show(lines, self.kept)

    def put(self, window: Window, lines: list[Line], mention: bool = False) -> None:
        """Keep lines in their window; print them if it is the current one."""
        if self.windows.add(window, lines, mention):
            self.show(lines)
        else:
            self._refresh_prompt()  # the status line shows the activity

    def say(self, text: str, style: str = YELLOW, window: Window | None = None) -> None:
        """One line of the client's own, in the current window (or ``window``)."""
        self.put(window or self.windows.current, [notice(text, time.time(), self.view, style)])

    def _redraw(self) -> None:
        """Show the current window: a clear screen, then its last lines."""
        window = self.windows.current
        if self.prompt.app.is_running:
            self.prompt.app.renderer.clear()
        size = shutil.get_terminal_size()
        header = notice(f"window {self.windows.number(window)}: {window.label}", time.time(),
                        self.view, DIM)
        self.show([header, *list(window.lines)[-size.lines:]])
        self._refresh_prompt()

    def _room_window(self, room: str) -> Window | None:
        """The window of a room we are (or were) in; opened for a room we are in."""
        window = self.windows.find(Kind.ROOM, room)
        if window is None and room in self.client.entered_rooms:
            window = self.windows.room(room)
        return window

    def _target(self, room: str | None = None) -> str | None:
        """The room a command is about: ``room``, else the current window's;
        None (and a line saying why) when there is none."""
        if room is not None:
            return room
        window = self.windows.current
        if window.kind == Kind.ROOM:
            return window.name
        self.say("this window is not a room: go to one (Alt-2…) or name it (#room)")
        return None

    def _names(self) -> list[str]:
        window = self.windows.current
        if window.kind == Kind.QUERY:
            return [window.name]
        state = self.client.room_state(window.name) if window.kind == Kind.ROOM else None
        if state is None:
            return []
        return [member.name for member in list(state.members)]

    def _rooms(self) -> list[str]:
        return sorted(set(self.windows.rooms) | self.listed)

    def _prompt_text(self) -> ANSI:
        colour = f"1;38;5;{name_colour(self.client.name)}"
        if self.online:
            prompt = to_ansi(((colour, f"[{printable(self.client.name)}]"), ("", " ")))
        else:
            prompt = to_ansi(((colour, f"[{printable(self.client.name)}"),
                              (YELLOW, " offline"), (colour, "]"), ("", " ")))
        # Lines typed but not yet taken by the broker, above the input line.
        pending = self.outbox.pending
        lines = [to_ansi(pending_line(p.text, p.to, self.view))
                 for p in pending[-PENDING_SHOWN:]]
        if len(pending) > PENDING_SHOWN:
            lines.insert(0, to_ansi(((DIM, f"(pending) … and {len(pending) - PENDING_SHOWN} "
                                           "more before these"),)))
        # irssi's status bar, just above the input line.
        lines.append(to_ansi(status_line(self.windows)))
        return ANSI("\n".join([*lines, prompt]))

    def _refresh_prompt(self) -> None:
        if self.prompt.app.is_running:
            self.prompt.app.invalidate()

    def _stop_prompt(self) -> None:
        if self.prompt.app.is_running and not self.prompt.app.is_done:
            self.prompt.app.exit(exception=EOFError())

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with patch_stdout(raw=True):
            await self._intro()
            items = self.inbox.attach(loop)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
            loop.set_exception_handler(self._on_loop_error)
            shower = asyncio.create_task(self._show_items(items))
            sender = asyncio.create_task(self._send_outbox())
            try:
                await self._read_input()
                if self.closed is None:
                    await self._flush_outbox()  # while the sender still runs
            finally:
                shower.cancel()
                sender.cancel()
        if self.closed is not None:
            self.client.close()
            return EXIT_CLOSED
        await asyncio.to_thread(self.client.leave, self.quit_reason)
        show([notice("you left the chat", time.time(), self.view, GREEN)])
        return EXIT_OK

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGHUP:
            # The terminal is gone: drawing anything more would fail over and
            # over. Leave the room (announced) and end at once.
            self.client.leave("terminal closed")
            os._exit(EXIT_OK)
        self.quit_reason = None
        self._stop_prompt()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop,
                       context: dict[str, Any]) -> None:
        # One notice line instead of prompt_toolkit's "press ENTER" screen.
        error = context.get("exception")
        what = f"{error.__class__.__name__}: {error}" if error else context.get("message")
        try:
            show([notice(f"internal error: {what}", time.time(), self.view, RED)])
        except Exception:  # the terminal itself failed: nothing more to say
            pass

    async def _intro(self) -> None:
        """The status window, then a window per room entered, the first current."""
        welcome = self.client.welcome
        now = time.time()
        if welcome is None:
            return
        rooms = list(self.client.entered_rooms)
        where = (f"the {printable(rooms[0])} room" if len(rooms) == 1 else
                 f"the rooms {', '.join('#' + r for r in rooms)}" if rooms else "no room")
        joined = notice(f"joined {where} at {self.client.endpoint} as {printable(welcome.name)} "
                        f"(your address: {printable(welcome.addr)})", now, self.view, GREEN)
        self.windows.add(self.windows.status, [joined])
        for refused in welcome.refused:
            self.windows.add(self.windows.status, [notice(
                room_refusal("enter", refused.room, refused.code), now, self.view, RED)])
        for room in rooms:
            window = self.windows.room(room)
            state = self.client.room_state(room)
            lines = [joined]
            if state is not None:
                window.topic = state.topic
                lines.append(entered_line(room, state.topic, {
                    "private": state.private, "moderated": state.moderated}, now, self.view))
            if self.options.history:
                lines += await self._last_messages(room, now)
            if state is not None:
                lines.append(who_line(state.members, self.view, now, ops=state.ops,
                                      count=state.count))
            lines.append(notice("type a message and press Enter; /help lists the commands",
                                now, self.view, GREEN))
            self.windows.add(window, lines)
        for window in self.windows.all:
            window.unread = 0  # the intro is not news
        shown = self.options.room or (rooms[0] if rooms else None)  # --room's first
        first = self.windows.find(Kind.ROOM, shown) if shown else None
        self.windows.go(first or self.windows.status)
        self.show(list(self.windows.current.lines))

    async def _last_messages(self, room: str, now: float) -> list[Line]:
        state = self.client.room_state(room)
        if state is None:
            return []
        after = max(0, state.last_seq - CONTEXT_EVENTS)
        try:
            recent = await asyncio.to_thread(self.client.history, after, room=room,
                                             limit=CONTEXT_EVENTS, timeout=5.0)
        except ClientError:
            return []
        return last_messages([e for e in recent if e.seq <= state.last_seq],
                             self.options.history, self.view, now)

    async def _show_items(self, items: asyncio.Queue[Item]) -> None:
        while True:
            batch = [await items.get()]
            while not items.empty():
                batch.append(items.get_nowait())
            now = time.time()
            shown: list[Line] = []
            ring = False
            for item in batch:
                for window, lines, mention in self._placed(item, now):
                    if self.windows.add(window, lines, mention):
                        shown += lines
                    ring = ring or (mention and bool(lines))
            self.show(shown)
            self._refresh_prompt()  # activity in the status line
            if ring and self.prompt.app.is_running:
                self.prompt.app.output.bell()
            if self.closed is not None:
                self._stop_prompt()  # after the line that says why

    def _placed(self, item: Item, now: float) -> list[tuple[Window, list[Line], bool]]:
        """Which windows an item's lines go to, and whether it is a mention."""
        windows = self.windows
        if isinstance(item, Status):
            if not self._note(item):
                return []
            line = [render(item, self.view, now)]
            room = windows.find(Kind.ROOM, item.room) if item.room else None
            if room is not None:
                # About one room (lost events, not entered again after a
                # reconnect): its window says it, the status window keeps it.
                if item.state == ClientStatus.REFUSED:
                    room.joined = False
                windows.status.lines.extend(line)
                return [(room, line, False)]
            # Connection changes concern every window: the one being looked
            # at says them, and the status window keeps them (as news only
            # when it is not already on the screen).
            if windows.current is windows.status:
                return [(windows.status, line, False)]
            windows.status.lines.extend(line)
            return [(windows.current, line, False)]
        if isinstance(item, Direct):
            return [(windows.query(item.sender), [render(item, self.view, now)], True)]
        if isinstance(item, SentPrivate):
            line = [render(item, self.view, now)]
            query = windows.query(item.to)
            placed = [(query, line, False)]
            if windows.current is not query:  # said here, echoed here too
                placed.append((windows.current, line, False))
            return placed
        if isinstance(item, Invited):
            line = [invited_line(item.room, item.from_, now, self.view)]
            placed = [(windows.status, line, True)]
            if windows.current is not windows.status:
                placed.append((windows.current, line, True))
            return placed
        window = self._room_window(item.room)
        if window is None:
            return []  # a room we parted: its last events are of no interest
        return [(window, self._room_lines(item, window, now), wants_attention(
            item, self.client.name))]

    def _room_lines(self, item: Item, window: Window, now: float) -> list[Line]:
        """What to show for a room event, tracking the room on the way."""
        lines: list[Line] = []
        seq = getattr(item, "seq", None)
        if self._catchup is not None and isinstance(seq, int) and window.name == ROOM:
            if seq <= self._catchup_until:
                self._catchup.append(item)
                if seq < self._catchup_until:
                    return []
            # The catch-up is complete: its last messages, then go on live.
            lines = last_messages(self._catchup, self.options.history, self.view, now)
            self._catchup = None
            if seq <= self._catchup_until:
                return lines
        if isinstance(item, TopicChanged):
            window.topic = item.text
        if isinstance(item, Joined | Left) and fold_name(item.name) == fold_name(self.client.name):
            if isinstance(item, Left) and item.reason in PUT_OUT:
                # Put out of the room: the window stays, to say so.
                window.joined = False
                return [*lines, render(item, self.view, now)]
            # Our own comings and goings (a reconnect, a broker shutdown) are
            # said by the connection lines; the room's echo of them is noise.
            return lines
        if isinstance(item, Joins) and not joins_others(item, self.client.name):
            return lines  # the same, coalesced (a big room): only we came
        return [*lines, render(item, self.view, now)]

    def _note(self, item: Status) -> bool:
        """Track the connection from a status; True if it should be shown."""
        if item.state == ClientStatus.CONNECTED:
            return False  # the intro said so
        if item.state == ClientStatus.DISCONNECTED:
            self.online = False
        elif item.state == ClientStatus.RECONNECTED:
            self.online = True
            welcome = self.client.welcome
            if welcome is not None:
                self.outbox.set_limits(welcome.rate, welcome.burst)
        elif item.state == ClientStatus.HISTORY_LOST and item.count > 0:
            self._catchup, self._catchup_until = [], item.count
        elif item.state == ClientStatus.CLOSED:
            self.closed = item.detail or "closed"
        self._refresh_prompt()
        return True

    async def _read_input(self) -> None:
        while self.closed is None:
            try:
                line = await self.prompt.prompt_async(set_exception_handler=False)
            except (EOFError, KeyboardInterrupt):
                return
            if not self._enter(line):
                return

    def _enter(self, line: str) -> bool:
        """Act on one entered line; False when it asks to quit."""
        command = parse_line(line)
        if isinstance(command, Quit):
            self.quit_reason = command.reason
            return False
        if command is not None:
            self._run_command(command)
        return True

    def _run_command(self, command: Command) -> None:
        now = time.time()
        if isinstance(command, Say):
            self._say_here(command.text)
        elif isinstance(command, Private):
            for text in _pieces(command.text):
                self.outbox.put(Outgoing(text, command.to))
        elif isinstance(command, Query):
            self.windows.go(self.windows.query(command.name))
            self._redraw()
        elif isinstance(command, Who):
            if (room := self._target()) is not None:
                self._spawn(self._who(room))
        elif isinstance(command, Help):
            self.put(self.windows.current, help_lines(self.view, now))
        elif isinstance(command, Clear):
            self.windows.current.lines.clear()
            self.prompt.app.renderer.clear()
        elif isinstance(command, Nick):
            self.say(f"a name is kept for the whole session: /quit, then join again "
                     f"with --name {printable(command.name)}")
        elif isinstance(command, GoWindow):
            self._switch(command)
        elif isinstance(command, Invalid):
            self.say(command.why)
        else:
            self._room_command(command)
        self._outbox_changed.set()
        self._refresh_prompt()

    def _say_here(self, text: str) -> None:
        """A line typed in the current window: to its room, or its person."""
        window = self.windows.current
        if window.kind == Kind.STATUS:
            self.say("this is the status window: /join #room, or go to a room's window "
                     "(Alt-2…) to talk")
            return
        if window.kind == Kind.ROOM and not window.joined:
            self.say(f"you are not in #{window.name}: /join #{window.name}")
            return
        # Pasted lines go out one message each, as typed ones would.
        for piece in _pieces(text):
            if window.kind == Kind.QUERY:
                self.outbox.put(Outgoing(piece, window.name))
            else:
                self.outbox.put(Outgoing(piece, room=window.name))

    def _switch(self, command: GoWindow) -> None:
        if command.number is not None:
            if self.windows.go_number(command.number) is None:
                self.say(f"there is no window {command.number}")
                return
        else:
            self.windows.step(command.step)
        self._redraw()

    def _room_command(self, command: Command) -> None:
        """The commands that ask the broker something about a room."""
        client = self.client
        if isinstance(command, JoinRoom):
            self._spawn(self._join_room(command.room, command.private))
            return
        if isinstance(command, ListRooms):
            self._spawn(self._list_rooms())
            return
        if isinstance(command, CloseWindow):
            window = self.windows.current
            if window.kind == Kind.ROOM and window.joined:
                self._spawn(self._part_room(window.name, None))
            else:
                self.windows.close(window)
                self._redraw()
            return
        named = command.room if isinstance(command, PartRoom | Invite) else None
        room = self._target(named)
        if room is None:
            return
        if isinstance(command, PartRoom):
            self._spawn(self._part_room(room, command.reason))
        elif isinstance(command, Topic) and command.text is None:
            topic = self.windows.room(room).topic
            self.say(f"the topic of #{room}: {printable(topic)}" if topic
                     else f"#{room} has no topic", GREEN)
        elif isinstance(command, Topic):
            text = command.text or ""
            self._ask("topic", room, lambda: client.topic(room, text))
        elif isinstance(command, Invite):
            name = command.name
            self._ask("invite", room, lambda: client.invite(room, name),
                      f"invited {printable(name)} to #{room}", name)
        elif isinstance(command, Kick):
            name, reason = command.name, command.reason
            self._ask("kick", room, lambda: client.kick(room, name, reason), name=name)
        elif isinstance(command, RoomAction):
            act = getattr(client, command.action)  # op, deop, ban, unban
            name = command.name
            self._ask(command.action, room, lambda: act(room, name), name=name)
        elif isinstance(command, Mode):
            changes = command.changes
            self._ask("mode", room, lambda: client.mode(room, **changes))

    def _ask(self, what: str, room: str, call: Callable[[], object],
             done: str | None = None, name: str | None = None) -> None:
        """Ask the broker in the background; say ``done``, or why not."""
        window = self.windows.current

        async def ask() -> None:
            try:
                await asyncio.to_thread(call)
            except RequestFailed as exc:
                self.say(room_refusal(what, room, exc.code, name), RED, window)
            except ClientError as exc:
                self.say(f"{what} #{room}: {exc}", RED, window)
            else:
                if done:
                    self.say(done, GREEN, window)

        self._spawn(ask())

    async def _join_room(self, room: str, private: bool) -> None:
        try:
            entered = await asyncio.to_thread(self.client.enter, room, private=private)
        except RequestFailed as exc:
            self.say(room_refusal("enter", room, exc.code), RED)
            return
        except ClientError as exc:
            self.say(f"could not enter #{room}: {exc}", RED)
            return
        now = time.time()
        window = self.windows.room(room)
        window.joined = True
        window.topic = entered.topic
        self.windows.go(window)
        self._redraw()
        self.put(window, [
            entered_line(room, entered.topic, {"private": entered.private,
                                               "moderated": entered.moderated}, now, self.view),
            who_line(entered.members, self.view, now, ops=entered.ops, count=entered.count),
        ])

    async def _part_room(self, room: str, reason: str | None) -> None:
        try:
            await asyncio.to_thread(self.client.part, room, reason)
        except RequestFailed as exc:
            self.say(room_refusal("part", room, exc.code), RED)
            return
        except ClientError as exc:
            self.say(f"could not leave #{room}: {exc}", RED)
            return
        window = self.windows.find(Kind.ROOM, room)
        if window is not None:
            was_current = window is self.windows.current
            self.windows.close(window)  # irssi closes a parted room's window
            if was_current:
                self._redraw()
        self.say(f"you left #{room}", GREEN)

    async def _list_rooms(self) -> None:
        window = self.windows.current
        try:
            rooms = await asyncio.to_thread(self.client.rooms)
        except ClientError as exc:
            self.say(f"/list: {exc}", RED, window)
            return
        self.listed = {info.name for info in rooms}
        self.put(window, room_lines([(r.name, r.count, r.topic, r.private) for r in rooms],
                                    self.view, time.time()))

    async def _send_outbox(self) -> None:
        """Send what the outbox releases, when it releases it."""
        while True:
            now = time.monotonic()
            for line in self.outbox.take(now):
                future: Future[Any]
                if line.to is None:
                    future = self.client.send_nowait(line.text, room=line.room)
                else:
                    future = self.client.dm_nowait(line.to, line.text)
                self._spawn(self._settle(line, future))
            wake = self.outbox.wake_at(now)
            try:
                await asyncio.wait_for(self._outbox_changed.wait(),
                                       None if wake is None else max(0.0, wake - now))
            except TimeoutError:
                pass
            self._outbox_changed.clear()

    async def _flush_outbox(self, seconds: float = 5.0) -> None:
        """Before leaving: give the lines still pending a moment to go out."""
        deadline = time.monotonic() + seconds
        while self.outbox.pending and self.closed is None and self.online \
                and time.monotonic() < deadline:
            self._outbox_changed.set()
            await asyncio.sleep(0.05)  # polling the outbox, which the sender empties
        if unsent := len(self.outbox.pending):
            self.show([notice(f"{unsent} line{'s' if unsent > 1 else ''} typed but not sent",
                              time.time(), self.view, RED)])

    def _spawn(self, coro: Any) -> None:
        self._keep(asyncio.ensure_future(coro))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, line: Outgoing, future: Future[Any]) -> None:
        """Follow one sent line to its answer."""
        try:
            await asyncio.wrap_future(future)
        except ClientClosed:
            return
        except RateLimited:
            # A broker stricter than we knew: the line waits its turn again.
            self.outbox.refused(line, time.monotonic())
        except RequestFailed as exc:
            self.outbox.failed(line)
            # Where it was typed (a refused private message opens no window).
            window = (self.windows.find(Kind.QUERY, line.to) if line.to is not None
                      else self._room_window(line.room)) or self.windows.current
            self.say(refusal(exc.code, exc.detail, line.text, line.to, line.room), RED, window)
        else:
            self.outbox.acked(line)
            if line.to is not None:  # the echo of what was delivered, and only that
                now = time.time()
                for window, lines, _ in self._placed(SentPrivate(line.to, line.text, now), now):
                    self.put(window, lines)
        self._outbox_changed.set()
        self._refresh_prompt()

    async def _who(self, room: str) -> None:
        now = time.time()
        window = self.windows.current
        state = self.client.room_state(room)
        ops = state.ops if state is not None else ()
        try:
            members = await asyncio.to_thread(self.client.who, room=room, timeout=3.0)
        except RequestFailed as exc:
            self.say(room_refusal("who", room, exc.code), RED, window)
            return
        except ClientError:
            members = list(state.members) if state is not None else []
            self.say("not connected: the last known members are", window=window)
        self.put(window, [who_line(members, self.view, now, ops=ops)])


def _pieces(text: str) -> list[str]:
    """The lines of a (pasted) text that are worth sending."""
    return [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


# ------------------------------------------------------------------- joining


def _say(line: Line) -> None:
    show([line])


def _ask_name(why: str, view: View) -> str | None:
    """Ask for a name on the terminal; None if the user gives up (Ctrl-C, Ctrl-D)."""
    _say(notice(why, time.time(), view))
    try:
        default = getpass.getuser()
    except (KeyError, OSError):
        default = ""
    try:
        return prompt(ANSI(to_ansi(((BOLD, "your name: "),))), default=default).strip() or None
    except (EOFError, KeyboardInterrupt):
        return None


def join(options: Options) -> tuple[Client, Inbox] | None:
    """Join, asking again for a taken or bad name and retrying an unreachable
    broker until it answers; None if the user gave up."""
    name = options.name
    view = View(name or "")
    unreachable_said = False
    why = "choose a name for the chat (1-32 characters, no spaces)"
    client: Client | None = None
    inbox = Inbox()
    while True:
        if not name:
            name = _ask_name(why, view)
            if not name:
                return None
        try:
            check_name(name)
        except ProtocolError as exc:
            why = f"{printable(name)!r} cannot be a name: {exc.detail}; choose another"
            name = None
            continue
        if client is None:
            inbox = Inbox()
            client = Client(options.connect, name, on_item=inbox.put, keys=options.keys,
                            rooms=options.rooms)
        try:
            # The client retries by itself; the timeout only says when to
            # tell the user that it is doing so.
            client.connect(timeout=JOIN_ATTEMPT if unreachable_said else FIRST_JOIN_ATTEMPT,
                           give_up=False)
            return client, inbox
        except HandshakeFailed:
            raise  # a key problem: retrying cannot help
        except BrokerUnreachable:
            if not unreachable_said:
                _say(notice(f"broker unreachable at {options.connect}, retrying… "
                            "(Ctrl-C to give up)", time.time(), view))
                unreachable_said = True
        except RequestFailed as exc:
            client.close()
            client = None
            if isinstance(exc, NameTaken):
                why = f"the name {printable(name)} is taken; choose another"
            else:
                why = f"the broker refused {printable(name)!r}: {printable(exc.detail)}"
            name = None
        except KeyboardInterrupt:
            client.close()
            return None


def run_interactive(options: Options) -> int:
    """Run the interactive client until the user quits; return the exit code."""
    # Until the session's loop takes them over, SIGTERM and SIGHUP end the
    # program like Ctrl-C does: with a leave if we had joined.
    on_signals(signal.default_int_handler, signal.SIGTERM, signal.SIGHUP)
    try:
        joined = join(options)
    except KeyboardInterrupt:
        return EXIT_OK
    except HandshakeFailed as exc:
        print(f"zchat-client: {exc} ({options.connect})", file=sys.stderr)
        return EXIT_HANDSHAKE
    if joined is None:
        return EXIT_OK
    client, inbox = joined
    try:
        return asyncio.run(Session(options, client, inbox).run())
    except KeyboardInterrupt:
        client.leave()
        return EXIT_OK
    except Exception as exc:  # never a traceback in someone's chat window
        client.close()
        print(f"zchat-client: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
