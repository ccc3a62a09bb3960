"""``zchat-web``: the HTTP and WebSocket gateway between browsers and a zchat broker.

One asyncio loop runs everything. ``websockets`` serves the page's static
files (``process_request`` answers plain GETs) and the WebSocket endpoint
``/ws``. Each browser session is a ``WebSession``: one ``AsyncClient`` (so
the library's ordering, gap fill, resume without loss or duplicates and
heartbeats hold as for any client), a numbered log of what it delivered
(bounded; ``zchat.web.state``, pure) so that a reloaded tab gets its
conversation back, and the
WebSocket attached now, if any::

    tab  --hello{name}-->  Gateway  --AsyncClient(name)--> broker
    tab  <--welcome, item n...--    (pump: every item is logged, then sent)
    tab reloads: the socket closes; the session waits ``grace`` seconds
    tab  --hello{name, token, after}-->  the same session: no new join, so no
         second `joined`; items above ``after`` are replayed
    tab closed for good: after ``grace`` the session leaves (`left` within
         a heartbeat: ``grace`` is at most half the broker's interval)

Lines the page sends carry its own ``id``: a line sent again after a
reconnect of the socket is answered from the session's memory of ids, so it
goes out once. Limits per socket: frame size (``max_size``), a token bucket
on frames, a bound on what waits to be written to a slow tab; per address:
sessions at once. A WebSocket's ``Origin`` must be the page's own (or
listed with ``--origin``), so no other site can open sessions from its
visitors' browsers.

The broker sees each browser user's own address when the gateway runs an
embedded relay (``zchat.broker.relay``; ``--upstream`` is then the broker's
relay link, with ``--upstream-key`` and ``--relay-key``): sessions connect
to it over ``inproc://``, each DEALER with a routing id the gateway made and
mapped to the browser's address, which the relay hands to the broker as a
relay the broker trusts. Behind a reverse proxy, ``--forwarded-allow`` names
the proxies whose ``X-Forwarded-For`` is believed. Without a relay the
broker sees the gateway's address for everyone, and says so at start.

Defines ``Config``, ``Gateway``, ``WebSession``, ``build_parser``,
``parse_config`` and ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http
import ipaddress
import itertools
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import zmq
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from zchat.client import AsyncClient, check_endpoint
from zchat.errors import ClientClosed, RequestFailed, ZchatError
from zchat.protocol import DEFAULT_HEARTBEAT, ClientStatus, fold_name
from zchat.session import Status
from zchat.web.state import FrameBudget, SessionLog
from zchat.web.wire import (
    Dm,
    Enter,
    Hello,
    LeavePage,
    ListRooms,
    PageError,
    PageRequest,
    Part,
    Say,
    SetTopic,
    Who,
    colour,
    item_json,
    member_json,
    parse_request,
)

if TYPE_CHECKING:  # mypy checks broker/ in place, as `broker` (pyproject's [tool.mypy])
    from broker.relay import Relay, RelayConfig
else:
    from zchat.broker.relay import Relay, RelayConfig

__all__ = ["Config", "Gateway", "WebSession", "build_parser", "main", "parse_config"]

log = logging.getLogger("zchat.web")

ENV_PREFIX = "ZCHAT_"
_RELAYS = itertools.count(1)  # inproc names of relays in this process
WS_PATH = "/ws"
HELLO_SECONDS = 10.0  # a socket that says nothing this long is closed
SEND_SECONDS = 10.0  # a tab that reads nothing this long is dropped (it may reload)
BATCH = 200  # messages at most in one frame to a tab
REMEMBERED_IDS = 1000  # the page's line ids per session, to answer a resend
CLOSE_REPLACED = 4000  # the session was taken by another tab: do not reconnect
CLOSE_REFUSED = 4001  # the broker refused the join (name taken, bad name)
CLOSE_ENDED = 4002  # the session ended (kicked, left): do not reconnect
CLOSE_UNREACHABLE = 4003  # no broker answered: the page tries again later

STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Defence in depth under the page's own rule (peer text only ever goes in as
# textContent): no inline script, nothing from another origin, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class Config:
    """What ``zchat-web`` runs with; every field is an option and a ``ZCHAT_`` variable."""

    upstream: str = "tcp://127.0.0.1:5555"
    listen: str = "127.0.0.1:8080"
    certfile: str | None = None
    keyfile: str | None = None
    origins: tuple[str, ...] = ()  # besides the page's own
    grace: float = 2.0  # seconds a session waits for its tab to come back
    max_sessions: int = 1000
    max_per_address: int = 16
    max_frame: int = 32_768  # bytes of one frame from a tab
    rate: float = 10.0  # frames per second from one tab, sustained
    burst: int = 40
    backlog: int = 2000  # items one tab may leave unread before it is dropped
    log_items: int = 2000  # items a session keeps to replay to a reloaded tab
    join_timeout: float = 10.0
    upstream_key: str | None = None  # the broker's public key: --upstream is its relay link
    relay_key: str | None = None  # this gateway's relay secret key (known to the broker)
    forwarded_allow: tuple[str, ...] = ()  # proxies whose X-Forwarded-For is believed

    @property
    def relayed(self) -> bool:
        """True when sessions go through an embedded relay (browsers' own addresses)."""
        return self.relay_key is not None

    def listen_address(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"bad --listen {self.listen!r}: expected HOST:PORT")
        return (host.strip("[]") or "127.0.0.1"), int(port)


@dataclass
class _Tab:
    """One attached WebSocket and what waits to be written to it, in order."""

    ws: ServerConnection
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    replayed: int = 0  # messages the attach queued at once (the welcome and the log)


class WebSession:
    """One browser session: a zchat client, its log, the tab attached now."""

    def __init__(self, gateway: Gateway, client: AsyncClient, address: str,
                 routing_ids: list[bytes]) -> None:
        self.gateway = gateway
        self.client = client
        self.address = address
        self.routing_ids = routing_ids  # the relay's names of our DEALER (the last is live)
        self.token = client.welcome.token if client.welcome else ""
        self.log = SessionLog(gateway.config.log_items, REMEMBERED_IDS)
        self.tab: _Tab | None = None
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.grace: asyncio.TimerHandle | None = None
        self.online = True
        self.ended = False
        self.pump = asyncio.get_running_loop().create_task(self._pump())

    # ------------------------------------------------------------- outgoing

    def record(self, body: dict[str, Any]) -> None:
        """Number ``body``, keep it for replays, and send it to the tab if one is here."""
        self._send(self.log.record(body))

    def _send(self, body: dict[str, Any], replay: bool = False) -> None:
        tab = self.tab
        if tab is None:
            return
        # A replay is bounded by the log's own size; only what comes after
        # it counts against the tab's backlog.
        if not replay and tab.outbox.qsize() >= self.gateway.config.backlog + tab.replayed:
            # The tab reads nothing: drop it; it gets the log when it comes back.
            log.info("tab of %s is not reading: closed", self.client.name)
            self.detach(tab, close=(1008, "not reading"))
            return
        tab.outbox.put_nowait(json.dumps(body, ensure_ascii=False))

    async def _pump(self) -> None:
        try:
            await self._carry()
        except Exception:  # a bug of ours: end this session, not the gateway
            log.exception("session of %s failed", self.client.name)
            await self.client.close()
        self.end(close=(CLOSE_ENDED, "the session ended"))

    async def _carry(self) -> None:
        """Every item of the client: logged, and sent to the tab if one is here."""
        async for item in self.client.events():
            now = time.time()
            if isinstance(item, Status):
                if item.state == ClientStatus.DISCONNECTED:
                    self.online = False
                    self._send({"type": "state", "state": "reconnecting"})
                elif item.state in (ClientStatus.CONNECTED, ClientStatus.RECONNECTED):
                    self.online = True
                    self._send({"type": "state", "state": "online"})
            self.record(item_json(item, now))
            if isinstance(item, Status) and item.state == ClientStatus.CLOSED:
                return

    # ------------------------------------------------------------- tabs

    def attach(self, ws: ServerConnection, after: int, resumed: bool) -> _Tab:
        """Make ``ws`` this session's tab: the welcome, then the log above ``after``."""
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.tab is not None:
            self.detach(self.tab, close=(CLOSE_REPLACED, "opened in another tab"))
        self.tab = tab = _Tab(ws)
        welcome = self.client.welcome
        self._send({
            "type": "welcome", "name": self.client.name, "token": self.token,
            "addr": welcome.addr if welcome else "", "colour": colour(self.client.name),
            "heartbeat": welcome.heartbeat if welcome else DEFAULT_HEARTBEAT,
            "state": "online" if self.online else "reconnecting", "resumed": resumed,
            "members": [member_json(m) for m in self.client.members.values()],
            "rooms": self._rooms(),
            "last": self.log.count,
        })
        for frame in self.log.replay(after):
            self._send(frame, replay=True)
        tab.replayed = tab.outbox.qsize()
        return tab

    def _rooms(self) -> list[dict[str, Any]]:
        rooms = []
        for room in self.client.entered_rooms:
            state = self.client.room_state(room)
            if state is not None:
                rooms.append({"name": room, "topic": state.topic, "count": state.count,
                              "members": [member_json(m) for m in state.members]})
        return rooms

    def detach(self, tab: _Tab, close: tuple[int, str] | None = None) -> None:
        """``tab`` is gone (or is sent away with ``close``); wait ``grace`` for another."""
        if self.tab is not tab:
            return
        self.tab = None
        tab.outbox.put_nowait(None)
        if close is not None:
            self.gateway.spawn(tab.ws.close(*close))
        if not self.ended:
            heartbeat = self.client.welcome.heartbeat if self.client.welcome else DEFAULT_HEARTBEAT
            wait = min(self.gateway.config.grace, heartbeat / 2)
            self.grace = asyncio.get_running_loop().call_later(wait, self._grace_over)

    def _grace_over(self) -> None:
        self.grace = None
        if self.tab is None and not self.ended:
            self.gateway.spawn(self.leave(None))

    async def leave(self, reason: str | None) -> None:
        """Leave the room (announced) and forget the session."""
        if self.ended:
            return
        self.end(close=(1000, "left"), retire=False)
        await self.client.leave(reason)
        self.gateway.retire(self.routing_ids)  # only now: the leave went through the relay

    def end(self, close: tuple[int, str], retire: bool = True) -> None:
        if self.ended:
            return
        self.ended = True
        if retire:
            self.gateway.retire(self.routing_ids)
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.tab is not None:
            self.detach(self.tab, close=close)
        self.gateway.forget(self)

    # ------------------------------------------------------------- requests

    def take(self, request: PageRequest) -> None:
        """Carry out one request of the page (answers go to whichever tab is here then)."""
        match request:
            case Say(rid, text, room):
                self._line(rid, self._say(text, room))
            case Dm(rid, to, text):
                self._line(rid, self._dm(to, text))
            case Who(room):
                self.gateway.spawn(self._ask(self._who(room)))
            case Enter(room):
                self.gateway.spawn(self._ask(self._enter(room)))
            case Part(room, reason):
                self.gateway.spawn(self._ask(self._part(room, reason)))
            case ListRooms():
                self.gateway.spawn(self._ask(self._list_rooms()))
            case SetTopic(room, text):
                self.gateway.spawn(self._ask(self.client.topic(room, text)))
            case LeavePage(reason):
                self.gateway.spawn(self.leave(reason))
            case Hello():
                self._send({"type": "error", "code": "bad_request",
                            "detail": "already joined"})

    def _line(self, rid: str, work: Any) -> None:
        answered = self.log.answered(rid)
        if answered is not None:  # a resend after the tab's socket came back
            work.close()
            self._send(answered)
            return
        if rid in self.inflight:  # still going; its answer reaches the tab then
            work.close()
            return
        self.inflight[rid] = asyncio.get_running_loop().create_task(self._answer(rid, work))

    async def _answer(self, rid: str, work: Any) -> None:
        try:
            body: dict[str, Any] = {"type": "ack", "id": rid, **(await work)}
        except RequestFailed as exc:
            body = {"type": "error", "id": rid, "code": str(exc.code), "detail": exc.detail}
        except ClientClosed:
            return  # the session is over; nobody to answer
        finally:
            self.inflight.pop(rid, None)
        self.log.answer(rid, body)
        self._send(body)

    async def _say(self, text: str, room: str) -> dict[str, Any]:
        return {"seq": await self.client.send(text, room=room)}

    async def _dm(self, to: str, text: str) -> dict[str, Any]:
        await self.client.dm(to, text)
        # Logged, so that a reloaded tab shows what it sent too.
        self.record({"type": "dm", "from": self.client.name, "to": to, "text": text,
                     "ts": time.time(), "colour": colour(to)})
        return {}

    async def _ask(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a request that has no line id; a failure is said to the tab."""
        try:
            await work
        except RequestFailed as exc:
            self._send({"type": "error", "code": str(exc.code), "detail": exc.detail})
        except ZchatError as exc:
            self._send({"type": "error", "code": "unavailable", "detail": str(exc)})

    async def _who(self, room: str) -> None:
        members = await self.client.who(room)
        self._send({"type": "members", "room": room,
                    "members": [member_json(m) for m in members]})

    async def _enter(self, room: str) -> None:
        entered = await self.client.enter(room)
        # Logged, so that a reloaded tab finds its rooms and their lines again.
        self.record({"type": "entered", "room": entered.room, "topic": entered.topic,
                     "count": entered.count, "ts": time.time(),
                     "members": [member_json(m) for m in entered.members]})

    async def _part(self, room: str, reason: str | None) -> None:
        await self.client.part(room, reason)
        self.record({"type": "parted", "room": room, "ts": time.time()})

    async def _list_rooms(self) -> None:
        rooms = await self.client.rooms()
        self._send({"type": "roomlist", "rooms": [
            {"name": r.name, "topic": r.topic, "count": r.count, "private": r.private}
            for r in rooms]})


class Gateway:
    """The sessions, and the WebSocket endpoint that lets tabs in."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sessions: dict[str, WebSession] = {}
        self.per_address: collections.Counter[str] = collections.Counter()
        self.server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # The embedded relay (``config.relayed``), its thread and the browsers'
        # addresses by routing id, which the relay's thread reads.
        self.context: zmq.Context[Any] | None = None
        self.relay: Relay | None = None
        self._relay_thread: threading.Thread | None = None
        self.endpoint = config.upstream
        self.addresses: dict[bytes, str] = {}
        self._static = {path: (resources.files("zchat.web").joinpath("static", name)
                               .read_bytes(), ctype)
                        for path, (name, ctype) in STATIC.items()}

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task that is kept until it ends (the loop keeps only weak ones)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def retire(self, routing_ids: list[bytes]) -> None:
        """These DEALERs are closed: the relay tells the broker (inproc reports no close)."""
        while routing_ids:
            rid = routing_ids.pop()
            self.addresses.pop(rid, None)
            if self.relay is not None:
                self.relay.forget(rid)

    def _namer(self, address: str) -> tuple[list[bytes], Any]:
        """A routing-id maker for one session's DEALERs, each mapped to ``address``."""
        ids: list[bytes] = []

        def routing_id() -> bytes:
            self.retire(ids)  # the library closed the previous DEALER before this one
            rid = b"w" + secrets.token_bytes(15)
            self.addresses[rid] = address
            ids.append(rid)
            return rid
        return ids, routing_id

    def browser_address(self, ws: ServerConnection) -> str:
        """The browser's IP: the peer's, or what a trusted proxy says it saw."""
        peer = str(ws.remote_address[0]) if ws.remote_address else "?"
        forwarded = ws.request.headers.get("X-Forwarded-For") if ws.request else None
        if forwarded and peer in self.config.forwarded_allow:
            last = forwarded.rsplit(",", 1)[-1].strip()  # the hop our proxy added
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                log.info("ignored X-Forwarded-For %r from %s", forwarded[:100], peer)
        return peer

    def forget(self, session: WebSession) -> None:
        if self.sessions.get(session.token) is session:
            del self.sessions[session.token]
            self.per_address[session.address] -= 1
            if self.per_address[session.address] <= 0:
                del self.per_address[session.address]

    # ------------------------------------------------------------- HTTP

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == WS_PATH:
            origin = request.headers.get("Origin")
            host = request.headers.get("Host", "")
            allowed = {f"http://{host}", f"https://{host}", *self.config.origins}
            if origin is not None and origin not in allowed:
                return self._response(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n",
                                      "text/plain")
            return None
        if path == "/favicon.ico":
            return self._response(http.HTTPStatus.NO_CONTENT, b"", "text/plain")
        static = self._static.get(path)
        if static is None:
            return self._response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        return self._response(http.HTTPStatus.OK, *static)

    @staticmethod
    def _response(status: http.HTTPStatus, body: bytes, ctype: str) -> Response:
        headers = Headers({"Content-Type": ctype, "Content-Length": str(len(body)),
                           "Connection": "close", **SECURITY_HEADERS})
        return Response(status.value, status.phrase, headers, body)

    # ------------------------------------------------------------- WebSocket

    async def handle(self, ws: ServerConnection) -> None:
        """One tab's socket: hello, then requests until it closes."""
        address = self.browser_address(ws)
        try:
            first = await asyncio.wait_for(ws.recv(), HELLO_SECONDS)
            hello = parse_request(first)
            if not isinstance(hello, Hello):
                raise PageError("say hello first")
        except (TimeoutError, PageError) as exc:
            await ws.close(1008, str(exc)[:100] or "no hello")
            return
        except ConnectionClosed:
            return
        found = await self._session(ws, hello, address)
        if found is None:
            return
        session, resumed = found
        tab = session.attach(ws, hello.after if resumed else 0, resumed)
        writer = asyncio.get_running_loop().create_task(self._write(tab))
        bucket = FrameBudget.full(self.config.rate, self.config.burst, time.monotonic())
        try:
            async for frame in ws:
                if not bucket.take(time.monotonic()):
                    await ws.close(1008, "too many frames")
                    break
                try:
                    request = parse_request(frame)
                except PageError as exc:
                    session._send({"type": "error", "code": "bad_request", "detail": str(exc)})
                    continue
                if session.tab is not tab:
                    break
                session.take(request)
        except ConnectionClosed:
            pass
        finally:
            session.detach(tab)
            tab.outbox.put_nowait(None)
            await writer

    async def _write(self, tab: _Tab) -> None:
        """Send what the session queued for ``tab``, in order; drop a tab that stalls.

        What has queued up meanwhile goes as one frame, a JSON array of the
        messages (at most ``BATCH``): under load a frame, and a system call,
        per message would cost the gateway more than the messages themselves.
        """
        ending = False
        while not ending:
            text = await tab.outbox.get()
            if text is None:
                return
            batch = [text]
            while len(batch) < BATCH and not tab.outbox.empty():
                more = tab.outbox.get_nowait()
                if more is None:
                    ending = True
                    break
                batch.append(more)
            frame = text if len(batch) == 1 else "[" + ",".join(batch) + "]"
            try:
                async with asyncio.timeout(SEND_SECONDS):
                    await tab.ws.send(frame)
            except (TimeoutError, ConnectionClosed):
                tab.ws.transport.abort()
                return

    async def _session(self, ws: ServerConnection, hello: Hello,
                       address: str) -> tuple[WebSession, bool] | None:
        """The session ``hello`` asks for: the live one of its token, or a new join."""
        if hello.token:
            session = self.sessions.get(hello.token)
            if session is not None and not session.ended and (
                    not hello.name or fold_name(hello.name) == fold_name(session.client.name)):
                return session, True
        if len(self.sessions) >= self.config.max_sessions or \
                self.per_address[address] >= self.config.max_per_address:
            await self._refuse(ws, CLOSE_UNREACHABLE, "too_many_sessions",
                               "this gateway holds all the sessions it may")
            return None
        ids, routing_id = self._namer(address)
        try:
            client = AsyncClient(self.endpoint, hello.name or "?", token=hello.token or None,
                                 timeout=self.config.join_timeout, context=self.context,
                                 routing_id=routing_id if self.relay is not None else None)
            await client.connect()
        except RequestFailed as exc:
            self.retire(ids)
            await self._refuse(ws, CLOSE_REFUSED, str(exc.code), exc.detail)
            return None
        except ZchatError as exc:
            self.retire(ids)
            await self._refuse(ws, CLOSE_UNREACHABLE, "unreachable", str(exc))
            return None
        except ValueError as exc:
            self.retire(ids)
            await self._refuse(ws, CLOSE_REFUSED, "bad_name", str(exc))
            return None
        session = WebSession(self, client, address, ids)
        self.sessions[session.token] = session
        self.per_address[address] += 1
        if ws.state is not State.OPEN:  # the tab went while we joined
            await session.leave(None)
            return None
        return session, False

    @staticmethod
    async def _refuse(ws: ServerConnection, code: int, error: str, detail: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "error", "code": error, "detail": detail}))
        await ws.close(code, error)

    # ------------------------------------------------------------- running

    def _start_relay(self) -> None:
        config = self.config
        if config.upstream_key is None or config.relay_key is None:
            raise ValueError("a relay needs --upstream-key and --relay-key")
        self.context = zmq.Context()
        name = f"zchat-web-{os.getpid()}-{next(_RELAYS)}"
        self.relay = Relay(RelayConfig(upstream=config.upstream, upstream_key=config.upstream_key,
                                       relay_key=config.relay_key, input=f"inproc://{name}-in",
                                       broadcast=f"inproc://{name}-pub"),
                           context=self.context, address_of=self.addresses.get)
        endpoints = self.relay.bind()
        self.endpoint = endpoints.input
        self._relay_thread = threading.Thread(target=self.relay.run, name="zchat-web-relay",
                                              daemon=True)
        self._relay_thread.start()

    async def start(self) -> str:
        """Listen; return the URL the page is served at (the real port for port 0)."""
        if self.config.relayed:
            self._start_relay()
        host, port = self.config.listen_address()
        context = None
        if self.config.certfile:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.config.certfile, self.config.keyfile)
        self.server = await serve(
            self.handle, host, port, ssl=context, process_request=self.process_request,
            max_size=self.config.max_frame, compression=None, server_header=None,
            ping_interval=10, ping_timeout=10, close_timeout=2)
        bound = self.server.sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        return f"{'https' if context else 'http'}://{shown}:{bound[1]}/"

    async def stop(self) -> None:
        """Close every tab and leave every session (each announced as `left`)."""
        if self.server is not None:
            self.server.close()
        await asyncio.gather(*(s.leave("gateway stopped") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()
        if self.relay is not None and self._relay_thread is not None:
            self.relay.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._relay_thread.join, 10)
        if self.context is not None:
            self.context.destroy(linger=0)


# ----------------------------------------------------------------- the program


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-web",
        description="zchat in the browser: serve the chat page and carry each tab's "
                    "session to a zchat broker. Every option is also a ZCHAT_ variable "
                    "(--max-sessions: ZCHAT_MAX_SESSIONS).")
    defaults = Config()
    parser.add_argument("--upstream", default=_env("UPSTREAM", defaults.upstream),
                        help="the broker's input endpoint (default %(default)s)")
    parser.add_argument("--listen", default=_env("LISTEN", defaults.listen),
                        help="HOST:PORT to serve on; port 0 picks one (default %(default)s)")
    parser.add_argument("--certfile", default=_env("CERTFILE"),
                        help="PEM certificate (chain): serve https and wss")
    parser.add_argument("--keyfile", default=_env("KEYFILE"),
                        help="PEM private key of --certfile (if not in it)")
    parser.add_argument("--upstream-key", default=_env("UPSTREAM_KEY"),
                        help="the broker's public .key: --upstream is then the broker's relay "
                             "link (its --relay-bind) and the broker sees each browser's address")
    parser.add_argument("--relay-key", default=_env("RELAY_KEY"),
                        help="this gateway's relay .key_secret (its public half in the broker's "
                             "--relay-keys); with --upstream-key")
    parser.add_argument("--forwarded-allow", action="append",
                        default=[o for o in (_env("FORWARDED_ALLOW") or "").split(",") if o],
                        help="a reverse proxy's IP whose X-Forwarded-For is believed (repeatable)")
    parser.add_argument("--origin", action="append",
                        default=[o for o in (_env("ORIGIN") or "").split(",") if o],
                        help="another page origin allowed to open sessions (repeatable)")
    for name, kind, what in (
            ("grace", float, "seconds a session waits for its tab to come back (reload)"),
            ("max-sessions", int, "sessions at once"),
            ("max-per-address", int, "sessions at once from one browser address"),
            ("max-frame", int, "bytes of one WebSocket frame from a tab"),
            ("rate", float, "frames per second from one tab, sustained (0: no limit)"),
            ("burst", int, "frames from one tab at once"),
            ("log-items", int, "items a session keeps to replay to a reloaded tab"),
            ("backlog", int, "messages waiting for a tab that reads nothing before it is "
                             "dropped (a replay not counted)")):
        attr = name.replace("-", "_")
        default = getattr(defaults, attr)
        parser.add_argument(f"--{name}", type=kind,
                            default=kind(_env(attr.upper(), default)),
                            help=f"{what} (default %(default)s)")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    config = Config(upstream=args.upstream, listen=args.listen, certfile=args.certfile,
                    keyfile=args.keyfile, origins=tuple(args.origin), grace=args.grace,
                    max_sessions=args.max_sessions, max_per_address=args.max_per_address,
                    max_frame=args.max_frame, rate=args.rate, burst=args.burst,
                    log_items=args.log_items, backlog=args.backlog,
                    upstream_key=args.upstream_key,
                    relay_key=args.relay_key, forwarded_allow=tuple(args.forwarded_allow))
    try:
        check_endpoint(config.upstream)
        config.listen_address()
    except ValueError as exc:
        build_parser().error(str(exc))
    if bool(config.keyfile) and not config.certfile:
        build_parser().error("--keyfile needs --certfile")
    if (config.upstream_key is None) != (config.relay_key is None):
        build_parser().error("--upstream-key and --relay-key go together")
    return config


async def _run(config: Config) -> None:
    gateway = Gateway(config)
    try:
        url = await gateway.start()
    except (ZchatError, ValueError) as exc:  # a bad key file, a bad relay setting
        print(f"zchat-web: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"zchat-web: serving {url} (WebSocket {url.replace('http', 'ws', 1)}ws), "
          f"upstream {config.upstream}", flush=True)
    if not config.certfile:
        print("zchat-web: no --certfile/--keyfile: plain http, tokens and chat travel "
              "unencrypted; use it on localhost or behind a TLS proxy", flush=True)
    if config.relayed:
        print("zchat-web: through an embedded relay: the broker sees each browser's address",
              flush=True)
    else:
        print("zchat-web: no relay link (--upstream-key, --relay-key): the broker sees this "
              "gateway's address for every browser", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="zchat-web: %(message)s", stream=sys.stderr)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(_run(config))
    except OSError as exc:
        print(f"zchat-web: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
