"""Hostile peers are disconnected, counted and banned; everyone else's transfer goes on.

The hostile peer is a raw socket driven by our own codec (or by hand-made
bytes where the codec would refuse to encode the violation), from its own
loopback address so the ban is visible per IP.
"""

import os
import struct

import pytest
import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol import peer_wire as pw
from shoal.protocol.metainfo import parse_metainfo

from .conftest import next_client_ip, sha1


async def dial(session, info_hash: bytes, num_pieces: int):
    ip = next_client_ip()
    addr = session.listen_addr
    stream = await trio.open_tcp_stream(addr.host, addr.port, local_address=ip)
    conn = pw.PeerConnection(num_pieces=num_pieces)
    await stream.send_all(conn.send(pw.Handshake(info_hash, b"-EV0001-" + os.urandom(6).hex().encode())))
    return ip, stream, conn


async def their_handshake(stream, conn) -> None:
    while conn.their_handshake is None:
        event = conn.next_event()
        if event is pw.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))


async def closed_by_peer(stream) -> None:
    """Read until the other side closes (or resets) the connection."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass


async def swarm(lab, tmp_path, size=4 << 20):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", size, f"http://{tracker['http']}/announce",
                              piece_length=256 * 1024)
    meta = parse_metainfo(shared.torrent.read_bytes())
    return shared, meta


def count(metric, label) -> float:
    return metric.labels(label)._value.get()


@pytest.mark.parametrize(
    "case, reason",
    [
        ("wrong_info_hash", "wrong_info_hash"),
        ("oversize_prefix", "too_long"),
        ("bitfield_size", "bad_bitfield"),
    ],
)
async def test_hostile_peer_is_cut_off_while_a_leecher_completes(lab, tmp_path, case, reason):
    with trio.fail_after(60):
        shared, meta = await swarm(lab, tmp_path)
        seeder = await lab.peer(upload_rate=2 << 20)
        await seeder.add(meta, shared.path.parent)
        leecher = await (await lab.peer()).add(meta)

        info_hash = b"\x66" * 20 if case == "wrong_info_hash" else meta.info_hash
        ip, stream, conn = await dial(seeder, info_hash, meta.num_pieces)
        async with stream:
            if case == "oversize_prefix":
                await stream.send_all(struct.pack(">I", 0x7FFFFFFF) + b"\x07")
            elif case == "bitfield_size":
                await their_handshake(stream, conn)
                await stream.send_all(struct.pack(">IB", 1 + 3, 5) + b"\xff\xff\xff")  # 16 pieces need 2 bytes
            await closed_by_peer(stream)

        assert count(seeder.metrics.protocol_errors, reason) == 1
        if case != "wrong_info_hash":  # a wrong info-hash is only refused, not counted against anyone
            # A first protocol error closes the connection and counts one
            # point against that peer; it takes a repeat to ban it.
            peer_key = (meta.info_hash, ip, conn.our_handshake.peer_id)
            assert seeder.bans.offences(peer_key, trio.current_time()) == (1, 0)
            assert count(seeder.metrics.offences, "protocol") == 1
        await leecher.completed.wait()
        assert sha1(leecher.save_dir / "data.bin") == sha1(shared.path)


async def test_unrequested_pieces_get_a_peer_banned(lab, tmp_path):
    with trio.fail_after(60):
        shared, meta = await swarm(lab, tmp_path)
        leecher_session = await lab.peer()
        await leecher_session.add(meta)  # nobody to download from yet
        ip, stream, conn = await dial(leecher_session, meta.info_hash, meta.num_pieces)
        async with stream:
            await their_handshake(stream, conn)
            block = b"\x00" * 16384
            await stream.send_all(b"".join(conn.send(pw.Piece(0, k * 16384, block)) for k in range(12)))
            await closed_by_peer(stream)
        assert leecher_session.banned(meta.info_hash, [(ip, conn.our_handshake.peer_id)]) == "unrequested_piece"
        assert count(leecher_session.metrics.bans, "unrequested_piece") == 1


async def test_a_peer_sending_bad_data_is_banned_and_the_download_finishes_elsewhere(lab, tmp_path):
    with trio.fail_after(60):
        shared, meta = await swarm(lab, tmp_path)
        leecher_session = await lab.peer()
        leecher = await leecher_session.add(meta)
        ip, stream, conn = await dial(leecher_session, meta.info_hash, meta.num_pieces)
        served = 0
        async with stream:
            await their_handshake(stream, conn)
            await stream.send_all(conn.send(pw.HaveAll()) + conn.send(pw.Unchoke()))
            # Answer every request with garbage until the leecher hangs up.
            while True:
                event = conn.next_event()
                if event is pw.NEED_DATA:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        break
                    conn.receive_data(data)
                elif isinstance(event, pw.Request):
                    garbage = bytes([0xA5]) * event.length
                    try:
                        await stream.send_all(conn.send(pw.Piece(event.index, event.begin, garbage)))
                    except trio.BrokenResourceError:
                        break  # banned and hung up on: the point of the test
                    served += 1
        assert served >= meta.piece_length // 16384
        assert leecher_session.banned(meta.info_hash, [(ip, conn.our_handshake.peer_id)]) == "bad_hash"
        assert leecher_session.metrics.failed._value.get() >= 1
        assert not leecher.completed.is_set()

        # A real seeder joins; the download completes from it.
        await (await lab.peer()).add(meta, shared.path.parent)
        await leecher.completed.wait()
        assert sha1(leecher.save_dir / "data.bin") == sha1(shared.path)


async def serve_fake_metadata(raw_info: bytes, info_hash: bytes, *, task_status=trio.TASK_STATUS_IGNORED):
    """A peer that answers BEP 9 requests with ``raw_info`` (which is not the torrent's)."""
    listeners = await trio.open_tcp_listeners(0, host=next_client_ip())
    task_status.started(listeners[0].socket.getsockname()[:2])

    async def handle(stream):
        conn = pw.PeerConnection(num_pieces=None)
        await their_handshake(stream, conn)
        await stream.send_all(conn.send(pw.Handshake.with_flags(info_hash, b"-EV0001-" + b"0" * 12)))
        hs = pw.ExtHandshake(m={"ut_metadata": 3}, metadata_size=len(raw_info))
        await stream.send_all(conn.send(pw.Extended(0, pw.encode_ext_handshake(hs))))
        theirs = None
        while True:
            event = conn.next_event()
            if event is pw.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, pw.Extended) and event.ext_id == 0:
                theirs = pw.decode_ext_handshake(event.payload).m["ut_metadata"]
            elif isinstance(event, pw.Extended) and event.ext_id == 3:
                req = pw.decode_metadata(event.payload)
                piece = raw_info[req.piece * pw.METADATA_PIECE:(req.piece + 1) * pw.METADATA_PIECE]
                reply = pw.MetadataData(req.piece, len(raw_info), piece)
                await stream.send_all(conn.send(pw.Extended(theirs, pw.encode_metadata(reply))))

    await trio.serve_listeners(handle, listeners)


