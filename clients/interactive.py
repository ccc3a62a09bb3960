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
nothing needs a lock. Typing never waits for the network: lines go out with
``send_nowait``/``dm_nowait`` and small tasks report refusals when the
futures settle (a line typed while disconnected is queued by the library
and sent once it has reconnected). The first join happens before the loop,
in plain blocking code: a taken name is asked again, an unreachable broker
retried, and Ctrl-C there simply ends the program.

Defines ``run_interactive``, ``Inbox`` and ``Session``.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import ANSI
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.shortcuts import prompt

from zchat import (
    BrokerUnreachable,
    Client,
    ClientClosed,
    ClientError,
    Message,
    Notice,
    ProtocolError,
    RequestFailed,
    Status,
)
from zchat.display import name_colour, printable
from zchat.protocol import check_name

from .commands import Help, Invalid, Private, Quit, Say, Who, complete, parse_line
from .render import (
    BOLD,
    GREEN,
    RED,
    YELLOW,
    Item,
    Line,
    SentPrivate,
    View,
    help_lines,
    notice,
    refusal,
    render,
    to_ansi,
    who_line,
)
from .terminal import EXIT_CLOSED, EXIT_OK, Options

__all__ = ["Inbox", "Session", "run_interactive"]

FIRST_JOIN_ATTEMPT = 1.5  # seconds before saying that the broker does not answer
JOIN_ATTEMPT = 3.0  # seconds per join attempt while the broker is unreachable
CONTEXT_EVENTS = 200  # how far back to look for the last messages on joining


def show(lines: Iterable[Line]) -> None:
    """Print lines above the prompt (or plainly when no prompt runs)."""
    text = "\n".join(to_ansi(line) for line in lines)
    if text:
        print_formatted_text(ANSI(text))


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
    def __init__(self, names: Callable[[], list[str]]) -> None:
        self.names = names

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterable[Completion]:
        size, options = complete(document.text_before_cursor, self.names())
        for option in options:
            yield Completion(option, start_position=-size, display=option.rstrip(": "))


