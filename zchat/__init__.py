"""zchat: a chat system on ZeroMQ.

The library holds the wire protocol (``zchat.protocol``), the broker's logic
(``zchat.state``) and the client API (``zchat.client``). The broker program is
``zchat.broker``; the client programs are ``zchat.clients``.

The client classes are imported on first use (module ``__getattr__``), so
``import zchat.protocol`` costs neither ``zmq`` nor ``asyncio``.
"""

import typing

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
    ClientStatus,
    Direct,
    Entered,
    ErrorCode,
    Event,
    Invited,
    Joined,
    Joins,
    Left,
    Member,
    Message,
    ModeChanged,
    Notice,
    OtherEvent,
    RoomInfo,
    TopicChanged,
    Welcome,
)

if typing.TYPE_CHECKING:
    from zchat.client import AsyncClient, Client, RoomState, Status

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "ROOM",
    "AsyncClient",
    "BrokerUnreachable",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientStatus",
    "Direct",
    "Entered",
    "ErrorCode",
    "Event",
    "HandshakeFailed",
    "Invited",
    "Joined",
    "Joins",
    "Left",
    "Member",
    "Message",
    "ModeChanged",
    "NameTaken",
    "NoSuchUser",
    "Notice",
    "OtherEvent",
    "ProtocolError",
    "RateLimited",
    "RequestFailed",
    "RoomInfo",
    "RoomState",
    "Status",
    "TopicChanged",
    "Welcome",
    "ZchatError",
    "__version__",
]

_FROM_CLIENT = ("AsyncClient", "Client", "RoomState", "Status")


def __getattr__(name: str) -> typing.Any:
    if name not in _FROM_CLIENT:
        raise AttributeError(f"module 'zchat' has no attribute {name!r}")
    from zchat import client

    # All at once: afterwards they are plain attributes, as if imported above.
    for each in _FROM_CLIENT:
        globals()[each] = getattr(client, each)
    return globals()[name]

