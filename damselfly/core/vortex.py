"""The Vortex frame protocol, sans-IO.

Every packet is ``packet_id: u8 | tag: u8 | length: u32 BE | value[length]``.
This module turns bytes into events and events into bytes; it never touches a
socket or a clock, so TCP, QUIC, WebRTC and RDMA adapters all share it and the
tests drive it with plain bytes.

Piece content is streamed: a decoder yields ``PieceContentStart`` (the metadata),
then ``PieceData`` chunks that are views of the bytes it was fed, then
``PieceContentEnd``, so a receiver never has to hold a whole piece in memory.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from damselfly.core.errors import ProtocolError

HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size  # 6
TASK_ID_SIZE = 64
DOWNLOAD_PIECE_SIZE = TASK_ID_SIZE + 4
MAX_METADATA_SIZE = 64 * 1024
MAX_ERROR_MESSAGE = 64 * 1024
# 64 MiB is the largest piece Dragonfly makes; room for the metadata on top.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024 + 4 + MAX_METADATA_SIZE
MAX_ERROR_FRAME = 1 + MAX_ERROR_MESSAGE
# Error frames one decoder takes before it gives up on its peer (``security.limits.vortex_error_frames``).
DEFAULT_MAX_ERRORS = 64

_META_FIXED = struct.Struct(">IQQ")  # number, offset, length
_U32 = struct.Struct(">I")
_META_TAIL = struct.Struct(">BQq")  # traffic type, cost (s), created_at (unix s)


class Tag(enum.IntEnum):
    DOWNLOAD_PIECE = 0
    PIECE_CONTENT = 1
    DOWNLOAD_PERSISTENT_PIECE = 2
    PERSISTENT_PIECE_CONTENT = 3
    DOWNLOAD_PERSISTENT_CACHE_PIECE = 4
    PERSISTENT_CACHE_PIECE_CONTENT = 5
    DOWNLOAD_CACHE_PIECE = 6
    CACHE_PIECE_CONTENT = 7
    CLOSE = 254
    ERROR = 255


class ErrorCode(enum.IntEnum):
    UNKNOWN = 0
    INVALID_ARGUMENT = 1
    NOT_FOUND = 2
    INTERNAL = 3
    UNAVAILABLE = 4  # damselfly's: the parent is busy; a child asks again later or elsewhere
    DECLINED = 5  # damselfly's: the parent will not send this piece now; a child asks another parent


class TrafficType(enum.IntEnum):
    BACK_TO_SOURCE = 0
    REMOTE_PEER = 1
    LOCAL_PEER = 2


@dataclass(frozen=True, slots=True)
class PieceMetadata:
    number: int
    offset: int
    length: int
    digest: str
    parent_id: str = ""
    traffic_type: int = TrafficType.REMOTE_PEER
    cost_seconds: int = 0
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class DownloadPiece:
    task_id: str
    number: int
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class PieceContentStart:
    metadata: PieceMetadata
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class PieceData:
    data: memoryview


@dataclass(frozen=True, slots=True)
class PieceContentEnd:
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class Close:
    packet_id: int = 0


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str
    packet_id: int = 0


class ErrorFlood(ProtocolError):
    """The peer sent more Error frames than the decoder's ``max_errors``: drop the connection."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = DownloadPiece | PieceContentStart | PieceData | PieceContentEnd | Close | Error


# -- encoding -----------------------------------------------------------------


