"""Web seeds (BEP 19): an HTTP server as a fallback source of pieces.

A torrent's ``url-list`` names HTTP(S) servers holding the same files -- in
the seeds' Spotify design, the CDN that peers fall back on. Each URL becomes
a :class:`WebSeed`, a pseudo-peer that has every piece: the picker hands it
blocks like any peer (rarest-first, so it tends to fetch what the swarm
lacks; deadlined pieces first when streaming), it fetches them with HTTP
range requests, and its blocks go through the same store-and-verify path as
blocks from peers. A piece that fails its hash and came only from the web
seed stops that web seed.

URL mapping (BEP 19): for a single-file torrent the URL is the file itself,
unless it ends in ``/``, when the torrent's name is appended; for a
multi-file torrent, ``<url>/<name>/<path...>`` (components percent-encoded).
A byte range that spans files becomes one request per file.

At most ``FETCH_BYTES`` are asked for at once (whole pieces, or the blocks
the picker gives); a failed request hands its blocks back to the picker and
the web seed waits ``2^failures`` seconds (at most ``MAX_BACKOFF``) before
its next one. After a disk error, while the torrent's new requests pause,
the web seed asks for nothing either (what it had picked goes back to the
picker). Responses are bounded: a 206 must carry exactly the range; a
200 (a server that ignores Range) is accepted only for a whole small file.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse

import h11
import trio

from shoal.daemons.peer.interfaces import Banned, TorrentHost

log = logging.getLogger("shoal.peer")

FETCH_BYTES = 1 << 20  # bytes asked for in one round of requests
MAX_BACKOFF = 60.0  # seconds between attempts after repeated failures
TIMEOUT = 30.0  # one HTTP request, connect to last byte
MAX_HEADER_BYTES = 16 << 10


class WebSeedError(Exception):
    """The server did not deliver the range (status, size, connection)."""


class WebSeed:
    def __init__(self, torrent: TorrentHost, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"web seed {url!r}: only http:// and https:// URLs")
        self.torrent = torrent
        self.url = url
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.path = u.path or "/"
        self.addr = (self.host, self.port)  # what bans and logs name
        self.closed = False
        self.failures = 0
        self.downloaded = 0

    def __repr__(self) -> str:
        return f"<web seed {self.url}>"

    # The picker and the torrent call these on any peer.
    def cancel(self, index: int, begin: int, length: int) -> None:
        """Nothing to send: the range is already on its way; a late block is just not needed."""

    def abort(self) -> None:
        self.closed = True

    def file_target(self, fi: int) -> str:
        meta = self.torrent.meta
        path = self.path
        if meta.single_file:
            return path + urllib.parse.quote(meta.name) if path.endswith("/") else path
        parts = (meta.name, *meta.files[fi].path)
        return path.rstrip("/") + "/" + "/".join(urllib.parse.quote(p) for p in parts)

    async def run(self) -> None:
        t = self.torrent
        picker = t.picker
        picker.peer_have_all(self)
        try:
            while not picker.complete and not self.closed:
                now = trio.current_time()
                blocks = t.pick(self, max(1, FETCH_BYTES // 16384), now)  # none while a disk error pauses
                if not blocks:
                    with trio.move_on_after(1.0):  # nothing to fetch: wait for the picture to change
                        await t.piece_verified.wait()
                    continue
                try:
                    await self._fetch_blocks(blocks)
                    # Its pieces are hashed in tasks of their own: wait for the verdicts, so a web
                    # seed that sent a bad piece is closed before it fetches more (one fetch's worth).
                    await t.writes_done()
                    self.failures = 0
                except (WebSeedError, OSError, h11.ProtocolError, trio.TooSlowError, ssl.SSLError) as exc:
                    self.failures += 1
                    for b in blocks:
                        if picker.is_requested(self, b.index, b.begin):
                            picker.request_failed(self, b.index, b.begin)
                    backoff = min(MAX_BACKOFF, 2.0 ** self.failures)
                    log.info("%s: %s (retrying in %.0fs)", self, exc, backoff)
                    t.metrics.webseed_errors.inc()
                    await trio.sleep(backoff)  # back-off, not synchronisation
        except Banned as exc:
            log.warning("%s: %s; not using it again", self, exc)
        finally:
            picker.peer_gone(self)  # its outstanding blocks are wanted again

    async def _fetch_blocks(self, blocks) -> None:
        """Fetch runs of adjacent blocks with one range each, then store them block by block."""
        t = self.torrent
        plen = t.meta.piece_length
        runs: list[list] = []
        for b in sorted(blocks, key=lambda b: (b.index, b.begin)):
            last = runs[-1][-1] if runs else None
            if last is not None and last.index * plen + last.begin + last.length == b.index * plen + b.begin:
                runs[-1].append(b)
            else:
                runs.append([b])
        for i, run in enumerate(runs):
            if not t.core.may_request(trio.current_time()):  # a disk error began a pause: the rest waits
                for b in (b for later in runs[i:] for b in later):
                    if t.picker.is_requested(self, b.index, b.begin):
                        t.picker.request_failed(self, b.index, b.begin)
                return
            start = run[0].index * plen + run[0].begin
            length = sum(b.length for b in run)
            data = await self.fetch_range(start, length)
            pos = 0
            for b in run:
                block = data[pos:pos + b.length]
                pos += b.length
                if not t.picker.is_requested(self, b.index, b.begin):
                    continue  # someone else delivered it meanwhile (end-game)
                await t.take_download(b.length)
                for other in t.picker.block_received(self, b.index, b.begin):
                    other.cancel(b.index, b.begin, b.length)
                self.downloaded += b.length
                t.downloaded += b.length
                t.metrics.down.inc(b.length)
                t.metrics.webseed_bytes.inc(b.length)
                await t.store_block(self, b.index, b.begin, block)

    async def fetch_range(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of the torrent's data stream."""
        parts = []
        for fi, within, n in self.torrent.storage.file_ranges(offset, length):
            parts.append(await self._get(self.file_target(fi), within, n, self.torrent.meta.files[fi].length))
        return b"".join(parts)

    async def _get(self, target: str, start: int, n: int, file_length: int) -> bytes:
        with trio.fail_after(TIMEOUT):
            stream: trio.abc.Stream
            if self.tls:
                stream = await trio.open_ssl_over_tcp_stream(self.host, self.port,
                                                             ssl_context=ssl.create_default_context())
            else:
                stream = await trio.open_tcp_stream(self.host, self.port,
                                                    local_address=self.torrent.session.local_host)
            async with stream:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
                host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
                req = h11.Request(method="GET", target=target, headers=[
                    ("Host", host), ("Range", f"bytes={start}-{start + n - 1}"), ("Connection", "close"),
                    ("User-Agent", f"shoal/{self.torrent.session.version}")])
                await stream.send_all(conn.send(req) + conn.send(h11.EndOfMessage()))
                status = 0
                body = bytearray()
                # A 206 carries n bytes; a 200 the whole file, accepted only when small.
                limit = n
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(65536)))  # bytes(): no copy of bytes
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        if status == 200 and file_length <= FETCH_BYTES:
                            limit = file_length
                        elif status != 206:
                            raise WebSeedError(f"HTTP {status} for {target}")
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limit:
                            raise WebSeedError(f"more than the {limit} bytes asked for")
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
        if status == 200:
            body = body[start:start + n]
        if len(body) != n:
            raise WebSeedError(f"got {len(body)} of {n} bytes")
        return bytes(body)
