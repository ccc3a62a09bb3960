"""``zchat-broker``: parse the command line, then run the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from zchat.history import HistoryError, default_db_path
from zchat.keys import KeyFileError
from zchat.state import Limits

from .config import (
    DEFAULT_BROADCAST,
    DEFAULT_COALESCE,
    DEFAULT_CONTROL,
    DEFAULT_INPUT,
    Config,
    ConfigError,
    check_endpoint,
)
from .guard import ConnectionLimits
from .relaylink import RelayLinkConfig
from .server import Server, raise_fd_limit

__all__ = ["build_parser", "config_from_args", "env_default", "main"]

ENV_PREFIX = "ZCHAT_"

EXIT_OK = 0
EXIT_CONFIG = 2  # bad option or setting (argparse uses 2 as well)
EXIT_BIND = 3  # an endpoint could not be bound
EXIT_STORE = 4  # the history database could not be opened or written

DESCRIPTION = """\
The zchat broker: one event loop that relays every chat message to every
client, prints the chat on this screen, and announces who joins and leaves
(name and IP address). Clients connect a DEALER to --input and a SUB to
--broadcast; the operator uses `zchat-admin` on --control.
"""

EPILOG = f"""\
Every option can also be set by an environment variable: {ENV_PREFIX}<OPTION>,
upper case with '-' as '_' (e.g. {ENV_PREFIX}HEARTBEAT=0.5, {ENV_PREFIX}HIDE_ADDRESSES=1).
A command-line option wins over the environment. A limit of 0 turns it off.

