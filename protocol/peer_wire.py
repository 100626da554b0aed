"""BitTorrent peer wire protocol (BEP 3, fast extension BEP 6, extension protocol BEP 10).

Theory of operation
-------------------

A :class:`PeerConnection` is the state of *one* TCP connection between two
peers, without the TCP connection: the caller feeds it the bytes it read with
:meth:`~PeerConnection.receive_data` (``b""`` for end of file), pulls decoded
events with :meth:`~PeerConnection.next_event`, and turns the events it wants
to send into bytes with :meth:`~PeerConnection.send`. Nothing here reads a
socket, starts a task or looks at a clock; keep-alive timers, request
pipelining, choking policy and piece verification belong to the caller.

The wire has two phases.

1. **Handshake**, 68 bytes each way::

       u8 19  "BitTorrent protocol"  8s reserved  20s info_hash  20s peer_id

   The first event ``next_event`` returns is always the peer's
   :class:`Handshake`. Its 20-byte prefix is checked *byte by byte as it
   arrives*: a first byte other than 19, or any wrong byte of the protocol
   string, raises ``RemoteProtocolError("bad_handshake")`` at once, without
   waiting for 68 bytes. This matters for interop: aria2 opens every outgoing
   connection with an encrypted (MSE) handshake, which looks like random
   bytes, and falls back to the plain handshake only once the other side has
   closed; a peer that waited for 68 bytes would sit on the connection until
   aria2's timeout.

   The initiator sends its handshake first; the receiver reads the peer's
   handshake, checks the info-hash is one it serves, then sends its own with
   the same info-hash (``send`` refuses another one). A handshake received
   after ours must carry our info-hash (``wrong_info_hash``). The reserved
   bytes of both handshakes decide which extensions the connection may use:
   the fast extension (BEP 6, ``reserved[7] & 0x04``) and the extension
   protocol (BEP 10, ``reserved[5] & 0x10``) are *negotiated* only when both
   sides set the bit (and, for fast, the connection was made with
   ``fast=True``). :attr:`PeerConnection.fast` and
   :attr:`PeerConnection.extensions` say which; both are False until both
   handshakes are known.

2. **Messages**: ``u32 length`` (big-endian, counting the id byte and the
   payload), then ``u8 id`` and the payload; length 0 is a keep-alive::

       id  message          payload
        0  Choke            -
        1  Unchoke          -
        2  Interested       -
        3  NotInterested    -
        4  Have             u32 index
        5  Bitfield         one bit per piece, high bit of byte 0 = piece 0
        6  Request          u32 index  u32 begin  u32 length
        7  Piece            u32 index  u32 begin  block
        8  Cancel           u32 index  u32 begin  u32 length
        9  Port             u16 port                     (BEP 5, DHT)
       13  SuggestPiece     u32 index                    (BEP 6)
       14  HaveAll          -                            (BEP 6)
       15  HaveNone         -                            (BEP 6)
       16  RejectRequest    u32 index  u32 begin  u32 length  (BEP 6)
       17  AllowedFast      u32 index                    (BEP 6)
       20  Extended         u8 ext_id  payload           (BEP 10)

Receive-side validation, in the order the bytes allow it:

* as soon as the four length bytes are in: a length above ``max_message`` is
  ``too_long`` (nothing of the body is buffered);
* as soon as the id byte is in: a fast message when fast is not negotiated, or
  an Extended message when the extension protocol is not, is ``unexpected``;
  a payload size that does not fit the id is ``bad_length`` (fixed-size
  messages must be exact; a Piece block must be 1..``max_block`` bytes);
* with the whole message: Request/Cancel/RejectRequest lengths must be
  1..``max_block`` (``bad_length``); piece indices must be below
  ``num_pieces`` (``bad_index``); a Bitfield must be exactly
  ``ceil(num_pieces / 8)`` bytes with the spare bits of the last byte clear
  (``bad_bitfield``); Bitfield, HaveAll and HaveNone may each come once, and
  before any Have (``unexpected``): a second one would silently replace what
  the caller knows of the peer.

Port (BEP 5) is accepted whether or not the DHT bit was set: libtorrent 2.1
sets it even with its DHT turned off. We never set it.

Unknown message ids are **ignored**, as BEP 3 asks: their payload (bounded by
``max_message`` like any other) is skipped and counted in
:attr:`PeerConnection.ignored_messages`. This keeps us compatible with peers
that speak extensions we do not (BEP 52 hash messages, old Azureus ids)
without giving up any bound.

Magnet downloads learn the piece count only after the metadata arrives, so
``num_pieces`` may be ``None`` at first. Until :meth:`set_num_pieces` is
called, indices and bitfields cannot be checked; the connection remembers the
largest index received and the size and last byte of the bitfield (if any),
and ``set_num_pieces`` checks them then, raising the same
``RemoteProtocolError`` (``bad_index`` / ``bad_bitfield``) the message would
have raised had the count been known. Callers run ``set_num_pieces`` inside
the same ``except ProtocolError`` as ``next_event``. (Events delivered before
that are therefore only checked for framing.)

Errors and end of file: a decoding error is raised once and then again by
every later ``next_event``; the connection is dead and the caller closes it.
``receive_data(b"")`` marks end of file: ``next_event`` returns the remaining
events, then :class:`ConnectionClosed` if the peer stopped on a message
boundary (or before sending anything), or raises ``truncated`` if it stopped
inside the handshake or a message.

Performance: received bytes go into one ``bytearray`` read through an offset;
consumed bytes are dropped (one ``memmove`` of the unread tail) only when a
new chunk arrives and more than 64 KiB were consumed, so decoding a long run
of messages is linear. A Piece's block is copied out exactly once, from a
``memoryview``. Measured on a 2-core development VM: 256 MiB of 16 KiB Piece
messages fed in 64 KiB reads decode at about 4 GB/s (best of 5, ~4 µs per
message; 1.6-3 GB/s while the machine was busy), far above any link.
The buffer holds at most one message plus one read as long as the caller
drains ``next_event`` until ``NEED_DATA`` after each ``receive_data``.

Extension payloads: the connection hands Extended messages over as
``(ext_id, payload)``; which id means what is agreed in the BEP 10 extended
handshake (ext_id 0), so it is the caller's business. Pure codecs for the
payloads we speak are here: :func:`encode_ext_handshake` /
:func:`decode_ext_handshake` (BEP 10), :func:`encode_metadata` /
:func:`decode_metadata` (BEP 9 ``ut_metadata``), :func:`encode_pex` /
:func:`decode_pex` (BEP 11 ``ut_pex``). They use :mod:`.bencode`, which
accepts canonical bencode only (libtorrent writes canonical dictionaries: the
interop test decodes its extended handshake).

For any input, ``next_event``, ``set_num_pieces`` and the payload decoders
return a value or raise :class:`RemoteProtocolError` with a ``reason`` in
:data:`REASONS`; misuse (sending out of order, invalid values) raises
:class:`LocalProtocolError`.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from shoal.protocol import bencode
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REASONS",
    "PROTOCOL",
    "HANDSHAKE_LENGTH",
    "RESERVED",
    "MAX_BLOCK",
    "MAX_PIECES",
    "DEFAULT_MAX_MESSAGE",
    "METADATA_PIECE",
    "MAX_METADATA_SIZE",
    "MAX_PEX_PEERS",
    "PEX_SEND_LIMIT",
    "UT_METADATA",
    "UT_PEX",
    "reserved_bytes",
    "Handshake",
    "KeepAlive",
    "Choke",
    "Unchoke",
    "Interested",
    "NotInterested",
    "Have",
    "Bitfield",
    "Request",
    "Piece",
    "Cancel",
    "Port",
    "SuggestPiece",
    "HaveAll",
    "HaveNone",
    "RejectRequest",
    "AllowedFast",
    "Extended",
    "Message",
    "Event",
    "ConnectionClosed",
    "NEED_DATA",
    "encode_handshake",
    "encode_message",
    "PeerConnection",
    "ExtHandshake",
    "encode_ext_handshake",
    "decode_ext_handshake",
    "MetadataRequest",
    "MetadataData",
    "MetadataReject",
    "MetadataMessage",
    "encode_metadata",
    "decode_metadata",
    "Pex",
    "PEX_ENCRYPTION",
    "PEX_SEED",
    "PEX_UTP",
    "PEX_HOLEPUNCH",
    "PEX_CONNECTABLE",
    "encode_pex",
    "decode_pex",
]

#: Every ``reason`` a decoder in this module can raise.
REASONS = (
    "bad_handshake",  # first bytes are not \x13BitTorrent protocol
    "wrong_info_hash",  # the handshake answering ours names another torrent
    "truncated",  # end of file inside the handshake or a message
    "too_long",  # length prefix above max_message
    "bad_length",  # payload size wrong for the id; block length 0 or > max_block
    "bad_bitfield",  # bitfield of the wrong size for num_pieces, or spare bits set
    "bad_index",  # piece index >= num_pieces
    "unexpected",  # message not allowed now (fast/extended not negotiated, 2nd bitfield)
    "bad_bencode",  # extension payload is not canonical bencode
    "bad_extension",  # BEP 10 handshake field of the wrong type or range
    "bad_metadata",  # BEP 9 message malformed or inconsistent
    "bad_pex",  # BEP 11 compact list or flags malformed
    "too_many_peers",  # BEP 11 list longer than MAX_PEX_PEERS
)

PROTOCOL = b"BitTorrent protocol"
_PREFIX = bytes([len(PROTOCOL)]) + PROTOCOL  # the 20 bytes every handshake starts with
HANDSHAKE_LENGTH = 68  # 20 prefix + 8 reserved + 20 info_hash + 20 peer_id


def reserved_bytes(*, fast: bool = False, extensions: bool = False, dht: bool = False) -> bytes:
    """The 8 reserved handshake bytes with the given extension bits set."""
    r = bytearray(8)
    if extensions:
        r[5] |= 0x10  # BEP 10
    if fast:
        r[7] |= 0x04  # BEP 6
    if dht:
        r[7] |= 0x01  # BEP 5 (we never set it: no DHT inside a cluster)
    return bytes(r)


#: Our reserved bytes: fast extension and extension protocol, no DHT.
RESERVED = reserved_bytes(fast=True, extensions=True)

# 16 KiB: the block size every current client requests, and the largest they
# serve (BEP 3: "All current implementations use 2^14 (16 kiB), and close
# connections which request an amount greater than that").
MAX_BLOCK = 16 * 1024
# 128 KiB: the largest max_block a PeerConnection may be configured with (the
# old BEP 3 upper bound for a request, 2^17).
_MAX_BLOCK_LIMIT = 128 * 1024

# 2**21 pieces: libtorrent's default limit on the pieces of a torrent it loads
# (load_torrent_limits.max_pieces, 0x200000). Its bitfield is 256 KiB.
MAX_PIECES = 2**21

#: Default bound on a message's length prefix: the bitfield of the largest
#: torrent we accept (MAX_PIECES / 8 = 256 KiB) plus its id byte. Every other
#: message is smaller: a Piece is 9 + 16 KiB, a ut_metadata data message
#: ~16.5 KiB, a ut_pex message a few KiB.
DEFAULT_MAX_MESSAGE = 1 + MAX_PIECES // 8
# 16 MiB: the largest max_message a PeerConnection may be configured with.
_MAX_MESSAGE_LIMIT = 16 * 1024 * 1024

#: BEP 9: metadata is sent in pieces of 16 KiB (the last may be shorter).
METADATA_PIECE = 16 * 1024
# 64 MiB: the info dictionary of a MAX_PIECES torrent holds 40 MiB of piece
# hashes plus its file list; anything bigger is not a torrent we accept.
MAX_METADATA_SIZE = 64 * 1024 * 1024
_MAX_METADATA_PIECES = MAX_METADATA_SIZE // METADATA_PIECE

# 200 entries per list: the ut_pex convention (BEP 11 era clients, uTorrent and
# Azureus) is at most 50 added and 50 dropped per message, but libtorrent sends
# up to 100 added peers, and a "dropped" list as long as its previous set of
# connected peers (its default connections_limit is 200). Refusing those would
# cut us off from libtorrent swarms, so we accept up to 200 per list and *send*
# at most PEX_SEND_LIMIT (encode_pex enforces it).
MAX_PEX_PEERS = 200
#: At most this many added (IPv4 + IPv6) and this many dropped peers in a pex
#: message we send: the ut_pex convention.
PEX_SEND_LIMIT = 50

#: Extension names (keys of the BEP 10 handshake's "m" dictionary).
UT_METADATA = "ut_metadata"
UT_PEX = "ut_pex"

CHOKE = 0
UNCHOKE = 1
INTERESTED = 2
NOT_INTERESTED = 3
HAVE = 4
BITFIELD = 5
REQUEST = 6
PIECE = 7
CANCEL = 8
PORT = 9
SUGGEST_PIECE = 0x0D
HAVE_ALL = 0x0E
HAVE_NONE = 0x0F
REJECT_REQUEST = 0x10
ALLOWED_FAST = 0x11
EXTENDED = 20

_U32_MAX = 2**32 - 1
# Consumed bytes are dropped from the receive buffer once there are this many:
# large enough that the memmove is rare, small against max_message.
_COMPACT_AFTER = 64 * 1024

_U32 = struct.Struct(">I")
_HAVE = struct.Struct(">IBI")  # length, id, index
_TRIPLE = struct.Struct(">IBIII")  # length, id, index, begin, length
_PIECE_HDR = struct.Struct(">IBII")  # length, id, index, begin
_PORT = struct.Struct(">IBH")
_TWO = struct.Struct(">II")
_THREE = struct.Struct(">III")


def _check_u32(name: str, value: object) -> None:
    if type(value) is not int or not 0 <= value <= _U32_MAX:
        raise LocalProtocolError(f"{name} must be an int in 0..2**32-1", reason="bad_number")


def _check_bytes(name: str, value: object) -> None:
    if type(value) is not bytes:
        raise LocalProtocolError(f"{name} must be bytes", reason="bad_type")


# ---------------------------------------------------------------------------
# Handshake and messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    """The 68-byte opening of a connection (BEP 3)."""

    info_hash: bytes
    peer_id: bytes
    reserved: bytes = RESERVED

    def __post_init__(self) -> None:
        for name, size in (("info_hash", 20), ("peer_id", 20), ("reserved", 8)):
            v = getattr(self, name)
            if type(v) is not bytes or len(v) != size:
                raise LocalProtocolError(f"{name} must be {size} bytes", reason="bad_handshake")

    @classmethod
    def with_flags(
        cls, info_hash: bytes, peer_id: bytes, *, fast: bool = True, extensions: bool = True
    ) -> Handshake:
        """A handshake offering the fast extension and/or the extension protocol."""
        return cls(info_hash, peer_id, reserved_bytes(fast=fast, extensions=extensions))

    @property
    def fast(self) -> bool:
        """The sender supports the fast extension (BEP 6)."""
        return bool(self.reserved[7] & 0x04)

    @property
    def extensions(self) -> bool:
        """The sender supports the extension protocol (BEP 10)."""
        return bool(self.reserved[5] & 0x10)

    @property
    def dht(self) -> bool:
        """The sender runs a DHT node (BEP 5) and may send Port messages."""
        return bool(self.reserved[7] & 0x01)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Choke:
    pass


@dataclass(frozen=True, slots=True)
class Unchoke:
    pass


@dataclass(frozen=True, slots=True)
class Interested:
    pass


@dataclass(frozen=True, slots=True)
class NotInterested:
    pass


@dataclass(frozen=True, slots=True)
class HaveAll:
    """BEP 6: the sender has every piece (replaces a Bitfield)."""


@dataclass(frozen=True, slots=True)
class HaveNone:
    """BEP 6: the sender has no piece (replaces a Bitfield)."""


@dataclass(frozen=True, slots=True)
class Have:
    index: int

    def __post_init__(self) -> None:
        _check_u32("index", self.index)


@dataclass(frozen=True, slots=True)
class SuggestPiece:
    """BEP 6: the sender would rather serve this piece (it is in its cache)."""

    index: int

    def __post_init__(self) -> None:
        _check_u32("index", self.index)


@dataclass(frozen=True, slots=True)
class AllowedFast:
    """BEP 6: the receiver may request this piece even while choked."""

    index: int

    def __post_init__(self) -> None:
        _check_u32("index", self.index)


@dataclass(frozen=True, slots=True)
class Bitfield:
    """The pieces the sender has: bit 7 of byte 0 is piece 0."""

    bits: bytes

    def __post_init__(self) -> None:
        _check_bytes("bits", self.bits)

    @classmethod
    def from_indices(cls, num_pieces: int, indices) -> Bitfield:
        """The bitfield of ``num_pieces`` pieces with ``indices`` set."""
        if type(num_pieces) is not int or not 0 <= num_pieces <= MAX_PIECES:
            raise LocalProtocolError("num_pieces out of range", reason="bad_number")
        bits = bytearray((num_pieces + 7) // 8)
        for i in indices:
            if type(i) is not int or not 0 <= i < num_pieces:
                raise LocalProtocolError(f"piece index {i!r} out of range", reason="bad_index")
            bits[i >> 3] |= 0x80 >> (i & 7)
        return cls(bytes(bits))

    @classmethod
    def full(cls, num_pieces: int) -> Bitfield:
        """The bitfield of a peer that has all ``num_pieces`` pieces."""
        return cls.from_indices(num_pieces, range(num_pieces))

    def has(self, index: int) -> bool:
        """Whether piece ``index`` is set (False beyond the end)."""
        byte = index >> 3
        return 0 <= byte < len(self.bits) and bool(self.bits[byte] & (0x80 >> (index & 7)))


@dataclass(frozen=True, slots=True)
class _BlockMessage:
    """A reference to one block: the shape shared by Request, Cancel and RejectRequest."""

    index: int
    begin: int
    length: int

    def __post_init__(self) -> None:
        _check_u32("index", self.index)
        _check_u32("begin", self.begin)
        _check_u32("length", self.length)


@dataclass(frozen=True, slots=True)
class Request(_BlockMessage):
    """Ask for a block."""


@dataclass(frozen=True, slots=True)
class Cancel(_BlockMessage):
    """Withdraw a Request."""


@dataclass(frozen=True, slots=True)
class RejectRequest(_BlockMessage):
    """BEP 6: the sender will not serve this request."""


@dataclass(frozen=True, slots=True)
class Piece:
    index: int
    begin: int
    block: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_u32("index", self.index)
        _check_u32("begin", self.begin)
        _check_bytes("block", self.block)


@dataclass(frozen=True, slots=True)
class Port:
    """BEP 5: the sender's DHT node listens on this UDP port."""

    port: int

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 0 <= self.port <= 65535:
            raise LocalProtocolError("port must be an int in 0..65535", reason="bad_port")


