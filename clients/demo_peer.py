"""A scripted chat peer for the Docker demo: a ball passed round a ring of peers.

Each peer of the docker-compose demo runs in its own container and is told
the ring, e.g. ``alice,bob,dave``, and the rooms, e.g. ``lobby,+backstage``.
Once every peer of the ring is in every room, the first one says
``@bob 1/9 ...``; whoever is named takes the ball and, after ``--pace``
seconds, passes it on to the next (``@dave 2/9 ...``), round and round until
the last hop. The ball crosses rooms: hop N is said in the N-th room of the
list, round robin (hop 1 in lobby, hop 2 in backstage, hop 3 in lobby...).

A room written ``+name`` is private (invite only): the first peer of the
ring creates it as such, and invites each ring peer it sees in the first
public room; the others enter it when invited. So the demo shows a private
room across containers, which nobody outside the ring (the bots) can see.

A hop is only taken when the message naming its taker has crossed the
broker, so a finished ring proves that every
peer's messages reached the others. Every peer then leaves and exits 0; a
peer that has not seen the ring finish within ``--timeout`` leaves and exits
1, naming the peers it never heard from. SIGTERM or SIGINT (``docker compose
down``, Ctrl-C) make it leave at once, announced in the room.

The rules of the game are ``Relay``, a pure object fed with room events
(easy to test); ``run`` is the shell around ``zchat.Client``. Settings come
from the command line or from ``ZCHAT_*`` environment variables::

    ZCHAT_CONNECT=tcp://broker:5555 ZCHAT_NAME=alice ZCHAT_RING=alice,bob,dave \\
        ZCHAT_ROOMS=lobby,+backstage python -m zchat.clients.demo_peer

Defines ``Relay``, ``Pass`` (a hop to say), ``parse_rooms``, ``run`` and ``main``.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from zchat import BrokerUnreachable, Client, ClientError, Joined, Left, Message, Status
from zchat.display import printable
from zchat.keys import ClientKeys, KeyFileError, keys_from_env
from zchat.protocol import ROOM, ClientStatus, Invited, fold_name

from .options import (
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    env,
    on_signals,
    room_name,
)

__all__ = ["Pass", "Relay", "main", "parse_rooms", "run"]

EXIT_INCOMPLETE = EXIT_TIMEOUT  # timed out before the ball came round, or was kicked

POLL_SECONDS = 0.25  # how often the main thread looks at its deadlines and signals
HOP = re.compile(r"^@(?P<taker>\S+) (?P<hop>\d+)/(?P<total>\d+)\b")


@dataclass(frozen=True, slots=True)
class Pass:
    """A hop this peer must say: ``@taker hop/total``, in ``room``."""

    taker: str
    hop: int
    total: int
    room: str = ROOM

    def text(self, sender: str, addr: str) -> str:
        return f"@{self.taker} {self.hop}/{self.total} catch! ({sender} at {addr})"


@dataclass
class Relay:
    """The ring game as seen by one peer; feed it room events, it says what to pass.

    Names compare case-insensitively, as the broker does.
    """

    name: str
    ring: list[str]
    rounds: int = 3
    rooms: list[str] = field(default_factory=lambda: [ROOM])  # hop N goes in rooms[N-1 % len]
    present: dict[str, set[str]] = field(default_factory=dict)  # room -> folded names
    heard: set[str] = field(default_factory=set)
    last_hop: int = 0
    started: bool = False

    def __post_init__(self) -> None:
        keys = [fold_name(peer) for peer in self.ring]
        if fold_name(self.name) not in keys:
            raise ValueError(f"{self.name} is not in the ring {','.join(self.ring)}")
        if len(set(keys)) != len(keys) or len(keys) < 2:
            raise ValueError("the ring needs two or more distinct names")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        if not self.rooms or len(set(self.rooms)) != len(self.rooms):
            raise ValueError("the rooms must be one or more distinct names")
        for room in self.rooms:
            self.present.setdefault(room, set()).add(fold_name(self.name))

    @property
    def total(self) -> int:
        return self.rounds * len(self.ring)

    @property
    def others(self) -> list[str]:
        return [peer for peer in self.ring if fold_name(peer) != fold_name(self.name)]

    @property
    def missing(self) -> list[str]:
        """Ring peers not in every room (yet)."""
        return [peer for peer in self.ring
                if any(fold_name(peer) not in self.present.get(room, set())
                       for room in self.rooms)]

    def room_of(self, hop: int) -> str:
        """The room hop number ``hop`` (from 1) is said in."""
        return self.rooms[(hop - 1) % len(self.rooms)]

    @property
    def unheard(self) -> list[str]:
        """Ring peers none of whose hops reached us."""
        return [peer for peer in self.others if fold_name(peer) not in self.heard]

    @property
    def done(self) -> bool:
        return self.last_hop >= self.total and not self.unheard

    def next_of(self, peer: str) -> str:
        keys = [fold_name(p) for p in self.ring]
        return self.ring[(keys.index(fold_name(peer)) + 1) % len(self.ring)]

    def arrived(self, name: str, room: str = ROOM) -> Pass | None:
        """``name`` is in ``room``; the first peer throws once everyone is everywhere."""
        self.present.setdefault(room, set()).add(fold_name(name))
        return self._maybe_start()

    def departed(self, name: str, room: str = ROOM) -> None:
        self.present.get(room, set()).discard(fold_name(name))

    def message(self, sender: str, text: str) -> Pass | None:
        """A room message; returns the hop to pass if it threw the ball to us."""
        match = HOP.match(text)
        if match is None or fold_name(sender) not in {fold_name(p) for p in self.ring}:
            return None
        hop, total = int(match["hop"]), int(match["total"])
        if total != self.total or hop <= self.last_hop:
            return None  # another game, or a hop seen already
        self.last_hop = hop
        self.started = True
        if fold_name(sender) != fold_name(self.name):
            self.heard.add(fold_name(sender))
        if fold_name(match["taker"]) != fold_name(self.name) or hop >= self.total:
            return None
        return Pass(self.next_of(self.name), hop + 1, self.total, self.room_of(hop + 1))

    def _maybe_start(self) -> Pass | None:
        if self.started or self.missing or fold_name(self.ring[0]) != fold_name(self.name):
            return None
        self.started = True
        return Pass(self.next_of(self.name), 1, self.total, self.room_of(1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m zchat.clients.demo_peer",
        description="Join, pass a numbered ball round a ring of peers, leave; exit 0 once "
                    "the ball came round and every other peer was heard.",
        epilog="Each option also comes from ZCHAT_<OPTION> (e.g. ZCHAT_RING=alice,bob,dave). "
               "Exit codes: 0 done, 1 not done within --timeout, 2 usage, "
               "3 no broker answered.",
    )
    p.add_argument("--connect", metavar="EP", default=env("CONNECT", "tcp://127.0.0.1:5555"),
                   help="the broker's input endpoint (default: %(default)s)")
    p.add_argument("--name", default=env("NAME", ""), help="the name to join with")
    p.add_argument("--ring", default=env("RING", ""),
                   help="comma-separated names in passing order; the first one starts")
    p.add_argument("--rooms", default=env("ROOMS", ROOM),
                   help="comma-separated rooms the ball goes through, in order; +NAME is a "
                        "private room the first peer makes and invites the others to "
                        "(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=int(env("ROUNDS", "3")),
                   help="times the ball goes round (default: %(default)s)")
    p.add_argument("--pace", metavar="SECONDS", type=float, default=float(env("PACE", "1")),
                   help="pause before passing the ball on, so people can watch "
                        "(default: %(default)s)")
    p.add_argument("--timeout", metavar="SECONDS", type=float,
                   default=float(env("TIMEOUT", "120")),
                   help="give up after this long (default: %(default)s)")
    return p


class _Stop:
    """Set by SIGTERM/SIGINT; the main loop looks at it between events."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.event = threading.Event()

    def install(self) -> None:
        on_signals(self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal = signal.Signals(signum).name
        self.event.set()


def say(line: str) -> None:
    print(time.strftime("%H:%M:%S ") + line, flush=True)


def parse_rooms(text: str) -> list[tuple[str, bool]]:
    """``lobby,+backstage`` -> ``[("lobby", False), ("backstage", True)]`` (+: private).

    Raises:
        ValueError: a name that cannot be a room.
    """
    rooms: list[tuple[str, bool]] = []
    for word in (w.strip() for w in text.split(",")):
        if word:
            private = word.startswith("+")
            rooms.append((room_name(word.removeprefix("+")), private))
    return rooms or [(ROOM, False)]


def run(args: argparse.Namespace, stop: _Stop, keys: ClientKeys | None = None) -> int:
    """Play the ring game against the broker at ``args.connect``."""
    ring = [peer.strip() for peer in args.ring.split(",") if peer.strip()]
    rooms = parse_rooms(args.rooms)
    names = [room for room, _ in rooms]
    private = {room for room, hidden in rooms if hidden}
    relay = Relay(args.name, ring, args.rounds, names)
    first = fold_name(ring[0]) == fold_name(args.name)
    deadline = time.monotonic() + args.timeout
    public = tuple(room for room in names if room not in private)
    # Where peers meet before the private rooms: the first peer invites there.
    meeting = public[0] if public else None
    chat = Client(args.connect, args.name, timeout=10.0, keys=keys, rooms=public or (ROOM,))
    try:
        welcome = chat.connect(timeout=args.timeout)
    except BrokerUnreachable as exc:
        say(f"{args.name}: {exc}")
        return EXIT_UNREACHABLE
    except ClientError as exc:
        say(f"{args.name}: the broker refused the join: {exc}")
        return EXIT_INCOMPLETE
    say(f"joined as {welcome.name} from {welcome.addr}; ring {', '.join(ring)}, "
        f"{relay.total} hops through {', '.join('#' + room for room in names)}")
    due: list[tuple[float, Pass]] = []  # hops to say, each at its time
    invited: set[str] = set()  # ring peers the first peer invited to the private rooms

    def throw(hop: Pass | None) -> None:
        if hop is not None:
            due.append((time.monotonic() + args.pace, hop))

    def invite(peer: str) -> None:
        # The first peer asks the others into the private rooms, once each.
        key = fold_name(peer)
        if not first or key in invited or key == fold_name(args.name) \
                or key not in {fold_name(p) for p in ring}:
            return
        invited.add(key)
        for room in sorted(private):
            chat.invite(room, peer)
            say(f"invited {peer} to #{room}")

    try:
        if first:
            for room in sorted(private):
                entered = chat.enter(room, private=True)
                say(f"made the private room #{room}")
                for member in entered.members:
                    throw(relay.arrived(member.name, room))
        for room in chat.entered_rooms:
            state = chat.room_state(room)
            for member in state.members if state is not None else ():
                throw(relay.arrived(member.name, room))
                if room == meeting:
                    invite(member.name)
        if relay.missing:
            say(f"waiting for {', '.join(relay.missing)}")
        while not relay.done:
            if stop.event.is_set():
                say(f"{stop.signal}: leaving before the ball came round")
                chat.leave(f"stopped by {stop.signal}")
                return EXIT_OK
            now = time.monotonic()
            if now >= deadline:
                say(f"timed out at hop {relay.last_hop}/{relay.total}; never heard: "
                    f"{', '.join(relay.unheard) or 'nobody missing'}; missing from a room: "
                    f"{', '.join(relay.missing) or 'nobody'}")
                chat.leave("timed out")
                return EXIT_INCOMPLETE
            while due and due[0][0] <= now:
                _, hop = due.pop(0)
                chat.send_nowait(hop.text(args.name, welcome.addr), room=hop.room)
            item = chat.next_event(POLL_SECONDS)
            if isinstance(item, Status) and item.state == ClientStatus.CLOSED:
                say(f"closed by the broker: {item.detail}")
                return EXIT_INCOMPLETE
            if isinstance(item, Invited):
                if item.room in private and item.room not in chat.entered_rooms:
                    entered = chat.enter(item.room)
                    say(f"{printable(item.from_)} invited us to #{item.room}: entered")
                    for member in entered.members:
                        throw(relay.arrived(member.name, item.room))
            elif isinstance(item, Joined):
                say(f"#{item.room} --> {printable(item.name)} joined from {item.addr}")
                throw(relay.arrived(item.name, item.room))
                if item.room == meeting:
                    invite(item.name)
            elif isinstance(item, Left):
                say(f"#{item.room} <-- {printable(item.name)} left")
                relay.departed(item.name, item.room)
            elif isinstance(item, Message):
                say(f"#{item.room} <{printable(item.sender)}> {printable(item.text)}")
                throw(relay.message(item.sender, item.text))
        say(f"done: the ball went {relay.total}/{relay.total} round {', '.join(ring)} "
            f"through {', '.join('#' + room for room in names)}; heard "
            f"{', '.join(relay.others)}")
        chat.leave("the ball came round")
        return EXIT_OK
    except ClientError as exc:
        say(f"{args.name}: {exc}")
        chat.leave("failed")
        return EXIT_INCOMPLETE
    finally:
        chat.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.name or not args.ring:
            parser.error("--name and --ring (or ZCHAT_NAME and ZCHAT_RING) are needed")
        ring = [peer.strip() for peer in args.ring.split(",") if peer.strip()]
        # Checks the ring and the rooms before joining.
        rooms = parse_rooms(args.rooms)
        Relay(args.name, ring, args.rounds, [room for room, _ in rooms])
        if all(hidden for _, hidden in rooms):
            raise ValueError("one room at least must be public: the peers meet there")
        keys = keys_from_env()  # CURVE, when ZCHAT_SERVER_KEY and ZCHAT_KEY are set
    except (ValueError, KeyFileError) as exc:
        print(f"demo_peer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = _Stop()
    stop.install()
    return run(args, stop, keys)


if __name__ == "__main__":
    sys.exit(main())
