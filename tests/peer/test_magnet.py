"""Magnet links whose only sources are x.pe peers, and private torrents (BEP 27)."""

import pytest
import trio

from shoal.daemons.peer import metadata
from shoal.daemons.peer.metadata import NoSource, fetch_and_add
from shoal.demo.realclients import LibtorrentClient, make_shared_file
from shoal.protocol import peer_wire as pw
from shoal.protocol.metainfo import Magnet, create_single_file, hash_pieces, parse_metainfo

from .conftest import next_client_ip, sha1
from .test_admission import next_event, open_peer

DEAD_TRACKER = "http://127.0.0.1:1/announce"


async def test_an_x_pe_only_magnet_downloads_from_libtorrent(lab, tmp_path):
    """Before: the metadata came from the x.pe peer, then nobody was dialled for data (0 % forever)."""
    shared = make_shared_file(tmp_path / "seed", "data.bin", 4 << 20, DEAD_TRACKER)
    meta = parse_metainfo(shared.torrent.read_bytes())
    client = LibtorrentClient(next_client_ip())
    try:
        client.add(shared.torrent, shared.path.parent, seed=True)
        magnet = Magnet(meta.info_hash, "data.bin", peers=((client.ip, client.port),))
        with trio.fail_after(60):
            torrent = await fetch_and_add(await lab.peer(), magnet)
            await torrent.completed.wait()
        assert sha1(torrent.save_dir / "data.bin") == sha1(shared.path)
    finally:
        client.close()


async def test_a_magnet_with_no_reachable_source_says_so(lab, monkeypatch):
    monkeypatch.setattr(metadata, "RETRY_AFTER", 0.01)  # five quick tries, not five in 25 s
    session = await lab.peer()
    nobody = (next_client_ip(), 9)  # nothing listens there: refused at once
    with trio.fail_after(20):
        with pytest.raises(NoSource, match="no reachable source"):
            await fetch_and_add(session, Magnet(b"\x01" * 20, peers=(nobody,)))
        with pytest.raises(NoSource, match="no tracker and no x.pe peer"):
            await fetch_and_add(session, Magnet(b"\x02" * 20))


@pytest.mark.parametrize("private", [True, False])
async def test_a_private_torrent_neither_offers_nor_acts_on_pex(lab, tmp_path, private):
    data = bytes(range(256)) * 1024
    raw, _ = create_single_file("p.bin", len(data), 16384, hash_pieces(data, 16384), DEAD_TRACKER,
                                private=private)
    (tmp_path / "p.bin").write_bytes(data)
    meta = parse_metainfo(raw)
    assert meta.private == private
    session = await lab.peer(pex_interval=0.1)
    torrent = await session.add(meta, tmp_path)
    trap = (next_client_ip(), 6999)
    with trio.fail_after(10):
        stream, conn = await open_peer(session.listen_addr, meta.info_hash, meta.num_pieces)
        async with stream:
            event = await next_event(stream, conn)
            while not (isinstance(event, pw.Extended) and event.ext_id == 0):
                event = await next_event(stream, conn)
            theirs = pw.decode_ext_handshake(event.payload).m
            assert ("ut_pex" in theirs) == (not private)
            hs = pw.ExtHandshake(m={"ut_pex": 7, "ut_metadata": 8})
            pex = pw.Pex(added=(trap,), added_flags=b"\x10")
            # PEX to the id shoal uses for it (offered or not), then a metadata
            # request: its answer means the PEX message was handled before it.
            await stream.send_all(conn.send(pw.Extended(0, pw.encode_ext_handshake(hs)))
                                  + conn.send(pw.Extended(2, pw.encode_pex(pex)))
                                  + conn.send(pw.Extended(theirs["ut_metadata"],
                                                          pw.encode_metadata(pw.MetadataRequest(0)))))
            event = await next_event(stream, conn)
            while not (isinstance(event, pw.Extended) and event.ext_id == 8):
                assert not (isinstance(event, pw.Extended) and event.ext_id == 7), "sent us PEX"
                event = await next_event(stream, conn)
            assert isinstance(pw.decode_metadata(event.payload), pw.MetadataData)
    assert (trap in torrent.known) == (not private)