async def test_a_peer_serving_the_wrong_metadata_is_banned(lab, tmp_path, nursery):
    from shoal.daemons.peer.metadata import _try_peer, fetch_metadata
    from shoal.protocol.metainfo import Magnet

    with trio.fail_after(30):
        shared, meta = await swarm(lab, tmp_path)
        other = make_shared_file(tmp_path / "other", "other.bin", 1 << 20, "http://127.0.0.1:1/announce")
        wrong = parse_metainfo(other.torrent.read_bytes()).raw_info
        hostile = await nursery.start(serve_fake_metadata, wrong, meta.info_hash)
        leecher = await lab.peer()
        limiter = trio.CapacityLimiter(1)
        await limiter.acquire_on_behalf_of(hostile)
        await _try_peer(leecher, meta.info_hash, hostile, limiter, None)
        assert leecher.banned(meta.info_hash, [hostile]) == "bad_metadata"
        assert count(leecher.metrics.bans, "bad_metadata") == 1

        # With the liar and an honest seeder both named, the right dictionary wins.
        seeder = await lab.peer()
        await seeder.add(meta, shared.path.parent)
        fresh = await lab.peer()
        honest = (seeder.listen_addr.host, seeder.listen_addr.port)
        fetched = await fetch_metadata(fresh, Magnet(meta.info_hash, peers=(hostile, honest)))
        assert fetched.meta.info_hash == meta.info_hash and fetched.meta.raw_info == meta.raw_info
