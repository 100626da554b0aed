"""The peer daemon's control RPC: the parameters of each method.

Clients (``shoal peer ...``, the worker, the tests) call these over the
daemon's unix control socket; the daemon registers one handler per contract
with ``rpc_method``. Methods: ``add``, ``status`` (no parameters), ``wait``,
``stream``, ``limits`` and ``remove``. Domain error codes beyond the shared
ones (:data:`shoal.protocol.contract.ERROR_CODES`) are in :data:`ERROR_CODES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.protocol.contract import BadParams, Contract, bounded

__all__ = ["AddTorrent", "ERROR_CODES", "Limits", "MAX_RATE", "MAX_TORRENT_BYTES", "StreamTorrent",
           "TorrentRef", "WaitTorrent", "info_hash_of"]

#: A .torrent sent over the control socket (the RPC frame bound, 1 MiB, caps it too).
MAX_TORRENT_BYTES = 1 << 20
#: bytes/s; a bound on what a client may set, far above any link.
MAX_RATE = 1 << 40
#: Linux's PATH_MAX: no destination directory is longer.
MAX_PATH = 4096
#: An info-hash in hex: 20 bytes, 40 digits.
INFO_HASH_HEX = 40

ERROR_CODES = {
    "not_found": "no such torrent",
    "bad_torrent": "the .torrent does not parse",
    "bad_magnet": "the magnet link does not parse",
    "refused": "the torrent cannot be started (peer.max_torrents, or the files cannot be opened)",
}


def info_hash_of(text: str) -> bytes:
    """The 20 bytes of a hex info-hash; :class:`BadParams` otherwise."""
    try:
        info_hash = bytes.fromhex(text)
    except ValueError:
        raise BadParams("expected {info_hash: hex}") from None
    if len(info_hash) != 20:
        raise BadParams("an info-hash is 20 bytes (40 hex digits)")
    return info_hash


def _check_rates(upload_rate: int, download_rate: int) -> None:
    """The message the control RPC has always given for a bad rate."""
    for name, value in (("upload_rate", upload_rate), ("download_rate", download_rate)):
        if not 0 <= value <= MAX_RATE:
            raise BadParams(f"{name} must be an integer number of bytes/s, 0 to {MAX_RATE}")


@dataclass(frozen=True, slots=True)
class AddTorrent(Contract):
    """Start a torrent from the bytes of a .torrent file, or from a magnet link."""

    torrent: bytes | None = bounded(None, max_len=MAX_TORRENT_BYTES)  # a whole .torrent, read into memory
    magnet: str | None = bounded(None, max_len=MAX_TORRENT_BYTES)  # a URI is far shorter; same cap
    dest: str | None = bounded(None, max_len=MAX_PATH)  # an absolute directory
    upload_rate: int = bounded(0)  # 0 to MAX_RATE, checked in __post_init__ (one message for both)
    download_rate: int = bounded(0)

    def __post_init__(self) -> None:
        _check_rates(self.upload_rate, self.download_rate)
        if self.dest is not None and not self.dest.startswith("/"):
            raise BadParams("dest must be an absolute path")
        if self.magnet is None and self.torrent is None:
            raise BadParams("torrent must be the bytes of a .torrent file")


@dataclass(frozen=True, slots=True)
class TorrentRef(Contract):
    """One running torrent, by info-hash (``remove``); the base of every call naming one."""

    info_hash: str = bounded(max_len=INFO_HASH_HEX)  # 40 hex digits

    def __post_init__(self) -> None:
        info_hash_of(self.info_hash)

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.info_hash)


@dataclass(frozen=True, slots=True)
class WaitTorrent(TorrentRef):
    """Until the torrent is complete, or has at least ``pieces`` verified pieces."""

    pieces: int | None = None


@dataclass(frozen=True, slots=True)
class StreamTorrent(TorrentRef):
    """Streaming mode: a reader starts at ``offset`` and reads on at ``rate`` bytes/s."""

    rate: float = bounded()
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Limits(TorrentRef):
    """A torrent's own rate limits, bytes/s (0: none), inside the global ones."""

    upload_rate: int = bounded(0)  # 0 to MAX_RATE, checked in __post_init__ (one message for both)
    download_rate: int = bounded(0)

    def __post_init__(self) -> None:
        TorrentRef.__post_init__(self)  # (zero-argument super() fails in a slotted dataclass)
        _check_rates(self.upload_rate, self.download_rate)

