"""Who may use the tracker: whitelist, passkeys, per-IP rate limit, UDP connection ids.

All pure: files are read by :func:`load_policy`, and time is an argument.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from shoal.daemons.runtime.config import ConfigError
from shoal.daemons.runtime.ratelimit import KeyedRateLimiter
from shoal.daemons.tracker.config import AccessSection

# A whitelist or passkey file is read whole into memory at start and on
# SIGHUP; one hash is 41 bytes, so 64 MiB holds over a million entries.
MAX_LIST_FILE_BYTES = 64 << 20
# A passkey is a URL path segment; keep it to a sane length and charset.
MAX_PASSKEY_LEN = 64


@dataclass(frozen=True, slots=True)
class Route:
    """Where an HTTP path or a BEP 41 URL points: announce or scrape."""

    kind: str  # "announce" | "scrape"
    passkey: bytes | None


class AccessPolicy:
    def __init__(
        self,
        section: AccessSection,
        whitelist: frozenset[bytes] | None,
        passkeys: frozenset[bytes] | None,
    ) -> None:
        self.whitelist = whitelist if section.mode == "whitelist" else None
        self.passkeys = passkeys
        self.limiter = (
            KeyedRateLimiter(section.rate_limit, section.rate_burst, section.max_tracked_ips)
            if section.rate_limit > 0
            else None
        )
        self._exempt_nets = tuple(ipaddress.ip_network(n) for n in section.rate_limit_exempt)
        self._exempt: dict[str, bool] = {}
        self._max_ips = section.max_tracked_ips

    def route(self, path: bytes) -> Route | str:
        """Map a request path to a :class:`Route`, or a rejection reason.

        Open trackers use ``/announce`` and ``/scrape`` (BEP 48 derives the
        scrape URL by replacing "announce" in the last path segment). Private
        trackers put a passkey first: ``/<passkey>/announce``.
        """
        parts = path.split(b"/")
        if len(parts) == 2 and parts[0] == b"":
            passkey, last = None, parts[1]
        elif len(parts) == 3 and parts[0] == b"":
            passkey, last = parts[1], parts[2]
        else:
            return "not_found"
        if last not in (b"announce", b"scrape"):
            return "not_found"
        if self.passkeys is not None:
            if passkey is None or passkey not in self.passkeys:
                return "bad_passkey"
        elif passkey is not None:
            return "not_found"
        return Route(last.decode(), passkey)

    def torrent_allowed(self, info_hash: bytes) -> bool:
        return self.whitelist is None or info_hash in self.whitelist

    def rate_ok(self, ip: str, now: float) -> bool:
        if self.limiter is None:
            return True
        exempt = self._exempt.get(ip)
        if exempt is None:
            if len(self._exempt) >= self._max_ips:
                self._exempt.clear()
            addr = ipaddress.ip_address(ip)
            exempt = self._exempt[ip] = any(addr in net for net in self._exempt_nets)
        return exempt or self.limiter.allow(ip, now)


class AddressSlots:
    """Connections open per client address, against a cap: one address cannot
    fill the server's global connection limit and lock everyone else out.

    An IPv4 address counts alone; an IPv6 address counts with its /64, which
    one subscriber gets whole (and so could walk through to dodge the cap).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: dict[str, int] = {}

    @staticmethod
    def key(ip: str) -> str:
        if ":" not in ip:
            return ip
        try:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        except ValueError:  # a scoped address (fe80::1%eth0): on its own
            return ip

    def acquire(self, ip: str) -> str | None:
        """Take a slot for ``ip``: the key to release, or None (nothing
        taken) if its address already holds ``cap``."""
        key = self.key(ip)
        n = self.open.get(key, 0)
        if n >= self.cap:
            return None
        self.open[key] = n + 1
        return key

    def release(self, key: str) -> None:
        n = self.open[key] - 1
        if n:
            self.open[key] = n
        else:
            del self.open[key]


def load_policy(section: AccessSection, source: str = "access") -> AccessPolicy:
    """Read the whitelist and passkey files; raise ConfigError if unreadable or bad."""
    whitelist = None
    if section.whitelist_file is not None:
        whitelist = frozenset(_read_hashes(section.whitelist_file))
    passkeys = None
    if section.passkeys_file is not None:
        passkeys = frozenset(_read_passkeys(section.passkeys_file))
    return AccessPolicy(section, whitelist, passkeys)


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LIST_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_LIST_FILE_BYTES:
        raise ConfigError(str(path), "-", f"larger than {MAX_LIST_FILE_BYTES} bytes")
    out = []
    for n, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append((n, line))
    return out


def _read_hashes(path: Path) -> list[bytes]:
    hashes = []
    for n, line in _lines(path):
        try:
            raw = bytes.fromhex(line)
        except ValueError:
            raw = b""
        if len(raw) != 20:
            raise ConfigError(str(path), f"line {n}", "expected a 40-digit hex info-hash")
        hashes.append(raw)
    return hashes


def _read_passkeys(path: Path) -> list[bytes]:
    keys = []
    for n, line in _lines(path):
        if len(line) > MAX_PASSKEY_LEN or not all(c.isalnum() or c in "-_" for c in line):
            raise ConfigError(str(path), f"line {n}", f"a passkey is 1-{MAX_PASSKEY_LEN} of [A-Za-z0-9_-]")
        keys.append(line.encode())
    return keys


class ConnectionIds:
    """Stateless BEP 15 connection ids that survive a restart.

    An id is a keyed hash of the client's IP and the current minute, so the
    tracker stores nothing per client and an id used from another IP fails:
    a spoofed source cannot announce without first receiving the id sent to
    it. The port is left out on purpose: NAT rebinding changes it, and
    libtorrent caches one id per tracker for the whole process. BEP 15: a
    client may use an id for one minute and a tracker should accept it for
    two, so ids from the current and the previous minute are valid.

    Surviving a restart takes two things: the daemon keeps ``secret`` in its
    state directory, and the minute is counted on a clock that a restart
    does not move. ``now`` is the caller's monotonic time (trio's clock
    starts at a random offset in every process), so the daemon passes
    ``clock_offset`` = wall time minus monotonic time, read once at start:
    minutes are then wall-clock minutes, and a wall-clock step while the
    daemon runs changes nothing.
    """

    EPOCH = 60.0
    _U64 = struct.Struct(">Q")

    def __init__(self, secret: bytes | None = None, clock_offset: float = 0.0) -> None:
        self.secret = secret or os.urandom(32)
        self.clock_offset = clock_offset

    def _make(self, ip: str, epoch: int) -> int:
        h = hashlib.blake2b(f"{ip}|{epoch}".encode(), key=self.secret, digest_size=8)
        return self._U64.unpack(h.digest())[0]

    def _epoch(self, now: float) -> int:
        return int((now + self.clock_offset) // self.EPOCH)

    def issue(self, ip: str, now: float) -> int:
        return self._make(ip, self._epoch(now))

    def valid(self, connection_id: int, ip: str, now: float) -> bool:
        epoch = self._epoch(now)
        return connection_id == self._make(ip, epoch) or connection_id == self._make(ip, epoch - 1)
