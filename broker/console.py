"""The operator's console: ``zchat-admin`` commands, answered without sockets.

The server reads a frame from its control socket and hands it to
``Console.answer(frame, now)``; it gets back the reply to send, what the
command asks the broker to send (a kick's ``bye``, a notice) and whether to
stop. Commands are a table::

    stats      -                 the broker's counters, endpoints, connections
    who        room?             members with their real addresses (of a room:
                                 with operator flags)
    kick       name, reason?     say ``bye`` and announce the kick
    say        text, room?       a notice to a room (lobby)
    release    name              free a name from the CURVE key holding it
    rooms      -                 every room, private ones too
    op         room, name        make a member an operator of a room
    close      room, reason?     say why in the room, then remove it and its history
    shutdown   -                 stop cleanly

A command may carry ``id``: a retried command (its reply was lost) is
answered again from a short cache instead of being done twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from zchat.errors import ProtocolError
from zchat.protocol import ErrorCode, decode_frame, encode
from zchat.state import Broker, Outgoing

__all__ = ["CONTROL_IDS_KEPT", "Answer", "Console"]

log = logging.getLogger("zchat.broker")

CONTROL_IDS_KEPT = 64  # replies remembered for retried commands


@dataclass(slots=True)
class Answer:
    """What one operator command comes to."""

    reply: bytes
    out: list[Outgoing] = field(default_factory=list)  # for the broker to send
    stop: bool = False


def _error(code: str, detail: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "detail": detail}


class Console:
    """Answers operator commands against the broker's state.

    Args:
        state: the broker's state.
        extra_stats: more for ``stats`` (endpoints, pid, connections).
    """

    def __init__(self, state: Broker,
                 extra_stats: Callable[[], dict[str, Any]] = dict) -> None:
        self.state = state
        self.extra_stats = extra_stats
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        self._commands: dict[str, Callable[[dict[str, Any], float, Answer], dict[str, Any]]] = {
            "stats": self._stats,
            "who": self._who,
            "kick": self._kick,
            "say": self._say,
            "release": self._release,
            "rooms": self._rooms,
            "op": self._op,
            "close": self._close,
            "shutdown": self._shutdown,
        }

    def answer(self, frame: bytes, now: float) -> Answer:
        """Do the command in ``frame``; never raises for what the operator sent."""
        try:
            body = decode_frame(frame)
        except ProtocolError as exc:
            return Answer(encode(_error(exc.code, exc.detail)))
        rid = body.get("id")
        if isinstance(rid, str) and rid in self._replies:
            # A retry of a command already done (its reply was lost): answer again.
            return Answer(self._replies[rid])
        answer = Answer(b"")
        command = self._commands.get(body["type"])
        if command is None:
            result = _error(ErrorCode.BAD_REQUEST, f"unknown command {body['type']!r}")
        else:
            result = command(body, now, answer)
        result.setdefault("type", "result")
        if isinstance(rid, str):
            result["id"] = rid
        answer.reply = encode(result)
        if isinstance(rid, str):
            self._replies[rid] = answer.reply
            if len(self._replies) > CONTROL_IDS_KEPT:
                self._replies.popitem(last=False)
        return answer

    def _stats(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        stats = asdict(self.state.statistics(now))
        stats.update(self.extra_stats())
        return {"stats": stats}

    def _who(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        room = body.get("room")
        if room is None:
            return {"members": self.state.members(real_addresses=True)}
        if not isinstance(room, str):
            return _error(ErrorCode.BAD_REQUEST, "who takes a room name")
        try:
            return {"room": room, "members": self.state.room_members(room)}
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)

    def _rooms(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        return {"rooms": self.state.room_list()}

    def _op(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        room, name = body.get("room"), body.get("name")
        if not isinstance(room, str) or not isinstance(name, str):
            return _error(ErrorCode.BAD_REQUEST, "op needs a room and a name")
        try:
            answer.out += self.state.name_op(room, name, now)
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)
        log.info("operator made %s an operator of %s", name, room)
        return {}

    def _close(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        room, reason = body.get("room"), body.get("reason")
        if not isinstance(room, str) or not (reason is None or isinstance(reason, str)):
            return _error(ErrorCode.BAD_REQUEST, "close needs a room (and an optional reason)")
        try:
            answer.out += self.state.close_room(room, now, reason or "")
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)
        log.info("operator closed room %s", room)
        return {}

    def _kick(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        name, reason = body.get("name"), body.get("reason")
        if not isinstance(name, str) or not (reason is None or isinstance(reason, str)):
            return _error(ErrorCode.BAD_REQUEST, "kick needs a name (and an optional reason)")
        try:
            answer.out += self.state.kick(name, now, reason)
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)
        log.info("operator kicked %s", name)
        return {}

    def _say(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        text, room = body.get("text"), body.get("room", "lobby")
        if not isinstance(text, str) or not text or not isinstance(room, str):
            return _error(ErrorCode.BAD_REQUEST, "say needs a text (and an optional room)")
        try:
            answer.out += self.state.notice(text, now, room)
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)
        return {}

    def _release(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str):
            return _error(ErrorCode.BAD_REQUEST, "release needs a name")
        try:
            key = self.state.release(name)
        except ProtocolError as exc:
            return _error(exc.code, exc.detail)
        log.info("operator released %s from key %s", name, key)
        return {"key": key}

    def _shutdown(self, body: dict[str, Any], now: float, answer: Answer) -> dict[str, Any]:
        log.info("operator asked for shutdown")
        answer.stop = True
        return {}