Exit codes: 0 stopped cleanly (SIGINT, SIGTERM or `zchat-admin shutdown`),
2 bad configuration (e.g. an endpoint not tcp://HOST:PORT, ipc://PATH or
inproc://NAME), 3 an endpoint could not be bound, 4 the history database
could not be created, opened (another broker uses it?) or written.
"""


class LimitOption(NamedTuple):
    """One limit's command-line option: ``--flag`` sets ``field`` of its dataclass."""

    flag: str
    field: str
    kind: Callable[[str], Any]
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        return self.flag.replace("-", "_")


PERSON_LIMITS: Final = (
    LimitOption("max-text", "max_text", int, "N", "characters in one message"),
    LimitOption("max-frame", "max_frame", int, "BYTES", "bytes in one frame"),
    LimitOption("rate", "rate", float, "PER_SECOND",
                "messages and dms per second per person, sustained"),
    LimitOption("burst", "burst", int, "N", "messages at once before the rate applies"),
    LimitOption("query-rate", "query_rate", float, "PER_SECOND",
                "`history` and `who` requests per second, sustained"),
    LimitOption("query-burst", "query_burst", int, "N", "`history` and `who` requests at once"),
    LimitOption("join-rate", "join_rate", float, "PER_SECOND", "joins per second, sustained"),
    LimitOption("join-burst", "join_burst", int, "N", "joins at once"),
    LimitOption("address-budget", "per_address", int, "N",
                "one IP address may spend N persons' worth of each rate above (several "
                "people may share an address)"),
    LimitOption("page-bytes", "page_bytes", int, "BYTES",
                "bytes of events in one `history` reply, at least one event"),
    LimitOption("dedupe", "dedupe", int, "N",
                "request ids remembered per sender, so a resend is not delivered twice"),
    LimitOption("dedupe-total", "dedupe_total", int, "N",
                "request ids remembered across all senders"),
    LimitOption("names-per-key", "names_per_key", int, "N",
                "CURVE: names one client key may hold"),
    LimitOption("name-ttl", "name_ttl", float, "SECONDS",
                "CURVE: a name unused this long is no longer bound to its key"),
    LimitOption("rooms-per-client", "rooms_per_client", int, "N",
                "rooms one client is in at once, lobby included"),
    LimitOption("max-rooms", "rooms_total", int, "N",
                "rooms in all (a room outlives its members until `zchat-admin close`)"),
    LimitOption("max-room-chars", "room_chars", int, "N",
                "characters of a room name (at most 64, the protocol's bound)"),
    LimitOption("announce-max", "announce_max", int, "N",
                "a room with more members announces no joins and parts (`who` lists them)"),
    LimitOption("coalesce-joins-above", "coalesce_above", int, "N",
                "a room with more members announces the joins of one loop pass in one "
                "`joins` event (0: any room); smaller rooms get one `joined` each"),
)
CONNECTION_LIMITS: Final = (
    LimitOption("max-per-address", "per_address", int, "N",
                "connections from one IP address to each port; more are cut at once (keep "
                "it above a NAT'd office's head count)"),
    LimitOption("join-timeout", "join_timeout", float, "SECONDS",
                "a connection to --input with nobody joined on it is cut after this long"),
    LimitOption("max-backlog", "max_backlog", int, "BYTES",
                "bytes one client may have waiting in the broker, either way (unread "
                "input, unread replies); past it the connection is cut and the client "
                "resumes from its last seq"),
    LimitOption("max-subscribe", "max_subscribe", int, "BYTES",
                "bytes of subscriptions one subscriber may send"),
    LimitOption("stall", "stall", float, "SECONDS",
                "a subscriber that reads nothing for this long while events wait is cut"),
)


def env_default(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    """The default for option ``name``: ``ZCHAT_<NAME>`` if set, else ``default``."""
    raw = os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper().replace('-', '_')}={raw!r}: {exc}") from exc


def env_flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def build_parser() -> argparse.ArgumentParser:
    limits = Limits()
    p = argparse.ArgumentParser(
        prog="zchat-broker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ep = p.add_argument_group("endpoints (ZeroMQ addresses; port 0 picks a free port)")
    ep.add_argument("--input", metavar="EP", default=env_default("input", DEFAULT_INPUT),
                    help="ROUTER socket for client requests (default: %(default)s)")
    ep.add_argument("--broadcast", metavar="EP",
                    default=env_default("broadcast", DEFAULT_BROADCAST),
                    help="PUB socket for room events and heartbeats (default: %(default)s)")
    ep.add_argument("--control", metavar="EP", default=env_default("control", DEFAULT_CONTROL),
                    help="PAIR socket for zchat-admin; loopback tcp or ipc:// only "
                         "(default: %(default)s)")
    ep.add_argument("--advertise", metavar="EP", default=env_default("advertise", None),
                    help="broadcast endpoint named to clients in `welcome` (default: the bound "
                         "port alone when bound to *, so clients use the host they reached)")
    beh = p.add_argument_group("behaviour")
    beh.add_argument("--heartbeat", metavar="SECONDS", type=float,
                     default=env_default("heartbeat", 5.0, float),
                     help="seconds between heartbeats; clients silent for 3 of them are "
                          "dropped (default: %(default)s)")
    beh.add_argument("--history", metavar="N", type=int,
                     default=env_default("history", limits.history, int),
                     help="room events kept for `history` (default: %(default)s)")
    beh.add_argument("--db", metavar="PATH", default=env_default("db", None),
                     help="SQLite file that keeps the room's history across restarts; "
                          "':memory:' keeps it in memory only (default: "
                          f"{default_db_path()}, or $ZCHAT_DATA_DIR/history.db)")
    beh.add_argument("--retention", metavar="SECONDS", type=float,
                     default=env_default("retention", 0.0, float),
                     help="also forget events older than this; 0 keeps them until --history "
                          "pushes them out (default: %(default)s)")
    beh.add_argument("--fsync", action="store_true", default=env_default("fsync", False, env_flag),
                     help="fsync each commit so history survives a power cut too, not only a "
                          "killed broker (slower)")
    beh.add_argument("--hide-addresses", action="store_true",
                     default=env_default("hide-addresses", False, env_flag),
                     help="show clients a stable cloak instead of each other's IP address "
                          "(the operator still sees real addresses with `zchat-admin who`)")
    beh.add_argument("--quiet", action="store_true", default=env_default("quiet", False, env_flag),
                     help="do not print chat lines on stdout")
    beh.add_argument("--coalesce", metavar="N", type=int,
                     default=env_default("coalesce", DEFAULT_COALESCE, int),
                     help="also publish room events coalesced, up to N per frame, on the batch "
                          "topic that zchat clients use (fewer frames per subscriber under "
                          "load; plain v1 subscribers are unaffected); 0 turns it off "
                          "(default: %(default)s)")
    beh.add_argument("--io-threads", metavar="N", type=int,
                     default=env_default("io-threads", 1, int),
                     help="libzmq I/O threads (default: %(default)s)")
    sec = p.add_argument_group("security (CURVE; keys from zchat-keygen)")
    sec.add_argument("--secret-key", metavar="FILE", default=env_default("secret-key", None),
                     help="the broker's .key_secret file: encrypt the input and broadcast "
                          "sockets and admit only authorized clients")
    sec.add_argument("--authorized-keys", metavar="DIR",
                     default=env_default("authorized-keys", None),
                     help="directory of the public .key files of admitted clients")
    add_limits(p, "limits per person (0 turns one off)", Limits(), PERSON_LIMITS)
    add_limits(p, "limits per connection and address (0 turns one off)", ConnectionLimits(),
               CONNECTION_LIMITS)
    rel = p.add_argument_group("relays (zchat-relay; the link is always CURVE)")
    rel.add_argument("--relay-bind", metavar="EP", default=env_default("relay-bind", None),
                     help="ROUTER that relays send their clients' requests to (default: no "
                          "relays)")
    rel.add_argument("--relay-broadcast", metavar="EP",
                     default=env_default("relay-broadcast", None),
                     help="XPUB that relays subscribe to (needed with --relay-bind)")
    rel.add_argument("--relay-keys", metavar="DIR", default=env_default("relay-keys", None),
                     help="directory of the public .key files of admitted relays; only they "
                          "may speak for clients")
    rel.add_argument("--relay-secret-key", metavar="FILE",
                     default=env_default("relay-secret-key", None),
                     help="the broker's .key_secret for the relay link (default: --secret-key)")
    add_log_level(p)
    return p


def add_limits(p: argparse.ArgumentParser, title: str, defaults: object,
               table: Sequence[LimitOption]) -> None:
    """One option per limit of ``table`` (``ZCHAT_<FLAG>`` as its default), in a group."""
    group = p.add_argument_group(title)
    for option in table:
        default = env_default(option.flag, getattr(defaults, option.field), option.kind)
        group.add_argument(f"--{option.flag}", metavar=option.metavar, type=option.kind,
                           default=default, help=f"{option.help} (default: %(default)s)")


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", metavar="LEVEL",
                   default=env_default("log-level", "INFO", str.upper),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> Config:
    for option in (*PERSON_LIMITS, *CONNECTION_LIMITS):
        if getattr(args, option.dest) < 0:
            raise ConfigError(f"--{option.flag} must not be negative")
    if args.history < 0:
        raise ConfigError("--history must not be negative")
    return Config(
        input=args.input,
        broadcast=args.broadcast,
        control=args.control,
        heartbeat=args.heartbeat,
        limits=Limits(history=args.history,
                      **{option.field: getattr(args, option.dest) for option in PERSON_LIMITS}),
        connections=ConnectionLimits(
            **{option.field: getattr(args, option.dest) for option in CONNECTION_LIMITS}),
        hide_addresses=args.hide_addresses,
        advertise=args.advertise,
        quiet=args.quiet,
        io_threads=args.io_threads,
        coalesce=args.coalesce,
        secret_key=args.secret_key,
        authorized_keys=args.authorized_keys,
        db=args.db,
        retention=args.retention,
        fsync=args.fsync,
        relay=relay_config_from_args(args),
    )


def relay_config_from_args(args: argparse.Namespace) -> RelayLinkConfig | None:
    """The relay link's settings, or None when no relay may connect."""
    given = (args.relay_bind, args.relay_broadcast, args.relay_keys)
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("--relay-bind, --relay-broadcast and --relay-keys go together")
    check_endpoint("relay-bind", args.relay_bind)
    check_endpoint("relay-broadcast", args.relay_broadcast)
    secret = args.relay_secret_key or args.secret_key
    if not secret:
        raise ConfigError("the relay link is always CURVE: give --secret-key or "
                          "--relay-secret-key")
    return RelayLinkConfig(bind=args.relay_bind, broadcast=args.relay_broadcast,
                           keys=args.relay_keys, secret_key=secret)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"zchat-broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("zchat.broker")
    fds = raise_fd_limit()
    server = Server(config)
    try:
        endpoints = server.bind()
    except HistoryError as exc:
        print(f"zchat-broker: {exc}", file=sys.stderr)
        return EXIT_STORE
    except KeyFileError as exc:
        print(f"zchat-broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"zchat-broker: {exc}", file=sys.stderr)
        return EXIT_BIND
    server.install_signal_handlers()
    log.info(
        "listening: input %s, broadcast %s, control %s (heartbeat %gs, open-file limit %d)",
        endpoints.input, endpoints.broadcast, endpoints.control, config.heartbeat, fds,
    )
    # One machine-readable line on stdout so scripts and tests learn the ports.
    relays = server.relays.endpoints if server.relays is not None else None
    print(
        f"zchat-broker listening input={endpoints.input} broadcast={endpoints.broadcast} "
        f"control={endpoints.control}"
        + (f" relay={relays[0]} relay-broadcast={relays[1]}" if relays else ""),
        flush=True,
    )
    if config.secret_key:
        log.info("CURVE on: input and broadcast encrypted; clients admitted from %s",
                 config.authorized_keys)
    else:
        log.warning("plaintext: anyone who reaches the ports can read the chat and join "
                    "(use --secret-key and --authorized-keys)")
    state = server.state
    if state is not None:
        store = state.store
        log.info("history: %s, %d events kept, last seq %d, epoch %s",
                 getattr(store, "path", "in memory only") if store.durable else "in memory only",
                 len(store), state.seq, state.epoch)
    server.run()
    if server.failure:
        log.error("stopped: %s", server.failure)
        return EXIT_STORE
    log.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
