"""The exceptions zchat raises, in one tree.

::

    ZchatError
    ├── ProtocolError          a peer sent something the protocol forbids
    │                          (code: one of the protocol's error codes)
    ├── HistoryError           the history store failed (cannot open, read
    │                          or write its database)
    └── ClientError            raised by the client library
        ├── RequestFailed      the broker answered a request with ``error``
        │   │                  (or with a reply we cannot read: ``bad_reply``)
        │   ├── NameTaken
        │   ├── RateLimited
        │   └── NoSuchUser
        ├── BrokerUnreachable  no answer from the broker in time
        │   └── HandshakeFailed  it answered, but the connection's handshake
        │                        failed (wrong server key, key not accepted)
        └── ClientClosed       the client was closed (or kicked, replaced)

``ProtocolError`` is what the broker catches around one peer's frame: it
answers that peer with ``error`` and carries on. ``HistoryError`` is the one
error of the store, whatever SQLite said: at start the broker exits 4; a
failed read costs one request (``unavailable``); a failed write stops the
broker without acking what it could not store. The client library raises
``RequestFailed`` subclasses so that bot authors can catch what they expect.

Whose fault: a ``ProtocolError`` is always the peer's (the broker raises it
for a client's frame, the client session for a broker's reply, as code
``bad_reply``, and then fails that one request as ``RequestFailed``);
``HistoryError`` and ``BrokerUnreachable`` are the environment's; a bug of
our own is none of these (the broker answers ``internal``, the client
closes as "internal error").
"""

from __future__ import annotations

__all__ = [
    "BrokerUnreachable",
    "ClientClosed",
    "ClientError",
    "HandshakeFailed",
    "HistoryError",
    "NameTaken",
    "NoSuchUser",
    "ProtocolError",
    "RateLimited",
    "RequestFailed",
    "ZchatError",
]


class ZchatError(Exception):
    """The base of every exception zchat raises."""


class ProtocolError(ZchatError):
    """A peer broke the protocol; ``code`` is the wire error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class HistoryError(ZchatError):
    """The history store cannot be opened, read or written."""


class ClientError(ZchatError):
    """Something the client library could not do."""


class RequestFailed(ClientError):
    """The broker refused a request with an ``error`` reply."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @staticmethod
    def from_reply(code: str, detail: str) -> RequestFailed:
        """The most specific subclass for an error code.

        ``code`` becomes an ``ErrorCode`` when this version knows it (it
        still compares equal to the plain string), so callers match on the
        enum; a code from a newer broker stays a plain ``str``.
        """
        from zchat.protocol import ErrorCode

        known = ErrorCode._value2member_map_.get(code)
        cls = _by_code().get(code, RequestFailed)
        return cls(known if isinstance(known, ErrorCode) else code, detail)


class NameTaken(RequestFailed):
    """``name_taken``: another live client holds the name."""


class RateLimited(RequestFailed):
    """``rate_limited``: slow down; the message was not delivered."""


class NoSuchUser(RequestFailed):
    """``no_such_user``: nobody of that name is joined."""


class BrokerUnreachable(ClientError):
    """The broker did not answer in time."""


class HandshakeFailed(BrokerUnreachable):
    """A broker is there, but the ZeroMQ handshake with it failed.

    With CURVE this is a wrong server key or a client key the broker does
    not accept; without keys, a broker that encrypts. Retrying cannot help.
    """


class ClientClosed(ClientError):
    """The client is closed, or the broker said ``bye`` to it."""

    def __init__(self, reason: str = "closed") -> None:
        super().__init__(reason)
        self.reason = reason


def _by_code() -> dict[str, type[RequestFailed]]:
    # Imported here: zchat.protocol raises ProtocolError, so it imports us.
    from zchat.protocol import ErrorCode

    return {
        ErrorCode.NAME_TAKEN: NameTaken,
        ErrorCode.RATE_LIMITED: RateLimited,
        ErrorCode.NO_SUCH_USER: NoSuchUser,
    }