def _check_u8(name: str, value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ProtocolError(f"{name} {value} does not fit in a u8")


def encode_download_piece(task_id: str, number: int, packet_id: int = 0) -> bytes:
    _check_u8("packet id", packet_id)
    raw = task_id.encode("ascii", "strict") if task_id.isascii() else b""
    if len(raw) != TASK_ID_SIZE:
        raise ProtocolError(f"task id must be {TASK_ID_SIZE} ASCII hex chars, got {task_id!r}")
    if not 0 <= number <= 0xFFFFFFFF:
        raise ProtocolError(f"piece number {number} does not fit in a u32")
    return HEADER.pack(packet_id, Tag.DOWNLOAD_PIECE, DOWNLOAD_PIECE_SIZE) + raw + _U32.pack(number)


def encode_metadata(meta: PieceMetadata) -> bytes:
    digest = meta.digest.encode()
    parent = meta.parent_id.encode()
    return b"".join(
        (
            _META_FIXED.pack(meta.number, meta.offset, meta.length),
            _U32.pack(len(digest)),
            digest,
            _U32.pack(len(parent)),
            parent,
            _META_TAIL.pack(meta.traffic_type, meta.cost_seconds, meta.created_at),
        )
    )


def encode_piece_header(meta: PieceMetadata, packet_id: int = 0) -> bytes:
    """Everything of a PieceContent frame but the piece bytes, which follow it."""
    _check_u8("packet id", packet_id)
    metadata = encode_metadata(meta)
    length = 4 + len(metadata) + meta.length
    if length > 0xFFFFFFFF:
        raise ProtocolError(f"piece of {meta.length} bytes does not fit in one frame")
    return HEADER.pack(packet_id, Tag.PIECE_CONTENT, length) + _U32.pack(len(metadata)) + metadata


def encode_piece_content(meta: PieceMetadata, data: bytes, packet_id: int = 0) -> bytes:
    if len(data) != meta.length:
        raise ProtocolError(f"piece metadata says {meta.length} bytes, data has {len(data)}")
    return encode_piece_header(meta, packet_id) + bytes(data)


def encode_close(packet_id: int = 0) -> bytes:
    return HEADER.pack(packet_id, Tag.CLOSE, 0)


def encode_error(code: int, message: str, packet_id: int = 0) -> bytes:
    body = message.encode()[:MAX_ERROR_MESSAGE]
    return HEADER.pack(packet_id, Tag.ERROR, 1 + len(body)) + bytes([int(code)]) + body


def decode_metadata(raw: bytes | memoryview) -> PieceMetadata:
    view = memoryview(raw)
    try:
        number, offset, length = _META_FIXED.unpack_from(view, 0)
        pos = _META_FIXED.size
        (dlen,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + dlen > len(view):
            raise ProtocolError("piece metadata: digest runs past the metadata")
        digest = bytes(view[pos : pos + dlen]).decode()
        pos += dlen
        (plen,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + plen > len(view):
            raise ProtocolError("piece metadata: parent id runs past the metadata")
        parent = bytes(view[pos : pos + plen]).decode()
        pos += plen
        traffic, cost, created = _META_TAIL.unpack_from(view, pos)
        pos += _META_TAIL.size
    except struct.error:
        raise ProtocolError("piece metadata is truncated") from None
    except UnicodeDecodeError:
        raise ProtocolError("piece metadata holds invalid UTF-8") from None
    if pos != len(view):
        raise ProtocolError(f"piece metadata has {len(view) - pos} trailing bytes")
    return PieceMetadata(number, offset, length, digest, parent, traffic, cost, created)


# -- decoding -----------------------------------------------------------------


def _check_length(tag: int, length: int) -> None:
    """Refuse a frame other than PieceContent whose length its tag does not allow, from its header."""
    if tag == Tag.DOWNLOAD_PIECE:
        if length != DOWNLOAD_PIECE_SIZE:
            raise ProtocolError(f"DownloadPiece frame of {length} bytes, expected {DOWNLOAD_PIECE_SIZE}")
    elif tag == Tag.CLOSE:
        if length:
            raise ProtocolError(f"Close frame carries {length} bytes, expected 0")
    elif tag == Tag.ERROR:
        if length < 1:
            raise ProtocolError("Error frame without a code")
        if length > MAX_ERROR_FRAME:
            raise ProtocolError(f"Error frame of {length} bytes is over the {MAX_ERROR_FRAME}-byte limit")
    else:
        raise ProtocolError(f"unsupported Vortex tag {tag}")


class Decoder:
    """Bytes in, events out. Feed with ``receive_data``; ``b""`` means end of stream.

    Every length is bounded before a byte of its frame is buffered: a frame over
    ``max_frame``, a DownloadPiece frame of other than 68 bytes, a Close frame with a
    body, an Error frame over ``MAX_ERROR_FRAME``, piece metadata over
    ``MAX_METADATA_SIZE`` and any tag damselfly does not speak raise ``ProtocolError``
    from the header alone. Piece bytes are never buffered: they come out as views.
    So a decoder holds at most about 64 KiB whatever its peer sends.

    A decoder also counts the Error frames it decodes: the one past ``max_errors``
    (default ``DEFAULT_MAX_ERRORS``, 64) raises ``ErrorFlood`` instead of coming out,
    so a peer cannot keep a connection busy with errors for ever. A decoder lives as
    long as its connection (or its stream), so that is the count per connection.

    After a ``ProtocolError`` the decoder stays broken, as a connection in h11 does.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_errors: int = DEFAULT_MAX_ERRORS):
        if max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {max_errors}")
        self.max_frame = max_frame
        self.max_errors = max_errors
        self.errors = 0  # Error frames decoded so far
        self._buf = bytearray()
        self._chunks: list[memoryview] = []  # piece bytes not yet handed out
        self._eof = False
        self._piece_left = 0  # piece bytes still to come in the current frame
        self._packet_id = 0
        self._broken: ProtocolError | None = None
        self._in_piece = False

    @property
    def piece_left(self) -> int:
        """Piece bytes the current frame still has to deliver (0 between pieces).

        A reader may use it to size its next read so a whole piece arrives in
        one call; it is a hint, the decoder accepts any split of the bytes.
        """
        return self._piece_left

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof and data:
            raise ProtocolError("data after end of stream")
        if not data:
            self._eof = True
            return
        if self._piece_left:
            view = memoryview(data)
            take = min(len(view), self._piece_left)
            self._chunks.append(view[:take])
            self._piece_left -= take
            if take < len(view):
                self._buf += view[take:]
            return
        self._buf += data

    def next_event(self) -> Event | _NeedData:
        if self._broken:
            raise self._broken
        try:
            return self._next()
        except ProtocolError as exc:
            self._broken = exc
            raise

    def _next(self) -> Event | _NeedData:
        if self._chunks:
            return PieceData(self._chunks.pop(0))
        if self._piece_left == 0 and self._in_piece:
            self._in_piece = False
            return PieceContentEnd(self._packet_id)
        if self._piece_left:
            if self._eof:
                raise ProtocolError(f"stream ended {self._piece_left} bytes before the piece did")
            return NEED_DATA
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if self._eof and buf:
                raise ProtocolError(f"stream ended inside a frame header ({len(buf)} of 6 bytes)")
            return NEED_DATA
        packet_id, tag, length = HEADER.unpack_from(buf, 0)
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes is over the {self.max_frame}-byte limit")
        if tag == Tag.PIECE_CONTENT:
            return self._piece_start(packet_id, length)
        _check_length(tag, length)  # before its bytes are waited for or buffered
        if len(buf) < HEADER_SIZE + length:
            if self._eof:
                raise ProtocolError(f"stream ended inside a frame ({len(buf) - HEADER_SIZE} of {length} bytes)")
            return NEED_DATA
        value = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
        del buf[: HEADER_SIZE + length]
        if tag == Tag.DOWNLOAD_PIECE:
            task = value[:TASK_ID_SIZE]
            if not all(c in b"0123456789abcdefABCDEF" for c in task):
                raise ProtocolError("DownloadPiece task id is not hex")
            (number,) = _U32.unpack_from(value, TASK_ID_SIZE)
            return DownloadPiece(task.decode("ascii"), number, packet_id)
        if tag == Tag.CLOSE:
            return Close(packet_id)
        self.errors += 1
        if self.errors > self.max_errors:
            raise ErrorFlood(f"peer sent more than {self.max_errors} Error frames on one connection")
        return Error(value[0], value[1:].decode("utf-8", "replace"), packet_id)

    def _piece_start(self, packet_id: int, length: int) -> Event | _NeedData:
        buf = self._buf
        if length < 4:
            raise ProtocolError(f"PieceContent frame of {length} bytes has no metadata length")
        if len(buf) < HEADER_SIZE + 4:
            if self._eof:
                raise ProtocolError("stream ended inside a PieceContent frame")
            return NEED_DATA
        (meta_len,) = _U32.unpack_from(buf, HEADER_SIZE)
        if meta_len > MAX_METADATA_SIZE or 4 + meta_len > length:
            raise ProtocolError(f"piece metadata of {meta_len} bytes does not fit its frame of {length}")
        head = HEADER_SIZE + 4 + meta_len
        if len(buf) < head:
            if self._eof:
                raise ProtocolError("stream ended inside piece metadata")
            return NEED_DATA
        meta = decode_metadata(memoryview(buf)[HEADER_SIZE + 4 : head])
        data_len = length - 4 - meta_len
        if meta.length != data_len:
            raise ProtocolError(
                f"lying PieceContent frame: metadata says {meta.length} bytes, frame carries {data_len}"
            )
        rest = memoryview(buf)[head:]
        self._buf = bytearray()  # the old buffer now backs ``rest`` only
        self._packet_id = packet_id
        self._in_piece = True
        self._piece_left = data_len
        if rest:
            self.receive_data(rest)
        return PieceContentStart(meta, packet_id)