@dataclass(frozen=True, slots=True)
class Extended:
    """BEP 10: an extension message; ext_id 0 is the extended handshake."""

    ext_id: int
    payload: bytes

    def __post_init__(self) -> None:
        if type(self.ext_id) is not int or not 0 <= self.ext_id <= 255:
            raise LocalProtocolError("ext_id must be an int in 0..255", reason="bad_number")
        _check_bytes("payload", self.payload)


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the connection on a message boundary."""


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event`` has no complete event yet: feed more bytes.
NEED_DATA = _Sentinel("NEED_DATA")

Message = (
    KeepAlive | Choke | Unchoke | Interested | NotInterested | Have | Bitfield | Request | Piece
    | Cancel | Port | SuggestPiece | HaveAll | HaveNone | RejectRequest | AllowedFast | Extended
)
Event = Handshake | Message | ConnectionClosed

_KEEPALIVE = KeepAlive()
_NO_PAYLOAD: dict[int, Message] = {
    CHOKE: Choke(),
    UNCHOKE: Unchoke(),
    INTERESTED: Interested(),
    NOT_INTERESTED: NotInterested(),
    HAVE_ALL: HaveAll(),
    HAVE_NONE: HaveNone(),
}
_NO_PAYLOAD_BYTES = {type(ev): _U32.pack(1) + bytes([mid]) for mid, ev in _NO_PAYLOAD.items()}
_FAST_IDS = frozenset((SUGGEST_PIECE, HAVE_ALL, HAVE_NONE, REJECT_REQUEST, ALLOWED_FAST))
_FAST_TYPES = (SuggestPiece, HaveAll, HaveNone, RejectRequest, AllowedFast)
_TRIPLE_IDS: dict[type, int] = {Request: REQUEST, Cancel: CANCEL, RejectRequest: REJECT_REQUEST}
_INDEX_IDS: dict[type, int] = {Have: HAVE, SuggestPiece: SUGGEST_PIECE, AllowedFast: ALLOWED_FAST}

# (smallest, largest) length prefix of each known id; None = depends on max_block.
_LENGTHS: dict[int, tuple[int, int]] = {
    CHOKE: (1, 1),
    UNCHOKE: (1, 1),
    INTERESTED: (1, 1),
    NOT_INTERESTED: (1, 1),
    HAVE: (5, 5),
    BITFIELD: (1, _U32_MAX),  # its size is checked against num_pieces
    REQUEST: (13, 13),
    CANCEL: (13, 13),
    PORT: (3, 3),
    SUGGEST_PIECE: (5, 5),
    HAVE_ALL: (1, 1),
    HAVE_NONE: (1, 1),
    REJECT_REQUEST: (13, 13),
    ALLOWED_FAST: (5, 5),
    EXTENDED: (2, _U32_MAX),  # the ext_id byte, then any payload
}


def encode_handshake(h: Handshake) -> bytes:
    """The 68 wire bytes of a handshake (no state checks)."""
    if type(h) is not Handshake:
        raise LocalProtocolError("not a Handshake", reason="bad_type")
    return _PREFIX + h.reserved + h.info_hash + h.peer_id


def encode_message(event: Message) -> bytes:
    """The wire bytes of one message (no state checks: see :meth:`PeerConnection.send`)."""
    t = type(event)
    if t is Piece:
        block = event.block  # type: ignore[union-attr]
        if len(block) > _U32_MAX - 9:
            raise LocalProtocolError("block too long", reason="bad_length")
        index, begin = event.index, event.begin  # type: ignore[union-attr]
        return _PIECE_HDR.pack(9 + len(block), PIECE, index, begin) + block
    mid = _TRIPLE_IDS.get(t)
    if mid is not None:
        e = event
        return _TRIPLE.pack(13, mid, e.index, e.begin, e.length)  # type: ignore[union-attr]
    mid = _INDEX_IDS.get(t)
    if mid is not None:
        return _HAVE.pack(5, mid, event.index)  # type: ignore[union-attr]
    raw = _NO_PAYLOAD_BYTES.get(t)
    if raw is not None:
        return raw
    if t is KeepAlive:
        return b"\x00\x00\x00\x00"
    if t is Bitfield:
        bits = event.bits  # type: ignore[union-attr]
        if len(bits) > _U32_MAX - 1:
            raise LocalProtocolError("bitfield too long", reason="bad_length")
        return _U32.pack(1 + len(bits)) + bytes([BITFIELD]) + bits
    if t is Port:
        return _PORT.pack(3, PORT, event.port)  # type: ignore[union-attr]
    if t is Extended:
        payload = event.payload  # type: ignore[union-attr]
        if len(payload) > _U32_MAX - 2:
            raise LocalProtocolError("payload too long", reason="bad_length")
        ext_id = event.ext_id  # type: ignore[union-attr]
        return _U32.pack(2 + len(payload)) + bytes([EXTENDED, ext_id]) + payload
    raise LocalProtocolError(f"{t.__name__} is not a peer wire message", reason="bad_type")


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class PeerConnection:
    """Sans-IO state of one peer wire connection (see the module docstring)."""

    def __init__(
        self,
        *,
        num_pieces: int | None = None,
        max_block: int = MAX_BLOCK,
        max_message: int = DEFAULT_MAX_MESSAGE,
        fast: bool = True,
    ) -> None:
        if type(max_block) is not int or not 1 <= max_block <= _MAX_BLOCK_LIMIT:
            raise LocalProtocolError(
                f"max_block must be in 1..{_MAX_BLOCK_LIMIT}", reason="bad_limit"
            )
        if type(max_message) is not int or not 9 + max_block <= max_message <= _MAX_MESSAGE_LIMIT:
            # A Piece carrying a full block must fit.
            raise LocalProtocolError(
                f"max_message must be in {9 + max_block}..{_MAX_MESSAGE_LIMIT}", reason="bad_limit"
            )
        self.max_block = max_block
        self.max_message = max_message
        self._fast_enabled = bool(fast)
        self._num_pieces: int | None = None
        if num_pieces is not None:
            self._num_pieces = _valid_num_pieces(num_pieces)

        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already consumed
        self._eof = False
        self._error: RemoteProtocolError | None = None

        self.our_handshake: Handshake | None = None
        self.their_handshake: Handshake | None = None
        #: Both sides set the fast-extension bit (and fast=True was passed).
        self.fast = False
        #: Both sides set the extension-protocol bit (BEP 10).
        self.extensions = False
        #: The four BEP 3 state flags, as last sent / received.
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        #: Messages with an id we do not know, skipped (see the docstring).
        self.ignored_messages = 0

        # Have-state ordering: Bitfield/HaveAll/HaveNone at most once, before any Have.
        self._their_have_state = False
        self._our_have_state = False
        # Deferred checks while num_pieces is unknown.
        self._max_index = -1
        self._bitfield_size: int | None = None
        self._bitfield_last = 0

    # -- state ---------------------------------------------------------------

    @property
    def num_pieces(self) -> int | None:
        return self._num_pieces

    def set_num_pieces(self, n: int) -> None:
        """Set the piece count (once), then check what was received without it.

        Raises RemoteProtocolError (``bad_index``/``bad_bitfield``) if the peer
        sent an index or a bitfield that does not fit ``n`` pieces.
        """
        n = _valid_num_pieces(n)
        if self._num_pieces is not None:
            if n != self._num_pieces:
                raise LocalProtocolError("num_pieces is already set", reason="bad_state")
            return
        self._num_pieces = n
        if self._max_index >= n:
            self._fail(f"piece index {self._max_index} >= {n} pieces", "bad_index")
        if self._bitfield_size is not None:
            self._check_bitfield(self._bitfield_size, self._bitfield_last)

    @property
    def closed(self) -> bool:
        """End of file was received."""
        return self._eof

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` means end of file."""
        if self._eof:
            if data:
                raise LocalProtocolError("data after end of file", reason="bad_state")
            return
        if not data:
            self._eof = True
            return
        buf = self._buf
        pos = self._pos
        if pos:
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos >= _COMPACT_AFTER:
                del buf[:pos]
                self._pos = 0
        buf += data

    def next_event(self) -> Event | _Sentinel:
        """The next event, ``NEED_DATA``, or ``ConnectionClosed()`` after end of file."""
        if self._error is not None:
            raise RemoteProtocolError(str(self._error), reason=self._error.reason)
        if self.their_handshake is None:
            return self._next_handshake()

        buf = self._buf
        while True:
            pos = self._pos
            avail = len(buf) - pos
            if avail < 4:
                return self._short(avail)
            length = _U32.unpack_from(buf, pos)[0]
            if length == 0:
                self._pos = pos + 4
                return _KEEPALIVE
            if length > self.max_message:
                self._fail(f"message of {length} bytes exceeds {self.max_message}", "too_long")
            if avail < 5:
                return self._short(avail)
            mid = buf[pos + 4]

            # Piece first: it is nearly all of the traffic.
            if mid == PIECE:
                if not 10 <= length <= 9 + self.max_block:
                    self._fail(f"piece message of length {length}", "bad_length")
                end = pos + 4 + length
                if len(buf) < end:
                    return self._short(avail)
                index, begin = _TWO.unpack_from(buf, pos + 5)
                self._index(index)
                with memoryview(buf) as mv:
                    block = bytes(mv[pos + 13 : end])
                self._pos = end
                return Piece(index, begin, block)

            bounds = _LENGTHS.get(mid)
            if bounds is not None:
                break
            # Unknown id: skip its payload (bounded by max_message above).
            if avail < 4 + length:
                return self._short(avail)
            self._pos = pos + 4 + length
            self.ignored_messages += 1

        if mid in _FAST_IDS and not self.fast:
            self._fail(f"fast-extension message {mid} without negotiation", "unexpected")
        if mid == EXTENDED and not self.extensions:
            self._fail("extended message without negotiation", "unexpected")
        if not bounds[0] <= length <= bounds[1]:
            self._fail(f"message {mid} of length {length}", "bad_length")
        end = pos + 4 + length
        if len(buf) < end:
            return self._short(avail)
        p = pos + 5

        if mid <= NOT_INTERESTED or mid in (HAVE_ALL, HAVE_NONE):
            if mid in (HAVE_ALL, HAVE_NONE):
                self._have_state()
            elif mid == CHOKE:
                self.peer_choking = True
            elif mid == UNCHOKE:
                self.peer_choking = False
            elif mid == INTERESTED:
                self.peer_interested = True
            else:
                self.peer_interested = False
            event = _NO_PAYLOAD[mid]
        elif mid in (REQUEST, CANCEL, REJECT_REQUEST):
            index, begin, blen = _THREE.unpack_from(buf, p)
            if not 1 <= blen <= self.max_block:
                self._fail(f"block length {blen}", "bad_length")
            self._index(index)
            cls = Request if mid == REQUEST else Cancel if mid == CANCEL else RejectRequest
            event = cls(index, begin, blen)
        elif mid in (HAVE, SUGGEST_PIECE, ALLOWED_FAST):
            index = _U32.unpack_from(buf, p)[0]
            self._index(index)
            if mid == HAVE:
                self._their_have_state = True
                event = Have(index)
            else:
                event = SuggestPiece(index) if mid == SUGGEST_PIECE else AllowedFast(index)
        elif mid == BITFIELD:
            self._have_state()
            bits = bytes(buf[p:end])
            if self._num_pieces is not None:
                self._check_bitfield(len(bits), bits[-1] if bits else 0)
            else:
                self._bitfield_size = len(bits)
                self._bitfield_last = bits[-1] if bits else 0
            event = Bitfield(bits)
        elif mid == EXTENDED:
            event = Extended(buf[p], bytes(buf[p + 1 : end]))
        else:  # PORT
            event = Port(int.from_bytes(buf[p : p + 2], "big"))
        self._pos = end
        return event

    def _next_handshake(self):
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        n = min(avail, len(_PREFIX))
        if buf[pos : pos + n] != _PREFIX[:n]:
            self._fail("not a BitTorrent handshake", "bad_handshake")
        if avail < HANDSHAKE_LENGTH:
            return self._short(avail)
        p = pos + len(_PREFIX)
        reserved = bytes(buf[p : p + 8])
        h = Handshake(bytes(buf[p + 8 : p + 28]), bytes(buf[p + 28 : p + 48]), reserved)
        if self.our_handshake is not None and h.info_hash != self.our_handshake.info_hash:
            self._fail("handshake for another torrent", "wrong_info_hash")
        self._pos = pos + HANDSHAKE_LENGTH
        self.their_handshake = h
        self._negotiate()
        return h

    def _short(self, avail: int):
        if not self._eof:
            return NEED_DATA
        if avail == 0:
            return ConnectionClosed()
        self._fail("end of file inside a message", "truncated")

    def _fail(self, message: str, reason: str):
        self._error = RemoteProtocolError(message, reason=reason)
        raise RemoteProtocolError(message, reason=reason)

    def _index(self, index: int) -> None:
        n = self._num_pieces
        if n is None:
            if index > self._max_index:
                self._max_index = index
        elif index >= n:
            self._fail(f"piece index {index} >= {n} pieces", "bad_index")

    def _have_state(self) -> None:
        # BEP 3 puts the Bitfield first, and BEP 6's HaveAll/HaveNone take its
        # place, but aria2 sends HaveNone and later a second piece-state
        # message. A later one is accepted and *replaces* the peer's state;
        # the caller treats it that way.
        self._their_have_state = True

    def _check_bitfield(self, size: int, last: int) -> None:
        n = self._num_pieces
        assert n is not None
        if size != (n + 7) // 8:
            self._fail(f"bitfield of {size} bytes for {n} pieces", "bad_bitfield")
        if n & 7 and last & (0xFF >> (n & 7)):
            self._fail("bitfield has spare bits set", "bad_bitfield")

    def _negotiate(self) -> None:
        ours, theirs = self.our_handshake, self.their_handshake
        if ours is not None and theirs is not None:
            self.fast = self._fast_enabled and ours.fast and theirs.fast
            self.extensions = ours.extensions and theirs.extensions

    # -- sending ----------------------------------------------------------------

    def send(self, event) -> bytes:
        """The bytes for ``event``; raises LocalProtocolError if it may not be sent now."""
        t = type(event)
        if t is Handshake:
            if self.our_handshake is not None:
                raise LocalProtocolError("handshake already sent", reason="bad_state")
            theirs = self.their_handshake
            if theirs is not None and theirs.info_hash != event.info_hash:
                raise LocalProtocolError(
                    "our handshake must name their torrent", reason="wrong_info_hash"
                )
            self.our_handshake = event
            self._negotiate()
            return encode_handshake(event)
        if self.our_handshake is None:
            raise LocalProtocolError("send the handshake first", reason="bad_state")
        if t is Piece:
            if not 1 <= len(event.block) <= self.max_block:
                raise LocalProtocolError("block must be 1..max_block bytes", reason="bad_length")
            self._our_index(event.index)
            return encode_message(event)
        if t in _FAST_TYPES and not self.fast:
            raise LocalProtocolError(f"{t.__name__} needs the fast extension", reason="unexpected")
        if t is Extended and not self.extensions:
            raise LocalProtocolError("Extended needs the extension protocol", reason="unexpected")
        if t in _TRIPLE_IDS:
            if not 1 <= event.length <= self.max_block:
                raise LocalProtocolError("length must be 1..max_block", reason="bad_length")
            self._our_index(event.index)
        elif t in _INDEX_IDS:
            self._our_index(event.index)
            if t is Have:
                self._our_have_state = True
        elif t is Bitfield or t is HaveAll or t is HaveNone:
            if self._our_have_state:
                raise LocalProtocolError("piece state already sent", reason="unexpected")
            if t is Bitfield:
                n = self._num_pieces
                if n is None:
                    raise LocalProtocolError("bitfield needs num_pieces", reason="bad_state")
                bits = event.bits
                if len(bits) != (n + 7) // 8 or (n & 7 and bits[-1] & (0xFF >> (n & 7))):
                    raise LocalProtocolError(
                        "bitfield does not fit num_pieces", reason="bad_bitfield"
                    )
            self._our_have_state = True
        elif t is Choke:
            self.am_choking = True
        elif t is Unchoke:
            self.am_choking = False
        elif t is Interested:
            self.am_interested = True
        elif t is NotInterested:
            self.am_interested = False
        return encode_message(event)

    def piece_header(self, index: int, begin: int, length: int) -> bytes:
        """The 13 bytes that go before a ``length``-byte block in a Piece message.

        The same checks as ``send(Piece(...))``; the caller writes the block
        itself right after (a slice of a cached piece, sent by scatter-gather
        without being copied into a message first).
        """
        if self.our_handshake is None:
            raise LocalProtocolError("send the handshake first", reason="bad_state")
        if type(length) is not int or not 1 <= length <= self.max_block:
            raise LocalProtocolError("block must be 1..max_block bytes", reason="bad_length")
        _check_u32("index", index)
        _check_u32("begin", begin)
        self._our_index(index)
        return _PIECE_HDR.pack(9 + length, PIECE, index, begin)

    def _our_index(self, index: int) -> None:
        n = self._num_pieces
        if n is not None and index >= n:
            raise LocalProtocolError(f"piece index {index} >= {n} pieces", reason="bad_index")


