"""Peer exchange (BEP 11): a peer learns of another from a third, not from a tracker."""

import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo


async def test_leechers_that_only_know_the_seeder_find_each_other_through_pex(lab, tmp_path):
    # No tracker answers: every address comes from add_addresses or from PEX.
    shared = make_shared_file(tmp_path / "seed", "data.bin", 8 << 20, "http://127.0.0.1:1/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    with trio.fail_after(30):
        seeder = await lab.peer(upload_rate=1 << 20, pex_interval=0.2)
        await seeder.add(meta, shared.path.parent)
        at_seeder = (seeder.listen_addr.host, seeder.listen_addr.port)
        b_session, c_session = await lab.peer(pex_interval=0.2), await lab.peer(pex_interval=0.2)
        b, c = await b_session.add(meta), await c_session.add(meta)
        b.add_addresses([at_seeder])
        c.add_addresses([at_seeder])
        c_addr = (c_session.listen_addr.host, c_session.listen_addr.port)
        while not any(link.peer_id == c_session.peer_id for link in b.links):
            await b.peers_changed.wait()
        # The seeder told b of c (c dialled the seeder, so it learned c's
        # listening port from c's extended handshake), and b dialled it.
        assert c_addr in b.known

