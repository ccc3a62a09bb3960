"""The broker's settings, and checks on them that need no sockets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from zchat.state import Limits

from .guard import ConnectionLimits
from .relaylink import RelayLinkConfig

__all__ = ["Config", "ConfigError", "check_control_endpoint", "check_endpoint"]

DEFAULT_INPUT = "tcp://*:5555"
DEFAULT_BROADCAST = "tcp://*:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


DEFAULT_COALESCE: Final = 64  # events per batch frame unless --coalesce says otherwise


@dataclass(frozen=True, slots=True)
class Config:
    """Everything ``zchat-broker`` can be told (see ``zchat-broker --help``)."""

    input: str = DEFAULT_INPUT
    broadcast: str = DEFAULT_BROADCAST
    control: str = DEFAULT_CONTROL
    heartbeat: float = 5.0
    limits: Limits = field(default_factory=Limits)
    hide_addresses: bool = False
    advertise: str | None = None  # the broadcast endpoint `welcome` names
    quiet: bool = False  # do not print chat lines on stdout
    io_threads: int = 1
    db: str | None = None  # history database; None: the default path; ":memory:": none
    retention: float = 0.0  # seconds an event is kept in history; 0: by count only
    fsync: bool = False  # survive power loss too (an fsync per commit)
    secret_key: str | None = None  # CURVE: the broker's .key_secret file
    authorized_keys: str | None = None  # CURVE: directory of admitted clients' .key files
    # Most events per batch frame on each room's batch topic; 0: no batches.
    # On by default: at 1,000 subscribers one frame per pass instead of one
    # per event is what lets the broker outrun per-event forwarding in C.
    coalesce: int = DEFAULT_COALESCE
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    relay: RelayLinkConfig | None = None  # --relay-bind: where relays connect, and who may

    def __post_init__(self) -> None:
        if not self.heartbeat > 0:
            raise ConfigError(f"heartbeat must be positive, not {self.heartbeat}")
        if (self.secret_key is None) != (self.authorized_keys is None):
            raise ConfigError("--secret-key and --authorized-keys go together")
        if self.retention < 0:
            raise ConfigError("retention must not be negative")
        if self.coalesce < 0:
            raise ConfigError("coalesce must not be negative")
        if self.io_threads < 1:
            raise ConfigError("io-threads must be at least 1")
        conn = self.connections
        if min(conn.per_address, conn.join_timeout, conn.max_backlog, conn.max_subscribe,
               conn.stall) < 0:
            raise ConfigError("connection limits must not be negative")
        check_endpoint("input", self.input)
        check_endpoint("broadcast", self.broadcast)
        check_endpoint("control", self.control)
        check_control_endpoint(self.control)


def check_endpoint(role: str, endpoint: str) -> None:
    """Refuse an endpoint that libzmq would reject, before any socket exists.

    libzmq says only "Invalid argument" for ``46131`` or ``tcp://host`` (no
    port), which would read as a port that could not be bound (exit 3);
    this names the setting and the form it needs, a configuration error.
    """
    scheme, sep, rest = endpoint.partition("://")
    if sep and scheme in ("ipc", "inproc"):
        if rest:
            return
        what = "PATH" if scheme == "ipc" else "NAME"
        raise ConfigError(f"{role} endpoint {endpoint!r}: expected {scheme}://{what}")
    if not sep or scheme != "tcp":
        raise ConfigError(
            f"{role} endpoint {endpoint!r}: expected tcp://HOST:PORT, ipc://PATH or "
            "inproc://NAME"
        )
    host, colon, port = rest.rpartition(":")
    # A port is a number, or * for "any free one" as libzmq allows; HOST is
    # an address, a name, an interface or * for all of them.
    if not colon or not host or any(c.isspace() for c in rest) or not (
        port == "*" or (port.isascii() and port.isdigit() and int(port) <= 65535)
    ):
        raise ConfigError(
            f"{role} endpoint {endpoint!r}: expected tcp://HOST:PORT (PORT 0 picks a free one)"
        )


def check_control_endpoint(endpoint: str) -> None:
    """Refuse an operator endpoint that anyone on the network could reach."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return
    if scheme != "tcp":
        raise ConfigError(f"control endpoint {endpoint!r}: use tcp://127.0.0.1:PORT or ipc://PATH")
    if ";" in rest:
        # libzmq reads "SOURCE;ADDRESS" and binds ADDRESS: what precedes ';'
        # would pass the loopback check while the socket listens elsewhere.
        raise ConfigError(f"control endpoint {endpoint!r}: one address only (no ';')")
    try:
        host = urlsplit(f"tcp://{rest}").hostname or ""
    except ValueError:
        host = ""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"control endpoint {endpoint!r} is not loopback: the operator channel can stop "
            "the broker, so it listens on 127.0.0.1, [::1] or ipc:// only"
        )