def _valid_num_pieces(n: object) -> int:
    if type(n) is not int or not 1 <= n <= MAX_PIECES:
        raise LocalProtocolError(
            f"num_pieces must be an int in 1..{MAX_PIECES}", reason="bad_number"
        )
    return n


# ---------------------------------------------------------------------------
# Extension payloads
# ---------------------------------------------------------------------------


def _bdecode(payload: bytes, *, prefix: bool = False):
    try:
        if prefix:
            return bencode.decode_prefix(payload, 0, max_size=len(payload))
        return bencode.decode(payload, max_size=len(payload))
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(
            f"extension payload: {exc} ({exc.reason})", reason="bad_bencode"
        ) from None


def _as_payload(payload: object) -> bytes:
    if type(payload) is bytes:
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    raise LocalProtocolError("payload must be bytes", reason="bad_type")


@dataclass(frozen=True, slots=True)
class ExtHandshake:
    """BEP 10 extended handshake (Extended message with ext_id 0).

    ``m`` maps extension names to the ids *the sender* wants to receive them
    with (0 disables one). The other fields are optional; unknown keys are
    ignored when decoding.
    """

    m: dict = field(default_factory=dict)  # dict[str, int]
    metadata_size: int | None = None  # BEP 9: size of the info dictionary
    v: str | None = None  # client name and version
    reqq: int | None = None  # request queue depth the sender allows
    p: int | None = None  # the sender's listen port
    yourip: bytes | None = None  # our address as the sender sees it: 4 or 16 bytes

    def __post_init__(self) -> None:
        if not isinstance(self.m, dict):
            raise LocalProtocolError("m must be a dict", reason="bad_type")
        m = dict(self.m)
        for k, v in m.items():
            if type(k) is not str or not k:
                raise LocalProtocolError("extension names must be non-empty str", reason="bad_type")
            if type(v) is not int or not 0 <= v <= 255:
                raise LocalProtocolError(
                    "extension ids must be ints in 0..255", reason="bad_number"
                )
        object.__setattr__(self, "m", m)
        _opt_int("metadata_size", self.metadata_size, 0, MAX_METADATA_SIZE)
        _opt_int("reqq", self.reqq, 0, 2**31 - 1)
        _opt_int("p", self.p, 0, 65535)
        if self.v is not None and type(self.v) is not str:
            raise LocalProtocolError("v must be str", reason="bad_type")
        ip = self.yourip
        if ip is not None and (type(ip) is not bytes or len(ip) not in (4, 16)):
            raise LocalProtocolError("yourip must be 4 or 16 bytes", reason="bad_type")


