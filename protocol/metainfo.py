"""Metainfo (.torrent) files, BEP 3 v1.

For now this module creates single-file torrents from piece hashes the caller
computed; parsing, multi-file layouts and magnet URIs come with the peer
daemon. Creation is pure: the caller reads the file and hashes the pieces.
"""

from __future__ import annotations

import hashlib

from .bencode import encode
from .errors import LocalProtocolError

# BEP 3 suggests powers of two; clients cope with 16 KiB..16 MiB.
MIN_PIECE_LENGTH = 16 * 1024
MAX_PIECE_LENGTH = 16 * 1024 * 1024


def create_single_file(
    name: str,
    length: int,
    piece_length: int,
    pieces: bytes,
    announce: str,
    *,
    announce_list: list[list[str]] | None = None,
    private: bool = False,
    created_by: str = "shoal",
) -> tuple[bytes, bytes]:
    """Return ``(metainfo bytes, info_hash)`` for a single-file v1 torrent.

    ``pieces`` is the concatenation of the SHA-1 of each piece.
    """
    if piece_length & (piece_length - 1) or not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH:
        raise LocalProtocolError("piece_length must be a power of two in 16 KiB..16 MiB", "bad_piece_length")
    if not name or "/" in name or name in (".", ".."):
        raise LocalProtocolError(f"bad file name {name!r}", "bad_name")
    if length < 0 or len(pieces) != 20 * -(-length // piece_length):
        raise LocalProtocolError("pieces does not match length / piece_length", "bad_pieces")
    info: dict[str, object] = {"length": length, "name": name, "piece length": piece_length, "pieces": pieces}
    if private:
        info["private"] = 1
    raw_info = encode(info)
    meta: dict[str, object] = {"announce": announce, "created by": created_by, "info": info}
    if announce_list:
        meta["announce-list"] = announce_list
    return encode(meta), hashlib.sha1(raw_info).digest()


def hash_pieces(data: bytes, piece_length: int) -> bytes:
    """SHA-1 of each piece of ``data``, concatenated."""
    return b"".join(
        hashlib.sha1(data[i : i + piece_length]).digest() for i in range(0, len(data), piece_length)
    )
