"""The broker's settings, and checks on them that need no sockets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from zchat.state import Limits

from .guard import ConnectionLimits

__all__ = ["Config", "ConfigError", "check_control_endpoint"]

DEFAULT_INPUT = "tcp://*:5555"
DEFAULT_BROADCAST = "tcp://*:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


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
    coalesce: int = 0  # most events per batch frame on BATCH_TOPIC; 0: no batches
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)

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
        check_control_endpoint(self.control)


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