def _opt_int(name: str, value: object, lo: int, hi: int) -> None:
    if value is None:
        return
    if type(value) is not int or not lo <= value <= hi:
        raise LocalProtocolError(
            f"{name} must be None or an int in {lo}..{hi}", reason="bad_number"
        )


def encode_ext_handshake(h: ExtHandshake) -> bytes:
    """The payload of an Extended(0, ...) message."""
    if type(h) is not ExtHandshake:
        raise LocalProtocolError("not an ExtHandshake", reason="bad_type")
    d: dict = {"m": h.m}
    for key in ("metadata_size", "v", "reqq", "p", "yourip"):
        value = getattr(h, key)
        if value is not None:
            d[key] = value
    return bencode.encode(d)


def decode_ext_handshake(payload: bytes) -> ExtHandshake:
    """Decode an extended handshake payload; unknown keys are ignored."""
    d = _bdecode(_as_payload(payload))
    if type(d) is not dict:
        raise RemoteProtocolError("extended handshake is not a dictionary", reason="bad_extension")
    m_raw = d.get(b"m", {})
    if type(m_raw) is not dict:
        raise RemoteProtocolError("m is not a dictionary", reason="bad_extension")
    m = {}
    for k, v in m_raw.items():
        if type(v) is not int or not 0 <= v <= 255 or not k:
            raise RemoteProtocolError("extension id not in 0..255", reason="bad_extension")
        try:
            m[k.decode("utf-8")] = v
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                "extension name is not UTF-8", reason="bad_extension"
            ) from None
    v_raw = d.get(b"v")
    if v_raw is not None and type(v_raw) is not bytes:
        raise RemoteProtocolError("v is not a string", reason="bad_extension")
    yourip = d.get(b"yourip")
    if yourip is not None and (type(yourip) is not bytes or len(yourip) not in (4, 16)):
        raise RemoteProtocolError("yourip is not 4 or 16 bytes", reason="bad_extension")
    return ExtHandshake(
        m,
        _remote_int(d, b"metadata_size", 0, MAX_METADATA_SIZE, "bad_extension"),
        None if v_raw is None else v_raw.decode("utf-8", "replace"),
        _remote_int(d, b"reqq", 0, 2**31 - 1, "bad_extension"),
        _remote_int(d, b"p", 0, 65535, "bad_extension"),
        yourip,
    )