class Session:
    """One joined chat session in the terminal."""

    def __init__(self, options: Options, client: Client, inbox: Inbox) -> None:
        self.options = options
        self.client = client
        self.inbox = inbox
        self.view = View(client.name)
        self.online = True
        self.closed: str | None = None  # why the broker let us go, if it did
        self.quit_reason: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.prompt = PromptSession[str](
            message=self._prompt_text,
            history=InMemoryHistory(),
            completer=_NameCompleter(self._names),
            complete_while_typing=False,
            reserve_space_for_menu=4,
            # The broker's own line shows what we said; the typed one goes.
            erase_when_done=True,
        )

    def _names(self) -> list[str]:
        return [member.name for member in list(self.client.members.values())]

    def _prompt_text(self) -> ANSI:
        colour = f"1;38;5;{name_colour(self.client.name)}"
        if self.online:
            return ANSI(to_ansi(((colour, f"[{printable(self.client.name)}]"), ("", " "))))
        return ANSI(to_ansi(((colour, f"[{printable(self.client.name)}"),
                             (YELLOW, " offline"), (colour, "]"), ("", " "))))

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
            try:
                await self._read_input()
            finally:
                shower.cancel()
        if self.closed is not None:
            self.client.close()
            return EXIT_CLOSED
        await asyncio.to_thread(self.client.leave, self.quit_reason)
        show([notice("you left the room", time.time(), self.view, GREEN)])
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
        welcome = self.client.welcome
        now = time.time()
        if welcome is None:
            return
        lines = [notice(f"joined the {printable(welcome.room)} room at {self.client.endpoint} "
                        f"as {printable(welcome.name)} (your address: {printable(welcome.addr)})",
                        now, self.view, GREEN)]
        if self.options.history:
            after = max(0, welcome.seq - CONTEXT_EVENTS)
            try:
                recent = await asyncio.to_thread(self.client.history, after, CONTEXT_EVENTS, 5.0)
            except ClientError:
                recent = []
            said = [e for e in recent if isinstance(e, Message | Notice) and e.seq <= welcome.seq]
            said = said[-self.options.history:]
            if said:
                heading = f"the last {len(said)} messages:" if said[1:] else "the last message:"
                lines.append(notice(heading, now, self.view, GREEN))
                lines.extend(render(event, self.view) for event in said)
        lines.append(who_line(welcome.members, self.view, now))
        lines.append(notice("type a message and press Enter; /help lists the commands",
                            now, self.view, GREEN))
        show(lines)

    async def _show_items(self, items: asyncio.Queue[Item]) -> None:
        while True:
            batch = [await items.get()]
            while not items.empty():
                batch.append(items.get_nowait())
            now = time.time()
            show([render(item, self.view, now) for item in batch if self._note(item)])
            if self.closed is not None:
                self._stop_prompt()  # after the line that says why

    def _note(self, item: Item) -> bool:
        """Track the connection from an item; True if it should be shown."""
        if not isinstance(item, Status):
            return True
        if item.state == "connected":
            return False  # the intro said so
        if item.state == "disconnected":
            self.online = False
        elif item.state == "reconnected":
            self.online = True
        elif item.state == "closed":
            self.closed = item.detail or "closed"
        self._refresh_prompt()
        return True

    async def _read_input(self) -> None:
        while self.closed is None:
            try:
                line = await self.prompt.prompt_async(set_exception_handler=False)
            except (EOFError, KeyboardInterrupt):
                return
            command = parse_line(line)
            if command is None:
                continue
            if isinstance(command, Quit):
                self.quit_reason = command.reason
                return
            self._run_command(command)

    def _run_command(self, command: Say | Private | Who | Help | Invalid) -> None:
        now = time.time()
        if isinstance(command, Say):
            # Pasted lines go out one message each, as typed ones would.
            for text in _pieces(command.text):
                self._watch(self.client.send_nowait(text), text)
                if not self.online:
                    show([notice(f"not connected: will be sent on reconnecting: "
                                 f"{printable(text)}", now, self.view)])
        elif isinstance(command, Private):
            for text in _pieces(command.text):
                # Shown at once, like IRC clients do: an answer can only come after it.
                show([render(SentPrivate(command.to, text, now), self.view)])
                self._watch(self.client.dm_nowait(command.to, text), text, command.to)
        elif isinstance(command, Who):
            self._spawn(self._who())
        elif isinstance(command, Help):
            show(help_lines(self.view, now))
        else:
            show([notice(command.why, now, self.view)])

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    def _watch(self, future: Future[Any], text: str, to: str | None = None) -> None:
        """Report a refused line as a notice when its future settles."""

        async def wait() -> None:
            try:
                await asyncio.wrap_future(future)
            except ClientClosed:
                return
            except RequestFailed as exc:
                show([notice(refusal(exc.code, exc.detail, text, to), time.time(), self.view,
                             RED)])

        self._spawn(wait())

    async def _who(self) -> None:
        now = time.time()
        try:
            members = await asyncio.to_thread(self.client.who, 3.0)
        except ClientError:
            members = list(self.client.members.values())
            show([notice("not connected: the last known members are", now, self.view)])
        show([who_line(members, self.view, now)])


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
        inbox = Inbox()
        client = Client(options.connect, name, on_item=inbox.put, keys=options.keys)
        try:
            client.connect(timeout=JOIN_ATTEMPT if unreachable_said else FIRST_JOIN_ATTEMPT)
            return client, inbox
        except BrokerUnreachable:
            if not unreachable_said:
                _say(notice(f"broker unreachable at {options.connect}, retrying… "
                            "(Ctrl-C to give up)", time.time(), view))
                unreachable_said = True
        except RequestFailed as exc:
            client.close()
            if exc.code == "name_taken":
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
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        joined = join(options)
    except KeyboardInterrupt:
        return EXIT_OK
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
