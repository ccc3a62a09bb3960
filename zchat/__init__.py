"""zchat: a chat system on ZeroMQ.

The library holds the wire protocol (``zchat.protocol``), the broker's logic
(``zchat.state``) and the client API (``zchat.client``). The broker program is
``zchat.broker``; the client programs are ``zchat.clients``.
"""

from zchat.client import AsyncClient, Client, Status, Welcome
from zchat.errors import (
    BrokerUnreachable,
    ClientClosed,
    ClientError,
    HandshakeFailed,
    NameTaken,
    NoSuchUser,
    ProtocolError,
    RateLimited,
    RequestFailed,
    ZchatError,
)
from zchat.protocol import (
    PROTOCOL_VERSION,
    ROOM,
    Direct,
    Event,
    Joined,
    Left,
    Member,
    Message,
    Notice,
    OtherEvent,
)

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "ROOM",
    "AsyncClient",
    "BrokerUnreachable",
    "Client",
    "ClientClosed",
    "ClientError",
    "Direct",
    "Event",
    "HandshakeFailed",
    "Joined",
    "Left",
    "Member",
    "Message",
    "NameTaken",
    "NoSuchUser",
    "Notice",
    "OtherEvent",
    "ProtocolError",
    "RateLimited",
    "RequestFailed",
    "Status",
    "Welcome",
    "ZchatError",
    "__version__",
]