def _remote_int(d: dict, key: bytes, lo: int, hi: int, reason: str, required: bool = False):
    value = d.get(key)
    if value is None:
        if required:
            raise RemoteProtocolError(f"{key.decode()} is missing", reason=reason)
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise RemoteProtocolError(f"{key.decode()} not an int in {lo}..{hi}", reason=reason)
    return value


# -- BEP 9 ut_metadata -----------------------------------------------------------


def _check_metadata_piece(piece: object) -> None:
    if type(piece) is not int or not 0 <= piece < _MAX_METADATA_PIECES:
        raise LocalProtocolError("metadata piece out of range", reason="bad_number")


@dataclass(frozen=True, slots=True)
class MetadataRequest:
    piece: int

    def __post_init__(self) -> None:
        _check_metadata_piece(self.piece)


@dataclass(frozen=True, slots=True)
class MetadataReject:
    piece: int

    def __post_init__(self) -> None:
        _check_metadata_piece(self.piece)


@dataclass(frozen=True, slots=True)
class MetadataData:
    """One 16 KiB piece of the info dictionary (the last one may be shorter)."""

    piece: int
    total_size: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_metadata_piece(self.piece)
        if type(self.total_size) is not int or not 1 <= self.total_size <= MAX_METADATA_SIZE:
            raise LocalProtocolError("total_size out of range", reason="bad_number")
        _check_bytes("data", self.data)
        if len(self.data) != _metadata_piece_size(self.piece, self.total_size):
            raise LocalProtocolError(
                "data is not the size of this metadata piece", reason="bad_length"
            )


