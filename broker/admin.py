"""``zchat-admin``: the operator's tool, speaking to the broker's PAIR socket.

libzmq made PAIR for ``inproc`` pipes: a bound PAIR takes one peer at a time,
turns away a second one silently, and a connection does not come back by
itself. So each command opens a fresh PAIR, sends one request with a unique
``id``, waits briefly for the reply carrying that ``id``, and closes at once
(linger 0) so the next operator can connect. When the broker is busy with
another operator, the request is sent again on a new connection until the
deadline; the broker answers a repeated ``id`` from its memory instead of
running the command twice.

Control frames are MessagePack maps: ``{type: stats|who|kick|say|release|
rooms|op|close|shutdown, id, name?, reason?, text?, room?}``; replies are
``{type: result, id, ...}`` or
``{type: error, id, code, detail}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import zmq

from zchat.errors import ProtocolError, ZchatError
from zchat.protocol import decode_frame, encode

from .config import DEFAULT_CONTROL

__all__ = ["AdminError", "command", "main"]

ATTEMPT_SECONDS = 0.5

EXIT_OK = 0
EXIT_FAILED = 1  # the broker refused the command (e.g. no such user)
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # no answer within --timeout


class AdminError(ZchatError):
    """The command failed; ``unreachable`` when the broker did not answer."""

    def __init__(self, detail: str, *, unreachable: bool = False) -> None:
        super().__init__(detail)
        self.unreachable = unreachable


def command(
    endpoint: str, request: dict[str, Any], *, timeout: float = 5.0,
    context: zmq.Context[Any] | None = None,
) -> dict[str, Any]:
    """Send one control command and return the broker's result map.

    Raises:
        AdminError: the broker answered with an error, or not at all.
    """
    ctx = context or zmq.Context.instance()
    rid = secrets.token_hex(8)
    frame = encode({**request, "id": rid})
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AdminError(
                f"no answer from the broker at {endpoint} within {timeout:g}s "
                "(is it running? is another operator connected?)",
                unreachable=True,
            )
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send(frame)
            reply = _wait_reply(sock, rid, min(ATTEMPT_SECONDS, remaining))
        finally:
            sock.close()
        if reply is None:
            continue
        if reply.get("type") == "error":
            raise AdminError(f"{reply.get('code')}: {reply.get('detail')}")
        return reply


def _wait_reply(sock: zmq.Socket[Any], rid: str, seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            return None
        try:
            reply = decode_frame(sock.recv())
        except ProtocolError:
            continue
        # A late reply to some earlier operator's request is not ours.
        if reply.get("id") == rid:
            return reply
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zchat-admin",
        description="Operate a running zchat broker through its control endpoint.",
        epilog="Exit codes: 0 done, 1 the broker refused (e.g. no such user), 2 usage, "
               "3 no answer from the broker within --timeout.",
    )
    p.add_argument("--control", metavar="EP",
                   default=os.environ.get("ZCHAT_CONTROL") or DEFAULT_CONTROL,
                   help="the broker's control endpoint (env ZCHAT_CONTROL; default %(default)s)")
    p.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0,
                   help="give up after this long (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("stats", help="counters: members, seq, messages, errors, uptime")
    who = sub.add_parser("who", help="joined members with their real addresses "
                                     "(of ROOM: with operators marked @)")
    who.add_argument("room", metavar="ROOM", nargs="?", help="one room's members only")
    kick = sub.add_parser("kick", help="disconnect a member (they get `bye kicked`)",
                          usage="%(prog)s NAME [REASON ...]\n"
                                "       NAME is required; REASON, shown to everyone, is optional")
    kick.add_argument("name", metavar="NAME", help="who to disconnect (required)")
    # A default makes argparse treat REASON as optional: without one, a bare
    # `kick` says "required: name, reason".
    kick.add_argument("reason", metavar="REASON", nargs="*", default=[],
                      help="why, shown to everyone (optional)")
    say = sub.add_parser("say", help="announce a notice to a room (lobby)")
    say.add_argument("--room", metavar="ROOM", help="the room to say it in (default lobby)")
    say.add_argument("text", nargs="+")
    release = sub.add_parser("release", help="free a name from the CURVE key it is bound to")
    release.add_argument("name")
    sub.add_parser("rooms", help="every room (private ones too): members, topic")
    op = sub.add_parser("op", help="make NAME (in ROOM) an operator of ROOM")
    op.add_argument("room", metavar="ROOM")
    op.add_argument("name", metavar="NAME")
    close = sub.add_parser("close", help="say why in ROOM, then remove it and its history")
    close.add_argument("room", metavar="ROOM")
    close.add_argument("reason", metavar="REASON", nargs="*", default=[],
                       help="why, said in the room before it closes (optional)")
    sub.add_parser("shutdown", help="stop the broker cleanly")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request: dict[str, Any] = {"type": args.command}
    if args.command in ("who", "op", "close") and args.room is not None:
        request["room"] = args.room.removeprefix("#")
    if args.command in ("release", "op"):
        request["name"] = args.name
    if args.command == "close" and args.reason:
        request["reason"] = " ".join(args.reason)
    if args.command == "kick":
        request["name"] = args.name
        if args.reason:
            request["reason"] = " ".join(args.reason)
    elif args.command == "say":
        request["text"] = " ".join(args.text)
        if args.room:
            request["room"] = args.room.removeprefix("#")
    try:
        reply = command(args.control, request, timeout=args.timeout)
    except AdminError as exc:
        print(f"zchat-admin: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.unreachable else EXIT_FAILED
    finally:
        zmq.Context.instance().term()
    reply.pop("id", None)
    reply.pop("type", None)
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    elif args.command == "stats":
        for key, value in sorted(reply["stats"].items()):
            print(f"{key:14} {_stat(key, value)}")
    elif args.command == "who":
        for member in reply["members"]:
            name = ("@" if member.get("op") else "") + member["name"]
            print(f"{name:33} {member['addr']}")
        print(f"{len(reply['members'])} member(s)")
    elif args.command == "rooms":
        for room in reply["rooms"]:
            flag = " (private)" if room["private"] else ""
            print(f"#{room['name']:32} {room['count']:6} {room['topic']}{flag}")
        print(f"{len(reply['rooms'])} room(s)")
    else:
        print("ok")
    return EXIT_OK


def _stat(key: str, value: Any) -> str:
    """One statistic for people: seconds as h:mm:ss, other numbers as they are."""
    if key == "uptime" and isinstance(value, int | float):
        return str(datetime.timedelta(seconds=int(value)))
    if isinstance(value, dict):  # connections by socket, cuts by reason
        return "; ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
