"""Crowds that take slots without using them: a real leecher still gets served.

Each hostile connection is a raw socket driven by our own codec, from its own
loopback address (127.0.5.x / 127.0.6.x, so no per-address cap hides the
point) unless the test is about one address. The leecher that must still
finish is a real libtorrent client.
"""

import itertools
import os
import socket

import pytest
import trio

from shoal.daemons.peer.config import ChokerSection
from shoal.demo.realclients import LibtorrentClient, make_shared_file
from shoal.protocol import peer_wire as pw
from shoal.protocol.metainfo import parse_metainfo

from .conftest import next_client_ip, sha1

_crowd_ips = (f"127.0.{5 + n // 250}.{1 + n % 250}" for n in itertools.count())


def count(metric, label) -> float:
    return metric.labels(label)._value.get()


async def open_peer(addr, info_hash: bytes, num_pieces: int, ip: str | None = None, *, rcvbuf: int = 0,
                    peer_id: bytes | None = None):
    """A raw connection to ``addr`` from ``ip``, our handshake sent: (stream, conn)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.bind((ip or next(_crowd_ips), 0))
    await sock.connect((addr.host, addr.port))
    stream = trio.SocketStream(sock)
    conn = pw.PeerConnection(num_pieces=num_pieces)
    peer_id = peer_id or b"-EV0001-" + os.urandom(6).hex().encode()
    await stream.send_all(conn.send(pw.Handshake(info_hash, peer_id)))
    return stream, conn


async def next_event(stream, conn):
    """The next message from the peer; ConnectionClosed at end of file or reset."""
    while True:
        event = conn.next_event()
        if event is not pw.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # a reset, or the test closed it
            data = b""
        conn.receive_data(data)


async def drain(stream, conn) -> None:
    """Read and discard whatever the peer sends, until it closes."""
    while not isinstance(await next_event(stream, conn), pw.ConnectionClosed):
        pass


async def seeded(lab, tmp_path, size=8 << 20, **peer_kw):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", size, f"http://{tracker['http']}/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    session = await lab.peer(**peer_kw)
    torrent = await session.add(meta, shared.path.parent)
    return shared, meta, session, torrent


async def links_reach(torrent, n: int) -> None:
    while len(torrent.links) < n:
        await torrent.peers_changed.wait()


def libtorrent_leecher(shared, tmp_path, seeder_session, ip: str | None = None):
    client = LibtorrentClient(ip or next_client_ip())
    handle = client.add(shared.torrent, tmp_path / "lt")
    handle.connect_peer((seeder_session.listen_addr.host, seeder_session.listen_addr.port))
    return client


async def finishes(client, meta, timeout: float) -> bool:
    return await trio.to_thread.run_sync(client.wait_until, lambda: meta.info_hash in client.finished, timeout)


async def test_sixty_idle_connections_do_not_lock_a_real_leecher_out(lab, tmp_path, nursery):
    """60 peers handshake, send an empty bitfield and sit. Before, they filled
    the seeder's hard limit (60) for good. Now each beyond the soft limit (50)
    replaces the least useful one, and so does the libtorrent leecher."""
    shared, meta, seeder, torrent = await seeded(lab, tmp_path)
    streams = []
    with trio.fail_after(30):
        for _ in range(60):
            stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces)
            await stream.send_all(conn.send(pw.Bitfield(bytes((meta.num_pieces + 7) // 8))))
            streams.append(stream)
        while len(torrent.links) + count(seeder.metrics.disconnects, "evicted") < 60:
            await torrent.peers_changed.wait()
        assert sum(not link.close_reason for link in torrent.links) == 50  # the soft limit
    client = libtorrent_leecher(shared, tmp_path, seeder)
    try:
        assert await finishes(client, meta, 30), client.errors[-5:]
        assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
        assert count(seeder.metrics.disconnects, "evicted") >= 1
        assert len(torrent.links) <= 60
    finally:
        client.close()
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_one_address_gets_max_per_address_connections(lab, tmp_path):
    shared, meta, seeder, torrent = await seeded(lab, tmp_path, size=1 << 20, max_per_address=3)
    ip = next_client_ip()
    answered, refused = 0, 0
    streams = []
    with trio.fail_after(20):
        for _ in range(6):
            stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces, ip)
            streams.append(stream)
            event = await next_event(stream, conn)
            if isinstance(event, pw.ConnectionClosed):
                refused += 1
            else:
                answered += 1
        # Another address is served as usual.
        stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces)
        streams.append(stream)
        assert isinstance(await next_event(stream, conn), pw.Handshake)
    assert (answered, refused) == (3, 3)
    assert count(seeder.metrics.disconnects, "per_address") == 3
    for stream in streams:
        await trio.aclose_forcefully(stream)


async def test_handshake_and_first_message_deadlines(lab, tmp_path):
    shared, meta, seeder, torrent = await seeded(lab, tmp_path, size=1 << 20, handshake_timeout=0.3,
                                                 first_message_timeout=0.3)
    with trio.fail_after(10):
        # Connects and says nothing at all.
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.bind((next_client_ip(), 0))
        await sock.connect((seeder.listen_addr.host, seeder.listen_addr.port))
        mute = trio.SocketStream(sock)
        assert await mute.receive_some(65536) == b""
        # Handshakes, then only keeps the connection alive.
        stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces)
        async with stream:
            assert isinstance(await next_event(stream, conn), pw.Handshake)
            await stream.send_all(conn.send(pw.KeepAlive()))
            await drain(stream, conn)
        await mute.aclose()
    assert count(seeder.metrics.disconnects, "handshake_timeout") == 1
    assert count(seeder.metrics.disconnects, "silent") == 1


async def test_seeds_disconnect_from_seeds(lab, tmp_path):
    shared, meta, seeder, torrent = await seeded(lab, tmp_path, size=1 << 20)
    other = await (await lab.peer()).add(meta, shared.path.parent)
    assert torrent.state == other.state == "seeding"
    with trio.fail_after(10):
        other.add_addresses([(seeder.listen_addr.host, seeder.listen_addr.port)])
        while count(seeder.metrics.disconnects, "seed_to_seed") + count(
                other.session.metrics.disconnects, "seed_to_seed") == 0:
            await torrent.peers_changed.wait()
        while torrent.links:
            await torrent.peers_changed.wait()


async def interested_crowd(seeder, meta, n: int, nursery):
    """n peers that say Interested and then never request; they read all we send."""
    streams = []
    for _ in range(n):
        stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces)
        await stream.send_all(conn.send(pw.Interested()))
        streams.append(stream)
        nursery.start_soon(drain, stream, conn)
    return streams


@pytest.mark.parametrize("crowd, grace", [(10, None), (50, 1.0)])
async def test_interested_only_peers_do_not_hold_the_upload_slots(lab, tmp_path, nursery, crowd, grace):
    """Before: 10 such peers made a leecher wait 123 s for 8 MiB, 50 kept it at 0."""
    choker = ChokerSection() if grace is None else ChokerSection(request_grace=grace)
    shared, meta, seeder, torrent = await seeded(lab, tmp_path, choker=choker)
    with trio.fail_after(30):
        streams = await interested_crowd(seeder, meta, crowd, nursery)
        await links_reach(torrent, crowd)
    client = libtorrent_leecher(shared, tmp_path, seeder)
    try:
        assert await finishes(client, meta, 30), client.errors[-5:]
        assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
        assert torrent.choker.unused_slots >= 1
    finally:
        client.close()
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def test_a_slow_reader_still_receives_choke_and_have(lab, tmp_path):
    """A peer requests 7 MiB with a tiny receive buffer and stops reading, then
    says Not Interested. Before: the Choke and the Haves for the pieces verified
    meanwhile were dropped, because they shared a full channel with the blocks."""
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", 16 << 20, f"http://{tracker['http']}/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    source = await lab.peer(upload_rate=3 << 20)
    await source.add(meta, shared.path.parent)
    x_session = await lab.peer()
    x = await x_session.add(meta)
    with trio.fail_after(60):
        while x.storage.num_verified < 30:
            await x.piece_verified.wait()
        stream, conn = await open_peer(x_session.listen_addr, meta.info_hash, meta.num_pieces, rcvbuf=4096)
        async with stream:
            event = await next_event(stream, conn)
            have: set[int] = set()
            while not isinstance(event, pw.Unchoke):
                if isinstance(event, pw.Bitfield):
                    have = {i for i in range(meta.num_pieces) if event.bits[i >> 3] & (0x80 >> (i & 7))}
                    await stream.send_all(conn.send(pw.Interested()))
                elif isinstance(event, pw.Have):
                    have.add(event.index)
                event = await next_event(stream, conn)
            requested = sorted(have)[:28]  # 448 blocks, 7 MiB: more than the socket buffers hold
            await stream.send_all(b"".join(conn.send(pw.Request(i, b, 16384))
                                           for i in requested for b in range(0, meta.piece_length, 16384)))
            at_request = x.storage.num_verified
            while x.storage.num_verified < at_request + 2:  # X's writer to us is stuck by now
                await x.piece_verified.wait()
            await stream.send_all(conn.send(pw.NotInterested()))
            await x.completed.wait()
            missing = set(range(meta.num_pieces)) - have
            choked = False
            while missing or not choked:
                event = await next_event(stream, conn)
                assert not isinstance(event, pw.ConnectionClosed), (missing, choked)
                if isinstance(event, pw.Choke):
                    choked = True
                elif isinstance(event, pw.Have):
                    missing.discard(event.index)


async def test_a_peer_that_never_reads_its_control_messages_is_disconnected(lab, tmp_path):
    """It asks for the same 16 KiB metadata piece again and again and reads
    nothing. Control messages are never dropped, so its lane grows until the
    limit, and then the connection is closed (before: replies were dropped
    silently once the channel was full, and the peer kept its place)."""
    from shoal.protocol.metainfo import create_single_file

    n = 8192  # 160 KiB of piece hashes: ten 16 KiB metadata pieces
    raw, _ = create_single_file("big.bin", n * 16384, 16384, os.urandom(20 * n), "http://127.0.0.1:1/announce")
    meta = parse_metainfo(raw)
    session = await lab.peer()
    torrent = await session.add(meta, tmp_path / "dl")  # a leecher; it still serves the metadata
    with trio.fail_after(30):
        stream, conn = await open_peer(session.listen_addr, meta.info_hash, meta.num_pieces, rcvbuf=4096)
        async with stream:
            assert isinstance(await next_event(stream, conn), pw.Handshake)  # then we read no more
            await links_reach(torrent, 1)
            hs = pw.ExtHandshake(m={"ut_metadata": 3})
            ask = conn.send(pw.Extended(1, pw.encode_metadata(pw.MetadataRequest(0))))
            await stream.send_all(conn.send(pw.Extended(0, pw.encode_ext_handshake(hs))))
            try:
                while torrent.links:
                    await stream.send_all(ask * 64)  # 1 MiB of replies owed per 64 asks
            except trio.BrokenResourceError:
                pass  # closed on us while we were still asking
            while torrent.links:
                await torrent.peers_changed.wait()
    assert count(session.metrics.disconnects, "control_overflow") == 1