def _metadata_piece_size(piece: int, total_size: int) -> int:
    """Size of metadata piece ``piece``; <= 0 when the piece is past the end."""
    return min(METADATA_PIECE, total_size - piece * METADATA_PIECE)


MetadataMessage = MetadataRequest | MetadataData | MetadataReject


def encode_metadata(msg: MetadataMessage) -> bytes:
    """The payload of a ut_metadata Extended message."""
    t = type(msg)
    if t is MetadataRequest:
        return bencode.encode({"msg_type": 0, "piece": msg.piece})
    if t is MetadataData:
        piece, total = msg.piece, msg.total_size  # type: ignore[union-attr]
        head = {"msg_type": 1, "piece": piece, "total_size": total}
        return bencode.encode(head) + msg.data  # type: ignore[union-attr]
    if t is MetadataReject:
        return bencode.encode({"msg_type": 2, "piece": msg.piece})
    raise LocalProtocolError(f"{t.__name__} is not a ut_metadata message", reason="bad_type")


def decode_metadata(payload: bytes) -> MetadataMessage | None:
    """Decode a ut_metadata payload; ``None`` for an unknown msg_type (BEP 9: ignore it).

    The data of a data message follows the bencoded dictionary in the same
    payload; it must be exactly the size of that piece given ``total_size``.
    """
    payload = _as_payload(payload)
    d, end = _bdecode(payload, prefix=True)
    if type(d) is not dict:
        raise RemoteProtocolError("ut_metadata message is not a dictionary", reason="bad_metadata")
    msg_type = d.get(b"msg_type")
    if type(msg_type) is not int:
        raise RemoteProtocolError("msg_type missing or not an int", reason="bad_metadata")
    if msg_type not in (0, 1, 2):
        return None
    piece = _remote_int(d, b"piece", 0, _MAX_METADATA_PIECES - 1, "bad_metadata", required=True)
    if msg_type == 1:
        total = _remote_int(d, b"total_size", 1, MAX_METADATA_SIZE, "bad_metadata", required=True)
        data = payload[end:]
        if len(data) != _metadata_piece_size(piece, total):
            raise RemoteProtocolError("metadata data of the wrong size", reason="bad_metadata")
        return MetadataData(piece, total, data)
    if end != len(payload):
        raise RemoteProtocolError("bytes after a ut_metadata request/reject", reason="bad_metadata")
    return MetadataRequest(piece) if msg_type == 0 else MetadataReject(piece)


