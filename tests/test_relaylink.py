"""The relay link's pure pieces: meta frames and relayed peer ids (no sockets)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zchat.broker.relaylink import MAX_META, RELAYED, is_relayed, pack_meta, unpack_meta
from zchat.errors import ProtocolError


def test_meta_round_trips() -> None:
    assert unpack_meta(pack_meta("203.0.113.9", None)) == ("203.0.113.9", None)
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    assert unpack_meta(pack_meta("::1", key)) == ("::1", key)


@pytest.mark.parametrize("raw", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"addr": 5, "key": None}),
    msgpack.packb({"addr": "a", "key": 7}), msgpack.packb({1: "a"}),
    msgpack.packb({"addr": "a" * MAX_META, "key": None}),
])
def test_a_bad_meta_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_meta(raw)


@given(st.binary(max_size=2 * MAX_META))
def test_any_bytes_are_meta_or_a_protocol_error(raw: bytes) -> None:
    try:
        addr, key = unpack_meta(raw)
    except ProtocolError:
        return
    assert isinstance(addr, str) and (key is None or isinstance(key, str))


def test_relayed_ids_are_none_a_direct_connection_can_have() -> None:
    # libzmq's own ids are 0x00 + 4 bytes; zchat's library uses b"z" + 15 bytes.
    assert not is_relayed(b"\x00\xff\x00\x00\x01")
    assert not is_relayed(b"z" + bytes(15))
    assert not is_relayed(RELAYED + bytes(4))  # a slot and no client id
    assert is_relayed(RELAYED + bytes(4) + b"z")
