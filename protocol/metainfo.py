"""Metainfo (.torrent) files and magnet links: BEP 3 (v1), 9, 12, 19, 27, 47.

Theory of operation
-------------------

A .torrent file is a bencoded dictionary whose ``info`` entry describes the
content; everything else (trackers, web seeds, comment) is advice that can be
changed without changing the torrent's identity. That identity, the
*info-hash*, is the SHA-1 of the info dictionary's **exact bytes** as they sit
in the file. :func:`parse_metainfo` therefore never re-encodes: after a strict
decode (which accepts only canonical bencode) it walks the top-level
dictionary with :func:`~shoal.protocol.bencode.decode_prefix` to find the raw
span of ``info`` and hashes that span.

:func:`parse_info` takes just the info dictionary, which is what arrives after
a BEP 9 metadata exchange; the caller passes the info-hash it asked for and a
mismatch is ``info_hash_mismatch``.

The content is a sequence of files laid end to end; pieces are cut from that
byte stream with no regard for file boundaries. :class:`FileEntry` records
each file's ``offset`` in the stream. Single-file torrents (an ``info`` with
``length``) have one entry whose ``path`` is ``(name,)`` and
:attr:`Metainfo.single_file` is true; multi-file torrents (``files``) have
paths relative to the directory ``name``. BEP 47 pad files (``attr``
containing ``p``) are real members of the stream (their bytes are zeros and
are hashed) but storage never writes them; they are marked ``pad=True``.

Versions: only v1 is supported. A *hybrid* torrent (BEP 52 ``meta version``
2 together with the v1 keys ``pieces`` and ``length``/``files``) is accepted
and read as the v1 torrent it also is (its v1 info-hash is the SHA-1 of the
whole info dictionary, as for any v1 torrent; the v2 ``file tree`` and
``piece layers`` are ignored). A pure v2 torrent (no ``pieces``) is refused
with ``v2_only``.

Strictness and bounds
~~~~~~~~~~~~~~~~~~~~~

A .torrent or info dictionary comes from a stranger (a web page, a peer), and
its paths become file names on our disk, so:

* every path component is UTF-8, non-empty, not ``.`` or ``..``, contains no
  ``/`` or NUL and is at most 255 bytes (Linux ``NAME_MAX``); a whole path has
  at most :data:`MAX_PATH_DEPTH` components and :data:`MAX_PATH_BYTES` bytes.
  The torrent ``name`` obeys the same rules (it is a component too).
  Violations are ``bad_path``: nothing can escape the download directory;
* two (non-pad) files may not share a path, and no file may sit where
  another file needs a directory (``duplicate_path``);
* ``piece length`` is a power of two in
  [:data:`MIN_PIECE_LENGTH`, :data:`MAX_PARSE_PIECE_LENGTH`];
* ``len(pieces) == 20 * ceil(total_length / piece_length)``;
* file lengths are non-negative, the total is positive and at most
  :data:`MAX_TOTAL_LENGTH`, there are at most ``max_files`` files;
* the whole input is at most ``max_size`` bytes (libtorrent's default is
  10 MB as well).

Every failure raises :class:`RemoteProtocolError` with a ``reason`` from
:data:`REASONS` (which includes the bencode tokens), for any input at all.

Creation (:func:`create_metainfo`, :func:`create_single_file`) is pure as
well: the caller hashes the content (``shoal.daemons.peer.storage.hash_files``
does it for files on disk) and passes the concatenated piece hashes.

Magnet links (BEP 9): :func:`parse_magnet` reads ``xt=urn:btih:`` in hex or
base32, ``dn``, ``tr`` (repeatable), ``ws`` (web seeds) and ``x.pe`` (peer
addresses); anything wrong is ``RemoteProtocolError(reason="bad_magnet")``.
:func:`format_magnet` writes one; :meth:`Metainfo.magnet` builds the
:class:`Magnet` for a torrent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.protocol import bencode
from shoal.protocol.bencode import decode, decode_prefix, encode
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REASONS",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_FILES",
    "MIN_PIECE_LENGTH",
    "MAX_PIECE_LENGTH",
    "MAX_PARSE_PIECE_LENGTH",
    "MAX_TOTAL_LENGTH",
    "FileEntry",
    "Metainfo",
    "Magnet",
    "parse_metainfo",
    "parse_info",
    "create_metainfo",
    "metainfo_file",
    "create_single_file",
    "hash_pieces",
    "parse_magnet",
    "format_magnet",
]

#: Every ``reason`` the parsers in this module can raise.
REASONS = (
    "not_a_dict",  # the top-level value or ``info`` is not a dictionary
    "missing_info",  # no ``info`` key
    "bad_name",  # ``name`` missing or not a byte string
    "bad_path",  # a path component (or the name) is unsafe, empty or not UTF-8
    "duplicate_path",  # two files at one path, or a file where a directory must be
    "bad_piece_length",  # missing, not a power of two, or out of bounds
    "bad_pieces",  # missing, or not 20 bytes per piece of the total length
    "bad_file_length",  # a file length missing, not an integer or negative
    "bad_total_length",  # content empty or larger than MAX_TOTAL_LENGTH
    "bad_layout",  # both or neither of ``length``/``files``, or ``files`` empty
    "bad_files",  # ``files`` not a list of dictionaries
    "too_many_files",  # more than max_files entries
    "bad_attr",  # BEP 47 ``attr`` not a byte string
    "bad_tracker",  # ``announce``/``announce-list`` malformed or too many
    "bad_url_list",  # BEP 19 ``url-list`` malformed or too many
    "bad_field",  # an optional field of the wrong type (private, comment, ...)
    "v2_only",  # a BitTorrent v2 torrent without v1 ``pieces``
    "bad_version",  # ``meta version`` neither absent nor 2
    "info_hash_mismatch",  # parse_info(): SHA-1 differs from the expected hash
    "bad_magnet",  # anything wrong with a magnet URI
) + bencode.REASONS

# 10 MiB, libtorrent's default limit for .torrent files. The bulk of a large
# torrent is ``pieces`` (20 bytes per piece): 10 MiB allows ~500 000 pieces.
DEFAULT_MAX_SIZE = 10 * 1024 * 1024

# 100 000 files: each costs a FileEntry (~200 bytes) plus a descriptor in the
# storage layer; datasets with more files should be archived first.
DEFAULT_MAX_FILES = 100_000

# BEP 3 suggests powers of two; clients cope with 16 KiB..16 MiB. Creation
# stays inside that range; parsing also accepts the 32 and 64 MiB pieces some
# creators use for very large content (storage hashes a piece in memory, so
# the upper bound is also a bound on that buffer).
MIN_PIECE_LENGTH = 16 * 1024
MAX_PIECE_LENGTH = 16 * 1024 * 1024
MAX_PARSE_PIECE_LENGTH = 64 * 1024 * 1024

# 1 PiB: larger than any dataset we distribute, and keeps every offset far
# inside int64.
MAX_TOTAL_LENGTH = 2**50

# Linux NAME_MAX and PATH_MAX: a path we cannot create is refused up front.
MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_PATH_DEPTH = 64

# Tracker and web seed URLs: real ones (with passkeys) are < 300 bytes; the
# counts bound the work of announcing.
MAX_URL_BYTES = 4096
MAX_TRACKERS = 256
MAX_WEB_SEEDS = 64

# Magnet URIs: a few trackers make ~1 KB; 16 KiB is ample.
MAX_MAGNET_LENGTH = 16 * 1024
MAX_MAGNET_PEERS = 200

_HASH_LEN = 20
_PAD = "p"
# BEP 47 attributes we recognise, in the order we keep them; others ignored.
_ATTRS = "lpxh"


# ---------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of the content stream.

    ``path`` is relative to the torrent directory (multi-file) or ``(name,)``
    (single-file); ``offset`` is where the file starts in the stream; ``pad``
    marks a BEP 47 padding file (zeros, never stored); ``attr`` keeps the
    recognised BEP 47 attribute letters (``l``, ``p``, ``x``, ``h``).
    """

    path: tuple[str, ...]
    length: int
    offset: int
    pad: bool = False
    attr: str = ""

    def __post_init__(self) -> None:
        if not self.path or not all(
            isinstance(c, str) and _component_ok(c.encode("utf-8", "surrogatepass")) for c in self.path
        ):
            raise LocalProtocolError(f"unsafe file path {self.path!r}", "bad_path")
        if self.length < 0 or self.offset < 0:
            raise LocalProtocolError("file length and offset must be non-negative", "bad_file_length")


