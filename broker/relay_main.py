"""``zchat-relay``: parse the command line, then run a relay (``broker/relay.py``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from zchat.keys import KeyFileError

from .config import DEFAULT_BROADCAST, DEFAULT_INPUT, ConfigError
from .guard import ConnectionLimits
from .main import (
    CONNECTION_LIMITS,
    ENV_PREFIX,
    EXIT_BIND,
    EXIT_CONFIG,
    EXIT_OK,
    add_limits,
    add_log_level,
    env_default,
)
from .relay import Relay, RelayConfig
from .server import raise_fd_limit

__all__ = ["build_parser", "config_from_args", "main"]

DESCRIPTION = """\
A zchat relay: clients connect to it exactly as to a broker (same two
sockets, same protocol); it carries their requests to the broker over an
authenticated CURVE link and re-publishes the broker's events to them
through libzmq's proxy, subscribing upstream only to what its clients want.
Start the broker with --relay-bind, --relay-broadcast and --relay-keys (a
directory holding this relay's public key).
"""

EPILOG = f"""\
Every option can also be set by an environment variable: {ENV_PREFIX}<OPTION>,
upper case with '-' as '_' (e.g. {ENV_PREFIX}UPSTREAM=tcp://broker:5558).

Exit codes: 0 stopped cleanly (SIGINT, SIGTERM), 2 bad configuration or key
file, 3 an endpoint could not be bound.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zchat-relay", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    up = p.add_argument_group("upstream (the broker's relay link, always CURVE)")
    up.add_argument("--upstream", metavar="EP", default=env_default("upstream", None),
                    help="the broker's --relay-bind endpoint (required)")
    up.add_argument("--upstream-key", metavar="FILE", default=env_default("upstream-key", None),
                    help="the broker's public .key file (required)")
    up.add_argument("--relay-key", metavar="FILE", default=env_default("relay-key", None),
                    help="this relay's .key_secret file; its public .key must be in the "
                         "broker's --relay-keys (required)")
    up.add_argument("--upstream-broadcast", metavar="EP",
                    default=env_default("upstream-broadcast", None),
                    help="the broker's --relay-broadcast endpoint (default: what the broker "
                         "says when the relay connects)")
    ep = p.add_argument_group("endpoints for clients (as the broker's; port 0 picks one)")
    ep.add_argument("--input", metavar="EP", default=env_default("input", DEFAULT_INPUT),
                    help="ROUTER for client requests (default: %(default)s)")
    ep.add_argument("--broadcast", metavar="EP",
                    default=env_default("broadcast", DEFAULT_BROADCAST),
                    help="XPUB for room events (default: %(default)s)")
    ep.add_argument("--advertise", metavar="EP", default=env_default("advertise", None),
                    help="broadcast endpoint named to clients in `welcome` (default: the bound "
                         "port alone when bound to *)")
    sec = p.add_argument_group("client security (CURVE, as on the broker)")
    sec.add_argument("--secret-key", metavar="FILE", default=env_default("secret-key", None),
                     help="the .key_secret clients know as the server's: encrypt both client "
                          "sockets and admit only authorized clients")
    sec.add_argument("--authorized-keys", metavar="DIR",
                     default=env_default("authorized-keys", None),
                     help="directory of the public .key files of admitted clients")
    add_limits(p, "limits per connection and address (0 turns one off)", ConnectionLimits(),
               CONNECTION_LIMITS)
    p.add_argument("--max-frame", metavar="BYTES", type=int,
                   default=env_default("max-frame", 64 * 1024, int),
                   help="bytes in one client frame, as the broker's (default: %(default)s)")
    p.add_argument("--io-threads", metavar="N", type=int,
                   default=env_default("io-threads", 1, int),
                   help="libzmq I/O threads (default: %(default)s)")
    add_log_level(p)
    return p


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    missing = [flag for flag, value in (("--upstream", args.upstream),
                                        ("--upstream-key", args.upstream_key),
                                        ("--relay-key", args.relay_key)) if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (the link to the broker is CURVE)")
    for option in CONNECTION_LIMITS:
        if getattr(args, option.dest) < 0:
            raise ConfigError(f"--{option.flag} must not be negative")
    return RelayConfig(
        upstream=args.upstream, upstream_key=args.upstream_key, relay_key=args.relay_key,
        input=args.input, broadcast=args.broadcast, advertise=args.advertise,
        upstream_broadcast=args.upstream_broadcast,
        secret_key=args.secret_key, authorized_keys=args.authorized_keys,
        connections=ConnectionLimits(
            **{option.field: getattr(args, option.dest) for option in CONNECTION_LIMITS}),
        max_frame=args.max_frame, io_threads=args.io_threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"zchat-relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    raise_fd_limit()
    relay = Relay(config)
    try:
        endpoints = relay.bind()
    except KeyFileError as exc:
        print(f"zchat-relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"zchat-relay: {exc}", file=sys.stderr)
        return EXIT_BIND
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: relay.stop())
    # One machine-readable line on stdout, as the broker's.
    print(f"zchat-relay listening input={endpoints.input} broadcast={endpoints.broadcast} "
          f"upstream={config.upstream}", flush=True)
    relay.run()
    logging.getLogger("zchat.relay").info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
