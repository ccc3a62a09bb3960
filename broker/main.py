"""``zchat-broker``: parse the command line, then run the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from zchat.history import HistoryError, default_db_path
from zchat.keys import KeyFileError
from zchat.state import Limits

from .config import (
    DEFAULT_BROADCAST,
    DEFAULT_CONTROL,
    DEFAULT_INPUT,
    Config,
    ConfigError,
)
from .guard import ConnectionLimits
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
                     default=env_default("coalesce", 0, int),
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
    lim = p.add_argument_group("limits per client (0 turns one off)")
    lim.add_argument("--max-text", metavar="N", type=int,
                     default=env_default("max-text", limits.max_text, int),
                     help="characters in one message (default: %(default)s)")
    lim.add_argument("--max-frame", metavar="BYTES", type=int,
                     default=env_default("max-frame", limits.max_frame, int),
                     help="bytes in one frame (default: %(default)s)")
    lim.add_argument("--rate", metavar="PER_SECOND", type=float,
                     default=env_default("rate", limits.rate, float),
                     help="messages per second, sustained (default: %(default)s)")
    lim.add_argument("--burst", metavar="N", type=int,
                     default=env_default("burst", limits.burst, int),
                     help="messages at once before the rate applies (default: %(default)s)")
    lim.add_argument("--query-rate", metavar="PER_SECOND", type=float,
                     default=env_default("query-rate", limits.query_rate, float),
                     help="`history` and `who` requests per second, sustained (default: "
                          "%(default)s)")
    lim.add_argument("--query-burst", metavar="N", type=int,
                     default=env_default("query-burst", limits.query_burst, int),
                     help="`history` and `who` requests at once (default: %(default)s)")
    lim.add_argument("--join-rate", metavar="PER_SECOND", type=float,
                     default=env_default("join-rate", limits.join_rate, float),
                     help="joins per second, sustained (default: %(default)s)")
    lim.add_argument("--join-burst", metavar="N", type=int,
                     default=env_default("join-burst", limits.join_burst, int),
                     help="joins at once (default: %(default)s)")
    lim.add_argument("--address-budget", metavar="N", type=int,
                     default=env_default("address-budget", limits.per_address, int),
                     help="one IP address may spend N persons' worth of each rate above "
                          "(several people may share an address; default: %(default)s)")
    lim.add_argument("--page-bytes", metavar="BYTES", type=int,
                     default=env_default("page-bytes", limits.page_bytes, int),
                     help="bytes of events in one `history` reply, at least one event "
                          "(default: %(default)s)")
    lim.add_argument("--dedupe", metavar="N", type=int,
                     default=env_default("dedupe", limits.dedupe, int),
                     help="request ids remembered per sender, so a resend is not "
                          "delivered twice (default: %(default)s)")
    lim.add_argument("--dedupe-total", metavar="N", type=int,
                     default=env_default("dedupe-total", limits.dedupe_total, int),
                     help="request ids remembered across all senders (default: %(default)s)")
    lim.add_argument("--names-per-key", metavar="N", type=int,
                     default=env_default("names-per-key", limits.names_per_key, int),
                     help="CURVE: names one client key may hold (default: %(default)s)")
    lim.add_argument("--name-ttl", metavar="SECONDS", type=float,
                     default=env_default("name-ttl", limits.name_ttl, float),
                     help="CURVE: a name unused this long is no longer bound to its key "
                          "(default: %(default)s)")
    conn = ConnectionLimits()
    net = p.add_argument_group("limits per connection and address (0 turns one off)")
    net.add_argument("--max-per-address", metavar="N", type=int,
                     default=env_default("max-per-address", conn.per_address, int),
                     help="connections from one IP address to each port; more are cut at "
                          "once (keep it above a NAT'd office's head count; default: "
                          "%(default)s)")
    net.add_argument("--join-timeout", metavar="SECONDS", type=float,
                     default=env_default("join-timeout", conn.join_timeout, float),
                     help="a connection to --input with nobody joined on it is cut after "
                          "this long (default: %(default)s)")
    net.add_argument("--max-backlog", metavar="BYTES", type=int,
                     default=env_default("max-backlog", conn.max_backlog, int),
                     help="bytes one client may have waiting in the broker, either way "
                          "(unread input, unread replies); past it the connection is cut "
                          "and the client resumes from its last seq (default: %(default)s)")
    net.add_argument("--max-subscribe", metavar="BYTES", type=int,
                     default=env_default("max-subscribe", conn.max_subscribe, int),
                     help="bytes of subscriptions one subscriber may send (default: "
                          "%(default)s)")
    net.add_argument("--stall", metavar="SECONDS", type=float,
                     default=env_default("stall", conn.stall, float),
                     help="a subscriber that reads nothing for this long while events wait "
                          "is cut (default: %(default)s)")
    p.add_argument("--log-level", metavar="LEVEL",
                   default=env_default("log-level", "INFO", str.upper),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    for name in ("max_text", "max_frame", "rate", "burst", "history", "query_rate",
                 "query_burst", "join_rate", "join_burst", "address_budget", "page_bytes",
                 "dedupe", "dedupe_total", "names_per_key", "name_ttl"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
    return Config(
        input=args.input,
        broadcast=args.broadcast,
        control=args.control,
        heartbeat=args.heartbeat,
        limits=Limits(
            max_text=args.max_text,
            max_frame=args.max_frame,
            rate=args.rate,
            burst=args.burst,
            history=args.history,
            query_rate=args.query_rate,
            query_burst=args.query_burst,
            join_rate=args.join_rate,
            join_burst=args.join_burst,
            per_address=args.address_budget,
            page_bytes=args.page_bytes,
            dedupe=args.dedupe,
            dedupe_total=args.dedupe_total,
            names_per_key=args.names_per_key,
            name_ttl=args.name_ttl,
        ),
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
        connections=ConnectionLimits(
            per_address=args.max_per_address,
            join_timeout=args.join_timeout,
            max_backlog=args.max_backlog,
            max_subscribe=args.max_subscribe,
            stall=args.stall,
        ),
    )


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
    print(
        f"zchat-broker listening input={endpoints.input} broadcast={endpoints.broadcast} "
        f"control={endpoints.control}",
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