@dataclass(frozen=True, slots=True)
class Metainfo:
    """A parsed v1 torrent. ``pieces`` is the concatenated 20-byte SHA-1s.

    Use :attr:`num_pieces`, :meth:`piece_hash` and :meth:`piece_size` rather
    than slicing ``pieces`` by hand.
    """

    info_hash: bytes
    name: str
    piece_length: int
    pieces: bytes = field(repr=False)
    files: tuple[FileEntry, ...]
    total_length: int
    single_file: bool = False
    private: bool = False
    announce_list: tuple[tuple[str, ...], ...] = ()
    url_list: tuple[str, ...] = ()
    raw_info: bytes = field(default=b"", repr=False)
    comment: str | None = None
    created_by: str | None = None
    creation_date: int | None = None

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // _HASH_LEN

    def piece_hash(self, index: int) -> bytes:
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} outside 0..{self.num_pieces - 1}")
        return self.pieces[index * _HASH_LEN : (index + 1) * _HASH_LEN]

    def piece_size(self, index: int) -> int:
        """Length of piece ``index`` (the last one may be short)."""
        if not 0 <= index < self.num_pieces:
            raise IndexError(f"piece {index} outside 0..{self.num_pieces - 1}")
        if index == self.num_pieces - 1:
            return self.total_length - index * self.piece_length
        return self.piece_length

    @property
    def trackers(self) -> tuple[str, ...]:
        """All tracker URLs, tier by tier, without duplicates."""
        return tuple(dict.fromkeys(u for tier in self.announce_list for u in tier))

    def magnet(self) -> Magnet:
        return Magnet(
            info_hash=self.info_hash,
            display_name=self.name,
            trackers=self.trackers[:MAX_TRACKERS],
            web_seeds=self.url_list,
        )