# -- BEP 11 ut_pex -------------------------------------------------------------------

#: BEP 11 flag bits of added.f / added6.f.
PEX_ENCRYPTION = 0x01
PEX_SEED = 0x02
PEX_UTP = 0x04
PEX_HOLEPUNCH = 0x08
PEX_CONNECTABLE = 0x10


def _check_peers(name: str, peers: object, version: int) -> None:
    if type(peers) is not tuple or len(peers) > MAX_PEX_PEERS:
        raise LocalProtocolError(
            f"{name} must be a tuple of at most {MAX_PEX_PEERS}", reason="bad_type"
        )
    for entry in peers:
        if type(entry) is not tuple or len(entry) != 2:
            raise LocalProtocolError(f"{name} entries are (ip, port)", reason="bad_type")
        ip, port = entry
        if type(port) is not int or not 0 <= port <= 65535:
            raise LocalProtocolError("port must be in 0..65535", reason="bad_port")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            addr = None
        if addr is None or addr.version != version or str(addr) != ip:
            raise LocalProtocolError(
                f"{name}: {ip!r} is not a normalised IPv{version} address", reason="bad_ip"
            )


@dataclass(frozen=True, slots=True)
class Pex:
    """BEP 11 peer exchange: peers connected / disconnected since the last message.

    Addresses are ``(ip text, port)`` with the text as :mod:`ipaddress` prints it;
    ``added_flags`` / ``added6_flags`` hold one BEP 11 flag byte per added peer.
    """

    added: tuple = ()
    added_flags: bytes = b""
    dropped: tuple = ()
    added6: tuple = ()
    added6_flags: bytes = b""
    dropped6: tuple = ()

    def __post_init__(self) -> None:
        _check_peers("added", self.added, 4)
        _check_peers("dropped", self.dropped, 4)
        _check_peers("added6", self.added6, 6)
        _check_peers("dropped6", self.dropped6, 6)
        _check_bytes("added_flags", self.added_flags)
        _check_bytes("added6_flags", self.added6_flags)
        if len(self.added_flags) != len(self.added) or len(self.added6_flags) != len(self.added6):
            raise LocalProtocolError("one flag byte per added peer", reason="bad_length")


