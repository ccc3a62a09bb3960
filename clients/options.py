"""What the client programs share: exit codes, ``ZCHAT_`` variables, options.

Every program in ``zchat.clients`` imports from here and nothing imports
the programs back: ``terminal`` (the ``zchat-client`` entry point) picks
``interactive`` or ``script``; those two, ``bots`` and ``demo_peer`` take
their exit codes and environment from this module.

Defines the ``EXIT_*`` codes, ``env``, ``Options``, ``build_parser`` and
``parse_options`` (``zchat-client``'s command line).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import overload

from zchat.errors import ProtocolError
from zchat.keys import ClientKeys, KeyFileError, load_client_keys
from zchat.protocol import check_room

__all__ = [
    "DEFAULT_CONNECT",
    "EXIT_CLOSED",
    "EXIT_HANDSHAKE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_UNSENT",
    "EXIT_USAGE",
    "Options",
    "build_parser",
    "env",
    "on_signals",
    "parse_options",
    "room_name",
]

EXIT_OK = 0
EXIT_TIMEOUT = 1  # --timeout passed before the lines were acked or --expect was met
EXIT_USAGE = 2  # bad option (argparse uses 2 as well)
EXIT_UNREACHABLE = 3  # no welcome from the broker in time
EXIT_REFUSED = 4  # the broker refused the join: name taken, bad name
EXIT_CLOSED = 5  # kicked by the operator or replaced by another connection
EXIT_UNSENT = 6  # a line was refused (too large, no such user) and not sent
EXIT_HANDSHAKE = 7  # a broker answered but the handshake failed: wrong server key?

DEFAULT_CONNECT = "tcp://127.0.0.1:5555"
ENV_PREFIX = "ZCHAT_"
JOIN_TIMEOUT = 10.0  # seconds to reach the broker when no --timeout says otherwise

DESCRIPTION = """\
The zchat chat client. In a terminal it is an interactive chat (an input line
at the bottom, the room above it); with stdin or stdout not a terminal, or
with --say, --expect, --stay, --json or --commands, it is scriptable: each
input line is sent as a message and events are printed one per line.
"""

EPILOG = """\
interactive commands (irssi's):
  TEXT                   say TEXT in the current window's room, or to its person
                         (//TEXT says a text that starts with /)
  /msg NAME TEXT         a private message, seen by NAME only (in NAME's window)
  /query NAME            open a window for private messages with NAME
  /join #ROOM, /j        enter a room, in a window of its own (made if new;
                         /join -private #ROOM makes it invite-only)
  /part [#ROOM] [WHY]    leave this window's room (or #ROOM)
  /list                  the rooms there are; /topic [TEXT] shows or sets this one's
  /invite NAME [#ROOM]   invite NAME here (or to #ROOM)
  /kick NAME [WHY], /ban NAME, /unban NAME, /op NAME, /deop NAME  (room operators)
  /mode +p|-p +m|-m +t|-t   private, moderated, topic by operators only
  Alt-1..9, Ctrl-N, Ctrl-P  go to window N, the next, the previous (/window N);
                         the status line above the input shows every window,
                         +N for unread lines and ! for a mention; /close closes one
  /me ACTION             an action, shown as "* you ACTION"
  /who, /names           who is here, with addresses
  /clear                 clear the screen
  /nick NAME             (a name is kept for a session: /quit, join again as NAME)
  /help                  the commands
  /quit, /exit [REASON]  leave; Ctrl-D leaves too, and Ctrl-C on an empty line
  Ctrl-C clears a half-typed line; Up/Down recall what you typed; Tab completes
  names, #rooms and commands; PageUp/PageDown scroll back (tmux's copy mode in tmux,
  else a pager). Lines wait, marked (pending), until the broker took them:
  they go out at the broker's pace, and while it is away they wait for it.

scriptable mode:
  Lines of stdin are sent in order (after any --say), each acknowledged by
  the broker before the next, paced at the broker's rate. At end of input it
  waits until its own messages were printed and for --expect, leaves, and
  exits, unless --stay. Its own joined and left lines are never printed. With
  --commands, input lines may use /msg, /me, /who, /quit and the room commands
  (/join #ROOM: the lines after it go to ROOM) as above (any other /word is a
  usage error: exit 2). SIGINT and SIGTERM leave and exit 0.
  Lines go to --room (else the first room entered). Entering rooms other than
  lobby alone (--join, --room), each printed room event says its room after
  the time (12:00:01 #dev <bob> hi); --json lines always carry "room".

environment: ZCHAT_NAME, ZCHAT_CONNECT, ZCHAT_JOIN, ZCHAT_ROOM, ZCHAT_TIMEOUT,
ZCHAT_SERVER_KEY and ZCHAT_KEY set the options of the same names; an option on
the command line wins (--join adds to ZCHAT_JOIN's rooms).

exit codes:
  0  done (or left on /quit, Ctrl-D, Ctrl-C, SIGINT, SIGTERM)
  1  --timeout passed: lines not acknowledged or --expect names not heard
  2  bad option, name or endpoint (usage); an unknown /command with --commands
  3  broker unreachable (no welcome within --timeout, default 10 s), or its
     host name does not resolve
  4  join refused: the name is taken (or invalid)
  5  disconnected for good: kicked by the operator or replaced
  6  a line was refused by the broker (too large, no such user) and not sent
  7  handshake failed: a wrong --server-key, a --key the broker does not
     accept, or no keys for a broker that encrypts
"""


def on_signals(handler: Callable[[int, FrameType | None], object] | int,
               *signals: signal.Signals) -> None:
    """Route ``signals`` (SIGTERM and SIGINT unless named) to ``handler``.

    Every client program stops on SIGTERM as on Ctrl-C: a program that is
    PID 1 in a container gets SIGTERM from ``docker stop`` and nothing else.
    ``handler`` may be ``signal.SIG_IGN`` (a leave under way must finish).
    """
    for sig in signals or (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


@overload
def env(name: str) -> str | None: ...
@overload
def env(name: str, default: str) -> str: ...
def env(name: str, default: str | None = None) -> str | None:
    """The ``ZCHAT_<name>`` variable; unset or empty means ``default``."""
    return os.environ.get(ENV_PREFIX + name) or default


@dataclass(frozen=True, slots=True)
class Options:
    """What ``zchat-client`` was asked to do."""

    name: str | None = None
    connect: str = DEFAULT_CONNECT
    interactive: bool = False
    json: bool = False
    say: list[str] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    timeout: float | None = None
    stay: bool = False
    history: int = 0
    commands: bool = False
    keys: ClientKeys | None = None  # CURVE, for a broker that encrypts
    join: tuple[str, ...] = ()  # --join: rooms to enter at start (folded, no '#')
    room: str | None = None  # --room: the room scripted lines go to

    @property
    def rooms(self) -> tuple[str, ...]:
        """The rooms to enter when joining: --join's (lobby without it), and --room's."""
        rooms = self.join or ("lobby",)
        if self.room is not None and self.room not in rooms:
            rooms += (self.room,)
        return rooms

    @property
    def join_timeout(self) -> float:
        return self.timeout if self.timeout is not None else JOIN_TIMEOUT


def room_name(text: str) -> str:
    """The room ``#Dev`` or ``dev`` names, folded as the broker folds it.

    Raises:
        ValueError: it cannot be a room name (the reason is the message).
    """
    try:
        return check_room(text.removeprefix("#"))
    except ProtocolError as exc:
        raise ValueError(exc.detail) from None


def _positive(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {raw}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zchat-client", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--name", "-n", metavar="NAME", default=env("NAME"),
                   help="your name in the room: 1-32 characters, no spaces (env ZCHAT_NAME; "
                        "asked for when missing in a terminal)")
    p.add_argument("--connect", "-c", metavar="EP",
                   default=env("CONNECT", DEFAULT_CONNECT),
                   help="the broker's (or a relay's) input endpoint; several, comma-separated, "
                        "to fail over between relays (env ZCHAT_CONNECT; default %(default)s)")
    p.add_argument("--join", "-j", metavar="ROOMS", action="append",
                   default=[env("JOIN")] if env("JOIN") else [],
                   help="enter these rooms at start, comma-separated ('#dev,#ops'; the # may "
                        "be left out; repeatable; env ZCHAT_JOIN); without it: lobby")
    p.add_argument("--history", metavar="N", type=int, default=None,
                   help="show the last N messages of the room on joining "
                        "(default 20 in a terminal, 0 in scriptable mode)")
    sec = p.add_argument_group("security (a broker started with --secret-key)")
    sec.add_argument("--server-key", metavar="FILE",
                     default=env("SERVER_KEY"),
                     help="the broker's public .key file (env ZCHAT_SERVER_KEY)")
    sec.add_argument("--key", metavar="FILE", default=env("KEY"),
                     help="your .key_secret file from zchat-keygen; the broker must list your "
                          ".key among its authorized keys (env ZCHAT_KEY)")
    script = p.add_argument_group(
        "scriptable mode (any of these but --timeout and --room selects it)")
    script.add_argument("--say", metavar="TEXT", action="append", default=[],
                        help="say TEXT after joining (repeatable, in order, before stdin)")
    script.add_argument("--expect", metavar="NAMES", action="append", default=[],
                        help="before leaving, wait until each of these users (comma-separated, "
                             "repeatable) was heard: said something in the room (recently, or "
                             "while we are here) or to us")
    script.add_argument("--timeout", metavar="SECONDS", type=_positive,
                        default=_env_timeout(),
                        help="give up (exit 1) if joining, sending and --expect take longer; "
                             "joining alone gives up after 10 s without it (env ZCHAT_TIMEOUT)")
    script.add_argument("--room", "-r", metavar="ROOM", default=env("ROOM"),
                        help="the room that said lines go to (entered if --join did not "
                             "list it; default: the first room entered; env ZCHAT_ROOM); "
                             "in a terminal, the window shown first")
    script.add_argument("--stay", action="store_true",
                        help="after the input and --expect, keep running and printing events "
                             "until SIGINT/SIGTERM")
    script.add_argument("--json", action="store_true",
                        help="print events as JSON lines (one object per line) instead of text")
    script.add_argument("--commands", action="store_true",
                        help="treat input lines starting with / as commands (/msg, /me, "
                             "/join, /part, /quit...)")
    return p


def _env_timeout() -> float | None:
    raw = env("TIMEOUT")
    if not raw:
        return None
    try:
        return _positive(raw)
    except (ValueError, argparse.ArgumentTypeError):
        print(f"zchat-client: ignoring ZCHAT_TIMEOUT={raw!r}: not a positive number",
              file=sys.stderr)
        return None


def parse_options(argv: Sequence[str] | None = None, *, tty: bool | None = None) -> Options:
    """Parse the command line; ``tty`` says whether stdin and stdout are terminals."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if tty is None:
        tty = sys.stdin.isatty() and sys.stdout.isatty()
    scripted = bool(args.say or args.expect or args.stay or args.json or args.commands)
    interactive = tty and not scripted
    if not interactive and not args.name:
        parser.error("a name is needed: --name NAME (or ZCHAT_NAME)")
    if args.history is not None and args.history < 0:
        parser.error("--history must not be negative")
    expect = [name.strip() for item in args.expect for name in item.split(",") if name.strip()]
    join: list[str] = []
    for item in args.join:
        for word in item.split(","):
            if not word.strip():
                continue
            try:
                entry = room_name(word.strip())
            except ValueError as exc:
                parser.error(f"--join: {word.strip()} cannot be a room: {exc}")
            if entry not in join:
                join.append(entry)
    room = None
    if args.room:
        try:
            room = room_name(args.room.strip())
        except ValueError as exc:
            parser.error(f"--room: {args.room} cannot be a room: {exc}")
    keys = None
    if (args.server_key is None) != (args.key is None):
        parser.error("--server-key and --key go together")
    if args.server_key is not None:
        try:
            keys = load_client_keys(args.server_key, args.key)
        except KeyFileError as exc:
            parser.error(str(exc))
    return Options(
        name=args.name,
        connect=args.connect,
        interactive=interactive,
        json=args.json,
        say=list(args.say),
        expect=expect,
        timeout=args.timeout,
        stay=args.stay,
        history=args.history if args.history is not None else (20 if interactive else 0),
        commands=args.commands,
        keys=keys,
        join=tuple(join),
        room=room,
    )