@dataclass(frozen=True, slots=True)
class Magnet:
    """A BEP 9 magnet link (v1 info-hash only)."""

    info_hash: bytes
    display_name: str | None = None
    trackers: tuple[str, ...] = ()
    web_seeds: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if type(self.info_hash) is not bytes or len(self.info_hash) != _HASH_LEN:
            raise LocalProtocolError("info_hash must be 20 bytes", "bad_info_hash")
        for host, port in self.peers:
            if not isinstance(host, str) or not host or not 0 < port < 65536:
                raise LocalProtocolError(f"bad peer address {(host, port)!r}", "bad_peer")

    def uri(self) -> str:
        return format_magnet(self)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def parse_metainfo(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_files: int = DEFAULT_MAX_FILES
) -> Metainfo:
    """Parse a whole .torrent file."""
    top = decode(data, max_size=max_size)
    if type(top) is not dict:
        raise RemoteProtocolError("metainfo is not a dictionary", "not_a_dict")
    if b"info" not in top:
        raise RemoteProtocolError("metainfo has no info dictionary", "missing_info")
    raw_info = _info_span(bytes(data))
    meta = _parse_info_dict(top[b"info"], raw_info, max_files)

    announce_list = _trackers(top.get(b"announce"), top.get(b"announce-list"))
    url_list = _url_list(top.get(b"url-list"))
    return Metainfo(
        **meta,
        announce_list=announce_list,
        url_list=url_list,
        comment=_opt_text(top, b"comment"),
        created_by=_opt_text(top, b"created by"),
        creation_date=_opt_int(top, b"creation date"),
    )