def _compact(peers: tuple) -> bytes:
    return b"".join(ipaddress.ip_address(ip).packed + port.to_bytes(2, "big") for ip, port in peers)


def encode_pex(pex: Pex) -> bytes:
    """The payload of a ut_pex Extended message (at most PEX_SEND_LIMIT added/dropped)."""
    if type(pex) is not Pex:
        raise LocalProtocolError("not a Pex", reason="bad_type")
    if (
        len(pex.added) + len(pex.added6) > PEX_SEND_LIMIT
        or len(pex.dropped) + len(pex.dropped6) > PEX_SEND_LIMIT
    ):
        raise LocalProtocolError(
            f"send at most {PEX_SEND_LIMIT} added and {PEX_SEND_LIMIT} dropped peers",
            reason="too_many_peers",
        )
    d = {}
    if pex.added:
        d["added"] = _compact(pex.added)
        d["added.f"] = pex.added_flags
    if pex.dropped:
        d["dropped"] = _compact(pex.dropped)
    if pex.added6:
        d["added6"] = _compact(pex.added6)
        d["added6.f"] = pex.added6_flags
    if pex.dropped6:
        d["dropped6"] = _compact(pex.dropped6)
    return bencode.encode(d)


def _peers_from(d: dict, key: bytes, size: int) -> tuple:
    raw = d.get(key, b"")
    if type(raw) is not bytes or len(raw) % size:
        raise RemoteProtocolError(f"{key.decode()} is not a compact peer list", reason="bad_pex")
    if len(raw) // size > MAX_PEX_PEERS:
        raise RemoteProtocolError(
            f"{key.decode()} lists more than {MAX_PEX_PEERS} peers", reason="too_many_peers"
        )
    cls = ipaddress.IPv4Address if size == 6 else ipaddress.IPv6Address
    n = size - 2
    return tuple(
        (str(cls(raw[i : i + n])), int.from_bytes(raw[i + n : i + size], "big"))
        for i in range(0, len(raw), size)
    )


def _flags_from(d: dict, key: bytes, count: int) -> bytes:
    flags = d.get(key)
    if flags is None:
        return bytes(count)  # added.f is optional: no flags known
    if type(flags) is not bytes or len(flags) != count:
        raise RemoteProtocolError(
            f"{key.decode()} is not one byte per added peer", reason="bad_pex"
        )
    return flags


def decode_pex(payload: bytes) -> Pex:
    """Decode a ut_pex payload (absent lists are empty, absent flags are zero)."""
    d = _bdecode(_as_payload(payload))
    if type(d) is not dict:
        raise RemoteProtocolError("ut_pex message is not a dictionary", reason="bad_pex")
    added = _peers_from(d, b"added", 6)
    added6 = _peers_from(d, b"added6", 18)
    return Pex(
        added,
        _flags_from(d, b"added.f", len(added)),
        _peers_from(d, b"dropped", 6),
        added6,
        _flags_from(d, b"added6.f", len(added6)),
        _peers_from(d, b"dropped6", 18),
    )
