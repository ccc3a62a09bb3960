"""Small chat bots on the zchat library, for the demos and as examples.

Each bot is a pure object: ``on_item(item, now) -> list[Reply]`` says what to
answer and never touches a socket, so its behaviour is unit-tested without a
broker. ``run_bot`` is the thin shell: it joins (retrying until the broker is
there), feeds the bot every event of a ``zchat.Client`` and sends its
replies with ``send_nowait``/``dm_nowait`` so that a slow broker never stalls
the bot. The command line runs one or more bots in one process::

    python -m zchat.clients.bots greeter helper --connect tcp://127.0.0.1:5555

Bots live in several rooms at once: ``--join '#dev,#ops'`` (or
``ZCHAT_JOIN``) names the rooms they enter (lobby without it), every reply
goes to the room its question came from, and a bot invited to a room
(``/invite helper`` in a private room) enters it.

Bots:

``greeter``
    welcomes each newcomer by name (at most once per name every ten
    minutes, so a broker restart, where everyone rejoins, is not a flood)
    and says hello back to whoever greets it by name.
``helper``
    answers ``!help``, ``!time``, ``!echo TEXT``, ``!roll [SIDES]`` and
    ``!who`` said in the room (answering in the room) or in private
    (answering in private).

Defines ``Reply``, ``Greeter``, ``Helper``, ``BOTS``, ``run_bot`` and ``main``.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from zchat import (
    BrokerUnreachable,
    Client,
    ClientClosed,
    ClientError,
    Direct,
    Event,
    HandshakeFailed,
    Joined,
    Message,
    RequestFailed,
    Status,
)
from zchat.display import printable
from zchat.keys import ClientKeys, KeyFileError, keys_from_env
from zchat.protocol import ROOM, ClientStatus, Invited, fold_name

from .options import (
    DEFAULT_CONNECT,
    EXIT_CLOSED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    env,
    on_signals,
    room_name,
)

__all__ = ["BOTS", "Greeter", "Helper", "Reply", "main", "run_bot"]


GREET_AGAIN_AFTER = 600.0  # seconds before the same name is welcomed again
JOIN_ATTEMPT = 5.0  # seconds per join attempt while waiting for the broker
ENTER_WAIT = 5.0  # seconds an invited bot waits to enter (its loop waits as long)


@dataclass(frozen=True, slots=True)
class Reply:
    """Something a bot wants said: in the room, or privately ``to`` someone."""

    text: str
    to: str | None = None
    room: str = ROOM


class Bot(Protocol):
    name: str
    members: Callable[[str], list[str]]

    def on_item(self, item: Event | Direct | Status, now: float) -> list[Reply]: ...


@dataclass
class Greeter:
    """Welcomes newcomers; answers a hello that names it."""

    name: str = "greeter"
    # who is in a room, named in the welcome
    members: Callable[[str], list[str]] = field(default=lambda room: [])
    # (room, folded name) -> when: each room welcomes its own newcomers
    greeted: dict[tuple[str, str], float] = field(default_factory=dict)

    def on_item(self, item: Event | Direct | Status, now: float) -> list[Reply]:
        if isinstance(item, Joined):
            key = fold_name(item.name)
            if key == fold_name(self.name):
                return []
            last = self.greeted.get((item.room, key))
            self.greeted[item.room, key] = now
            if last is not None and now - last < GREET_AGAIN_AFTER:
                return []
            others = sorted((n for n in self.members(item.room) if fold_name(n) != key),
                            key=str.casefold)
            here = f" here now: {', '.join(others)}" if others else " you are the first here"
            return [Reply(f"welcome, {item.name}!{here}", room=item.room)]
        if isinstance(item, Message) and fold_name(item.sender) != fold_name(self.name):
            words = re.findall(r"[\w'-]+", item.text.casefold())
            if self.name.casefold() in words and words[0] in ("hi", "hello", "hey", "hallo"):
                return [Reply(f"hello, {item.sender}!", room=item.room)]
        return []


@dataclass
class Helper:
    """Answers ``!`` commands in the room or in private."""

    name: str = "helper"
    members: Callable[[str], list[str]] = field(default=lambda room: [])  # for !who
    roll: Callable[[int], int] = field(default=lambda sides: random.randint(1, sides))
    clock: Callable[[float], str] = field(
        default=lambda now: time.strftime("%H:%M:%S %Z, %A %d %B %Y", time.localtime(now))
    )

    def on_item(self, item: Event | Direct | Status, now: float) -> list[Reply]:
        if isinstance(item, Message) and fold_name(item.sender) != fold_name(self.name):
            answer = self.answer(item.text, item.sender, now, item.room)
            return [Reply(answer, room=item.room)] if answer else []
        if isinstance(item, Direct) and fold_name(item.sender) != fold_name(self.name):
            answer = self.answer(item.text, item.sender, now)
            if answer is None and not item.text.startswith("!"):
                answer = "I am a bot; try !help"
            return [Reply(answer, to=item.sender)] if answer else []
        return []

    def answer(self, text: str, sender: str, now: float, room: str = ROOM) -> str | None:
        """The answer to one command line, or None if it is not for us
        (``room``: where it was asked, for !who)."""
        command, _, rest = text.strip().partition(" ")
        command = command.casefold()
        rest = rest.strip()
        if command == "!help":
            return "I answer !time, !echo TEXT, !roll [SIDES] and !who (in private too)"
        if command == "!time":
            return f"it is {self.clock(now)}"
        if command == "!echo":
            return rest or "echo what? (!echo TEXT)"
        if command == "!roll":
            sides = int(rest) if rest.isdigit() and 2 <= int(rest) <= 1_000_000 else 6
            return f"{sender} rolls {self.roll(sides)} (1-{sides})"
        if command == "!who":
            names = sorted(self.members(room), key=str.casefold)
            return f"{len(names)} here: {', '.join(names)}"
        return None


BOTS: dict[str, Callable[[str], Any]] = {
    "greeter": lambda name: Greeter(name),
    "helper": lambda name: Helper(name),
}


# --------------------------------------------------------------------- shell


def _say(line: str) -> None:
    print(line, flush=True)


def join_until(endpoint: str, name: str, stop: threading.Event,
               give_up: float | None, keys: ClientKeys | None = None,
               rooms: Sequence[str] = (ROOM,)) -> Client | None:
    """Join, waiting while the broker is unreachable; None if stopped.

    The client retries by itself (``give_up=False``); each wait is short
    only so that ``stop`` is seen.
    """
    deadline = None if give_up is None else time.monotonic() + give_up
    waiting_said = False
    client = Client(endpoint, name, keys=keys, rooms=tuple(rooms))
    while not stop.is_set():
        attempt = JOIN_ATTEMPT if deadline is None else max(
            0.1, min(JOIN_ATTEMPT, deadline - time.monotonic()))
        try:
            client.connect(timeout=attempt, give_up=False)
            return client
        except HandshakeFailed:
            raise  # a key problem: waiting cannot help (the client closed itself)
        except BrokerUnreachable:
            if deadline is not None and time.monotonic() >= deadline:
                client.close()
                raise
            if not waiting_said:
                _say(f"{name}: waiting for the broker at {endpoint}…")
                waiting_said = True
    client.close()
    return None


def run_bot(bot: Bot, client: Client, stop: threading.Event) -> int:
    """Feed ``bot`` the client's events and send its replies until stopped."""
    rooms = ", ".join("#" + room for room in client.entered_rooms)
    _say(f"{bot.name}: joined {client.endpoint} as {client.name} in {rooms}")
    welcome = client.welcome
    for refused in welcome.refused if welcome is not None else ():
        _say(f"{bot.name}: could not enter #{refused.room}: {refused.code}")

    def members(room: str) -> list[str]:
        # The library keeps each room's members up to date from its events.
        state = client.room_state(room)
        return [m.name for m in list(state.members)] if state is not None else []

    bot.members = members

    def report(what: str) -> Callable[[Future[Any]], None]:
        def done(fut: Future[Any]) -> None:
            exc = fut.exception()
            if isinstance(exc, RequestFailed):
                _say(f"{bot.name}: could not send {what}: {exc}")
        return done

    while not stop.is_set():
        item = client.next_event(timeout=0.5)
        if item is None:
            continue
        if isinstance(item, Status):
            if item.state == ClientStatus.CONNECTED:
                continue  # said above
            _say(f"{bot.name}: {item.state}{': ' + item.detail if item.detail else ''}")
            if item.state == ClientStatus.CLOSED:
                return EXIT_CLOSED
            continue
        if isinstance(item, Invited):
            # Invited to a room (a private one, say): a bot goes where it is asked.
            _say(f"{bot.name}: {item.from_} invites us to #{item.room}")
            try:
                client.enter(item.room, timeout=ENTER_WAIT)
            except ClientError as exc:
                _say(f"{bot.name}: could not enter #{item.room}: {exc}")
            continue
        for reply in bot.on_item(item, time.time()):
            try:
                if reply.to is None:
                    fut: Future[Any] = client.send_nowait(reply.text, room=reply.room)
                else:
                    fut = client.dm_nowait(reply.to, reply.text)
            except ClientClosed:
                return EXIT_CLOSED
            fut.add_done_callback(report(printable(reply.text)[:40]))
    client.leave("bot stopped")
    _say(f"{bot.name}: left")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zchat.clients.bots",
        description="Run small zchat bots: 'greeter' welcomes newcomers, 'helper' answers "
                    "!help, !time, !echo, !roll and !who. Several bots run in one process.",
        epilog="Exit codes: 0 stopped by SIGINT/SIGTERM, 2 usage, 3 broker unreachable "
               "(only with --give-up), 4 join refused (name taken or bad), 5 kicked or "
               "replaced.",
    )
    p.add_argument("bots", nargs="+", choices=sorted(BOTS), metavar="BOT",
                   help=f"which bots to run: {', '.join(sorted(BOTS))}")
    p.add_argument("--connect", metavar="EP",
                   default=env("CONNECT", DEFAULT_CONNECT),
                   help="the broker's input endpoint (env ZCHAT_CONNECT; default %(default)s)")
    p.add_argument("--name", metavar="NAME", action="append", default=[],
                   help="name of each bot, in order (default: the bot's kind)")
    p.add_argument("--join", metavar="ROOMS", action="append",
                   default=[env("JOIN")] if env("JOIN") else [],
                   help="rooms every bot enters, comma-separated ('#dev,#ops'; repeatable; "
                        "env ZCHAT_JOIN; default: lobby)")
    p.add_argument("--give-up", metavar="SECONDS", type=float, default=None,
                   help="exit 3 if the broker cannot be reached within this time "
                        "(default: keep waiting)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.name) > len(args.bots):
        print("bots: more --name options than bots", file=sys.stderr)
        return EXIT_USAGE
    names = args.name + args.bots[len(args.name):]
    rooms: list[str] = []
    for word in (w.strip() for item in args.join for w in item.split(",")):
        if not word:
            continue
        try:
            room = room_name(word)
        except ValueError as exc:
            print(f"bots: --join: {word} cannot be a room: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if room not in rooms:
            rooms.append(room)
    try:
        keys = keys_from_env()  # CURVE, when ZCHAT_SERVER_KEY and ZCHAT_KEY are set
    except KeyFileError as exc:
        print(f"bots: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    results: list[int] = []

    def one(kind: str, name: str) -> None:
        try:
            client = join_until(args.connect, name, stop, args.give_up, keys,
                                rooms or (ROOM,))
        except BrokerUnreachable:
            print(f"bots: {name}: broker unreachable at {args.connect}", file=sys.stderr)
            results.append(EXIT_UNREACHABLE)
            stop.set()
            return
        except RequestFailed as exc:
            print(f"bots: {name}: join refused: {exc}", file=sys.stderr)
            results.append(EXIT_REFUSED)
            stop.set()
            return
        if client is not None:
            results.append(run_bot(BOTS[kind](name), client, stop))

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    on_signals(on_signal)
    threads = [threading.Thread(target=one, args=(kind, name), name=f"bot-{name}")
               for kind, name in zip(args.bots, names, strict=True)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        # A bounded wait keeps the main thread responsive to signals.
        for thread in threads:
            thread.join(0.2)
    return max(results, default=EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