def parse_info(
    raw_info: bytes,
    *,
    expected_info_hash: bytes | None = None,
    max_size: int = DEFAULT_MAX_SIZE,
    max_files: int = DEFAULT_MAX_FILES,
) -> Metainfo:
    """Parse a bare info dictionary (BEP 9 metadata) into a :class:`Metainfo`.

    The result has no trackers or web seeds (those come from the magnet
    link: ``dataclasses.replace`` them in). With ``expected_info_hash`` the
    SHA-1 is checked first, so nothing from an unsolicited dictionary is
    looked at beyond its bencoding.
    """
    raw_info = bytes(raw_info)
    info = decode(raw_info, max_size=max_size)
    if expected_info_hash is not None and hashlib.sha1(raw_info).digest() != expected_info_hash:
        raise RemoteProtocolError("metadata does not match the info-hash", "info_hash_mismatch")
    return Metainfo(**_parse_info_dict(info, raw_info, max_files))


def metainfo_file(
    raw_info: bytes, announce_list: Sequence[Sequence[str]] = (), url_list: Sequence[str] = ()
) -> bytes:
    """A .torrent file around an info dictionary fetched with BEP 9.

    ``raw_info`` is spliced in byte for byte (re-encoding could change the
    info-hash of a dictionary another client wrote), and the trackers and web
    seeds of the magnet link go around it, keys in bencode order.
    """
    tiers = [[_check_url(u) for u in tier] for tier in announce_list]
    tiers = [t for t in tiers if t]
    urls = [u for t in tiers for u in t]
    parts = [b"d"]
    if urls:
        parts += [encode("announce"), encode(urls[0])]
        if len(urls) > 1:
            parts += [encode("announce-list"), encode(tiers)]
    parts += [encode("info"), bytes(raw_info)]
    if url_list:
        parts += [encode("url-list"), encode([_check_url(u) for u in url_list])]
    parts.append(b"e")
    return b"".join(parts)


def _info_span(data: bytes) -> bytes:
    """The raw bytes of the top-level ``info`` value (data is already validated)."""
    pos = 1  # after the top-level 'd'
    while data[pos] != 0x65:  # 'e'
        key, pos = decode_prefix(data, pos, max_size=len(data))
        start = pos
        _, pos = decode_prefix(data, pos, max_size=len(data))
        if key == b"info":
            return data[start:pos]
    raise RemoteProtocolError("metainfo has no info dictionary", "missing_info")  # pragma: no cover


def _parse_info_dict(info: object, raw_info: bytes, max_files: int) -> dict:
    if type(info) is not dict:
        raise RemoteProtocolError("info is not a dictionary", "not_a_dict")
    version = info.get(b"meta version")
    if version is not None:
        if version != 2 or type(version) is not int:
            raise RemoteProtocolError(f"unsupported meta version {version!r}", "bad_version")
        if b"pieces" not in info:
            raise RemoteProtocolError("BitTorrent v2-only torrents are not supported", "v2_only")

    name_raw = info.get(b"name")
    if type(name_raw) is not bytes:
        raise RemoteProtocolError("info has no name", "bad_name")
    name = _component(name_raw)

    piece_length = info.get(b"piece length")
    if (
        type(piece_length) is not int
        or not MIN_PIECE_LENGTH <= piece_length <= MAX_PARSE_PIECE_LENGTH
        or piece_length & (piece_length - 1)
    ):
        raise RemoteProtocolError(f"bad piece length {piece_length!r}", "bad_piece_length")

    has_length, has_files = b"length" in info, b"files" in info
    if has_length == has_files:
        raise RemoteProtocolError("info needs exactly one of length and files", "bad_layout")
    if has_length:
        length = info[b"length"]
        if type(length) is not int or length < 0:
            raise RemoteProtocolError("bad file length", "bad_file_length")
        attr = _attr(info.get(b"attr"))
        files: tuple[FileEntry, ...] = (FileEntry((name,), length, 0, _PAD in attr, attr),)
        total = length
    else:
        files, total = _files(info[b"files"], max_files)

    if not 0 < total <= MAX_TOTAL_LENGTH:
        raise RemoteProtocolError(f"total length {total} out of bounds", "bad_total_length")
    pieces = info.get(b"pieces")
    n_pieces = -(-total // piece_length)
    if type(pieces) is not bytes or len(pieces) != _HASH_LEN * n_pieces:
        raise RemoteProtocolError(
            f"pieces must be {n_pieces} SHA-1 hashes for {total} bytes", "bad_pieces"
        )
    private = info.get(b"private", 0)
    if type(private) is not int:
        raise RemoteProtocolError("private is not an integer", "bad_field")
    return dict(
        info_hash=hashlib.sha1(raw_info).digest(),
        name=name,
        piece_length=piece_length,
        pieces=pieces,
        files=files,
        total_length=total,
        single_file=has_length,
        private=private != 0,  # BEP 27 says 1; libtorrent treats any non-zero so
        raw_info=raw_info,
    )


def _files(items: object, max_files: int) -> tuple[tuple[FileEntry, ...], int]:
    if type(items) is not list:
        raise RemoteProtocolError("files is not a list", "bad_files")
    if not items:
        raise RemoteProtocolError("files is empty", "bad_layout")
    if len(items) > max_files:
        raise RemoteProtocolError(f"more than {max_files} files", "too_many_files")
    out = []
    offset = 0
    seen: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for item in items:
        if type(item) is not dict:
            raise RemoteProtocolError("file entry is not a dictionary", "bad_files")
        length = item.get(b"length")
        if type(length) is not int or length < 0:
            raise RemoteProtocolError("bad file length", "bad_file_length")
        raw_path = item.get(b"path")
        if type(raw_path) is not list or not raw_path or len(raw_path) > MAX_PATH_DEPTH:
            raise RemoteProtocolError("file path is not a non-empty list", "bad_path")
        path = []
        for c in raw_path:
            if type(c) is not bytes:
                raise RemoteProtocolError("path component is not a string", "bad_path")
            path.append(_component(c))
        if sum(len(c) + 1 for c in raw_path) > MAX_PATH_BYTES:
            raise RemoteProtocolError("file path too long", "bad_path")
        attr = _attr(item.get(b"attr"))
        entry = FileEntry(tuple(path), length, offset, _PAD in attr, attr)
        if not entry.pad:
            # libtorrent names every pad file ".pad/<size>", so pads repeat;
            # they never reach the disk and are left out of this check.
            if entry.path in seen:
                raise RemoteProtocolError("two files share a path", "duplicate_path")
            seen.add(entry.path)
            dirs.update(entry.path[:i] for i in range(1, len(entry.path)))
        out.append(entry)
        offset += length
        if offset > MAX_TOTAL_LENGTH:
            raise RemoteProtocolError("total length too large", "bad_total_length")
    if not seen.isdisjoint(dirs):
        raise RemoteProtocolError("a file is where a directory must be", "duplicate_path")
    return tuple(out), offset


def _component_ok(raw: bytes) -> bool:
    return (
        0 < len(raw) <= MAX_COMPONENT_BYTES
        and raw not in (b".", b"..")
        and b"/" not in raw
        and b"\x00" not in raw
    )


def _component(raw: bytes) -> str:
    if not _component_ok(raw):
        raise RemoteProtocolError(f"unsafe path component {raw[:40]!r}", "bad_path")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("path component is not UTF-8", "bad_path") from None


def _attr(raw: object) -> str:
    if raw is None:
        return ""
    if type(raw) is not bytes:
        raise RemoteProtocolError("attr is not a string", "bad_attr")
    return "".join(a for a in _ATTRS if a.encode() in raw)


_URL_BAD = re.compile(r"[\x00-\x20\x7f]")


def _url(raw: object, reason: str) -> str | None:
    """A URL as str, None for the empty string (which some creators write)."""
    if type(raw) is not bytes or len(raw) > MAX_URL_BYTES:
        raise RemoteProtocolError("URL is not a string of bounded length", reason)
    try:
        url = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("URL is not UTF-8", reason) from None
    if _URL_BAD.search(url):
        raise RemoteProtocolError("URL contains whitespace or control characters", reason)
    return url or None


def _trackers(announce: object, announce_list: object) -> tuple[tuple[str, ...], ...]:
    """BEP 12: ``announce-list`` when present and non-empty, else ``announce``."""
    first = None if announce is None else _url(announce, "bad_tracker")
    tiers: list[tuple[str, ...]] = []
    count = 0
    if announce_list is not None:
        if type(announce_list) is not list:
            raise RemoteProtocolError("announce-list is not a list", "bad_tracker")
        seen: set[str] = set()
        for tier in announce_list:
            if type(tier) is not list:
                raise RemoteProtocolError("announce-list tier is not a list", "bad_tracker")
            urls = []
            for raw in tier:
                url = _url(raw, "bad_tracker")
                if url is not None and url not in seen:
                    seen.add(url)
                    urls.append(url)
            count += len(urls)
            if count > MAX_TRACKERS:
                raise RemoteProtocolError(f"more than {MAX_TRACKERS} trackers", "bad_tracker")
            if urls:
                tiers.append(tuple(urls))
    if not tiers and first is not None:
        tiers.append((first,))
    return tuple(tiers)


def _url_list(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    items = [raw] if type(raw) is bytes else raw
    if type(items) is not list or len(items) > MAX_WEB_SEEDS:
        raise RemoteProtocolError("url-list is not a string or bounded list", "bad_url_list")
    urls = (_url(u, "bad_url_list") for u in items)
    return tuple(dict.fromkeys(u for u in urls if u is not None))


def _opt_text(d: dict, key: bytes) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if type(v) is not bytes:
        raise RemoteProtocolError(f"{key.decode()} is not a string", "bad_field")
    # Informational only: undecodable bytes are shown, not refused.
    return v.decode("utf-8", "replace")


def _opt_int(d: dict, key: bytes) -> int | None:
    v = d.get(key)
    if v is not None and type(v) is not int:
        raise RemoteProtocolError(f"{key.decode()} is not an integer", "bad_field")
    return v


# ---------------------------------------------------------------------------
# Creation
# ---------------------------------------------------------------------------


def create_metainfo(
    name: str,
    files: Sequence[tuple],
    piece_length: int,
    pieces: bytes,
    announce_list: Sequence[Sequence[str]] = (),
    *,
    url_list: Sequence[str] = (),
    private: bool = False,
    comment: str | None = None,
    created_by: str | None = "shoal",
) -> tuple[bytes, bytes]:
    """Return ``(metainfo bytes, info_hash)`` for a v1 torrent.

    ``files`` lists ``(path, length)`` or ``(path, length, attr)`` tuples in
    stream order, ``path`` being a tuple of components; an ``attr`` containing
    ``"p"`` makes a BEP 47 pad file (whose bytes the caller hashed as zeros).

    Layout rule: exactly one file whose path is ``(name,)`` and that is not a
    pad file gives a *single-file* torrent (``info.length``); anything else
    gives a multi-file torrent (``info.files``) in the directory ``name``.

    ``announce_list`` is a list of tiers (BEP 12). The first URL is also
    written as ``announce``; ``announce-list`` is written when there is more
    than one URL. Output is deterministic (no creation date).
    """
    if not isinstance(name, str) or not _component_ok(_utf8_local(name)):
        raise LocalProtocolError(f"bad torrent name {name!r}", "bad_name")
    _check_piece_length(piece_length)
    if not files:
        raise LocalProtocolError("a torrent needs at least one file", "bad_layout")
    entries = []
    total = 0
    for f in files:
        if len(f) not in (2, 3):
            raise LocalProtocolError("files entries are (path, length[, attr])", "bad_files")
        path, length = tuple(f[0]), f[1]
        attr = f[2] if len(f) == 3 else ""
        if (
            not path
            or len(path) > MAX_PATH_DEPTH
            or not all(isinstance(c, str) and _component_ok(_utf8_local(c)) for c in path)
        ):
            raise LocalProtocolError(f"unsafe file path {path!r}", "bad_path")
        if type(length) is not int or length < 0:
            raise LocalProtocolError(f"bad file length {length!r}", "bad_file_length")
        if not isinstance(attr, str):
            raise LocalProtocolError("attr must be a str", "bad_attr")
        entries.append((path, length, attr))
        total += length
    if not 0 < total <= MAX_TOTAL_LENGTH:
        raise LocalProtocolError(f"total length {total} out of bounds", "bad_total_length")
    real = [p for p, _, a in entries if _PAD not in a]
    if len(set(real)) != len(real) or not set(real).isdisjoint(
        p[:i] for p in real for i in range(1, len(p))
    ):
        raise LocalProtocolError("file paths collide", "duplicate_path")
    if type(pieces) is not bytes or len(pieces) != _HASH_LEN * -(-total // piece_length):
        raise LocalProtocolError("pieces does not match the total length / piece_length", "bad_pieces")

    info: dict[str, object] = {"name": name, "piece length": piece_length, "pieces": pieces}
    if len(entries) == 1 and entries[0][0] == (name,) and _PAD not in entries[0][2]:
        info["length"] = entries[0][1]
        if entries[0][2]:
            info["attr"] = entries[0][2]
    else:
        info["files"] = [
            {"length": length, "path": list(path), **({"attr": attr} if attr else {})}
            for path, length, attr in entries
        ]
    if private:
        info["private"] = 1

    meta: dict[str, object] = {"info": info}
    tiers = [[_check_url(u) for u in tier] for tier in announce_list]
    tiers = [t for t in tiers if t]
    urls = [u for t in tiers for u in t]
    if urls:
        meta["announce"] = urls[0]
        if len(urls) > 1:
            meta["announce-list"] = tiers
    if url_list:
        meta["url-list"] = [_check_url(u) for u in url_list]
    if comment is not None:
        meta["comment"] = comment
    if created_by is not None:
        meta["created by"] = created_by
    raw_info = encode(info)
    return encode(meta), hashlib.sha1(raw_info).digest()


def _utf8_local(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{s!r} is not valid Unicode", "bad_path") from None


def _check_piece_length(piece_length: int) -> None:
    if (
        type(piece_length) is not int
        or piece_length & (piece_length - 1)
        or not MIN_PIECE_LENGTH <= piece_length <= MAX_PIECE_LENGTH
    ):
        raise LocalProtocolError("piece_length must be a power of two in 16 KiB..16 MiB", "bad_piece_length")


def _check_url(url: str) -> str:
    if not isinstance(url, str) or not url or len(_utf8_local(url)) > MAX_URL_BYTES or _URL_BAD.search(url):
        raise LocalProtocolError(f"bad URL {url!r}", "bad_url")
    return url


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

    ``pieces`` is the concatenation of the SHA-1 of each piece. Unlike
    :func:`create_metainfo`, ``announce`` and ``announce_list`` are written as
    given (the demo and the interop drivers rely on this exact output).
    """
    _check_piece_length(piece_length)
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


# ---------------------------------------------------------------------------
# Magnet links
# ---------------------------------------------------------------------------

_HEX40 = re.compile(r"[0-9A-Fa-f]{40}")
_B32 = re.compile(r"[A-Za-z2-7]{32}")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# "tr.1=..." style numbered keys are written by some clients.
_NUMBERED = re.compile(r"(xt|dn|tr|ws)\.[0-9]{1,3}")


def _bad_magnet(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg, "bad_magnet")


def parse_magnet(uri: str) -> Magnet:
    """Parse ``magnet:?xt=urn:btih:...&dn=...&tr=...&ws=...&x.pe=host:port``.

    The info-hash may be 40 hex digits or 32 base32 characters (either
    case). ``tr``, ``ws`` and ``x.pe`` may repeat (duplicates dropped, order
    kept); unknown parameters are ignored (BEP 9 allows them); a magnet with
    only a v2 ``urn:btmh:`` topic, or two different ``btih`` topics, is
    refused.
    """
    if not isinstance(uri, str):
        raise LocalProtocolError("magnet URI must be a str", "bad_type")
    if len(uri) > MAX_MAGNET_LENGTH:
        raise _bad_magnet(f"magnet URI longer than {MAX_MAGNET_LENGTH}")
    if uri[:8].lower() != "magnet:?":
        raise _bad_magnet("not a magnet:? URI")
    query = uri[8:].split("#", 1)[0]
    info_hash = None
    name = None
    trackers: dict[str, None] = {}
    seeds: dict[str, None] = {}
    peers: dict[tuple[str, int], None] = {}
    for part in query.split("&"):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep:
            raise _bad_magnet("magnet parameter without '='")
        if _NUMBERED.fullmatch(key):
            key = key.split(".", 1)[0]
        if key not in ("xt", "dn", "tr", "ws", "x.pe"):
            continue
        value = _unescape(raw)
        if key == "xt":
            h = _btih(value)
            if h is not None:
                if info_hash is not None and h != info_hash:
                    raise _bad_magnet("two different info-hashes")
                info_hash = h
        elif key == "dn":
            if name is None:
                name = value
        elif key == "tr":
            trackers[_magnet_url(value)] = None
            if len(trackers) > MAX_TRACKERS:
                raise _bad_magnet("too many trackers")
        elif key == "ws":
            seeds[_magnet_url(value)] = None
            if len(seeds) > MAX_WEB_SEEDS:
                raise _bad_magnet("too many web seeds")
        else:
            peers[_peer(value)] = None
            if len(peers) > MAX_MAGNET_PEERS:
                raise _bad_magnet("too many peers")
    if info_hash is None:
        raise _bad_magnet("magnet has no urn:btih: topic")
    return Magnet(info_hash, name, tuple(trackers), tuple(seeds), tuple(peers))


def _unescape(raw: str) -> str:
    if _BAD_ESCAPE.search(raw):
        raise _bad_magnet("malformed percent escape")
    try:
        value = urllib.parse.unquote_plus(raw, errors="strict")
    except UnicodeDecodeError:
        raise _bad_magnet("escaped bytes are not UTF-8") from None
    if _CONTROL.search(value):
        raise _bad_magnet("control character in a magnet parameter")
    return value


def _btih(value: str) -> bytes | None:
    low = value[:9].lower()
    if low == "urn:btmh:":
        return None  # v2 topic: ignored; a magnet with only this is refused
    if low != "urn:btih:":
        return None  # another network's topic
    digest = value[9:]
    if _HEX40.fullmatch(digest):
        return bytes.fromhex(digest)
    if _B32.fullmatch(digest):
        try:
            return base64.b32decode(digest.upper())
        except binascii.Error:  # pragma: no cover - the regex admits only valid input
            raise _bad_magnet("bad base32 info-hash") from None
    raise _bad_magnet("info-hash is neither 40 hex nor 32 base32 characters")


def _magnet_url(value: str) -> str:
    if not value or len(value.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES or _URL_BAD.search(value):
        raise _bad_magnet("bad URL in magnet")
    return value


def _peer(value: str) -> tuple[str, int]:
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise _bad_magnet("bad x.pe address")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _bad_magnet("bad IPv6 address in x.pe") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not _HOSTNAME.fullmatch(host):
            raise _bad_magnet("bad x.pe address")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        raise _bad_magnet("bad port in x.pe")
    return host, int(port)


def format_magnet(magnet: Magnet) -> str:
    """The URI for ``magnet``: hex info-hash, then dn, tr, ws, x.pe."""
    parts = ["xt=urn:btih:" + magnet.info_hash.hex()]
    q = _quote
    if magnet.display_name is not None:
        parts.append("dn=" + q(magnet.display_name))
    parts.extend("tr=" + q(u) for u in magnet.trackers)
    parts.extend("ws=" + q(u) for u in magnet.web_seeds)
    parts.extend(
        "x.pe=" + q(f"[{h}]:{p}" if ":" in h else f"{h}:{p}") for h, p in magnet.peers
    )
    return "magnet:?" + "&".join(parts)


def _quote(s: str) -> str:
    return urllib.parse.quote(s, safe="")

