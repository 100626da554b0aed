"""Graded, expiring bans per peer and torrent: one bad client never locks out its neighbours."""

import struct

import trio

from shoal.core.swarm.bans import BanList
from shoal.protocol import peer_wire as pw

from .conftest import next_client_ip, sha1
from .test_admission import count, drain, finishes, libtorrent_leecher, next_event, open_peer, seeded

A = (b"t" * 20, "10.0.0.1", 6881)
B = (b"t" * 20, "10.0.0.1", 6882)  # same address, another client
OTHER_TORRENT = (b"u" * 20, "10.0.0.1", 6881)


def test_a_first_offence_only_counts_a_second_bans_and_bans_grow():
    bans = BanList(base=60.0, longest=300.0, forget_after=3600.0)
    assert bans.offend([A], "protocol", now=0.0) is None
    assert bans.banned([A], 1.0) is None
    assert bans.offend([A], "protocol", now=10.0) == 70.0  # base
    assert bans.banned([A], 69.0) == "protocol"
    assert bans.banned([B], 69.0) is None and bans.banned([OTHER_TORRENT], 69.0) is None
    assert bans.banned([A], 70.0) is None  # expired
    bans.offend([A], "protocol", now=100.0)
    assert bans.offend([A], "protocol", now=101.0) == 221.0  # 2 * base
    bans.offend([A], "protocol", now=300.0)
    assert bans.offend([A], "protocol", now=301.0) == 541.0  # 4 * base
    bans.offend([A], "protocol", now=600.0)
    assert bans.offend([A], "protocol", now=601.0) == 901.0  # capped at longest
    assert bans.offences(A, 601.0) == (0, 4)


def test_certain_bad_data_bans_at_once_and_quiet_peers_are_forgiven():
    bans = BanList(base=60.0, forget_after=100.0)
    assert bans.offend([A, B], "bad_hash", now=0.0, points=2) == 60.0
    assert bans.banned([B], 30.0) == "bad_hash"
    bans.offend([OTHER_TORRENT], "protocol", now=0.0)
    assert bans.offences(OTHER_TORRENT, 99.0) == (1, 0)
    assert bans.offences(OTHER_TORRENT, 100.0) == (0, 0)  # forgotten
    assert bans.offend([OTHER_TORRENT], "protocol", now=100.0) is None  # a fresh start


def test_the_ban_list_is_bounded():
    bans = BanList(max_keys=3)
    for port in range(10):
        bans.offend([(b"t" * 20, "10.0.0.1", port)], "protocol", now=0.0, points=2)
    assert len(bans) == 3
    assert bans.banned([(b"t" * 20, "10.0.0.1", 9)], 1.0) == "protocol"
    assert bans.banned([(b"t" * 20, "10.0.0.1", 0)], 1.0) is None


async def test_a_protocol_error_from_one_client_while_another_on_the_same_address_downloads(lab, tmp_path):
    """A buggy client on one IP breaks the protocol, and again (and is banned
    then); a libtorrent client on the same IP downloads all the while.
    Before: the first error banned the IP, for every torrent, until restart."""
    shared, meta, seeder, torrent = await seeded(lab, tmp_path, upload_rate=2 << 20)
    ip = next_client_ip()
    buggy = b"-BUG001-" + b"0" * 12
    bad_bitfield = struct.pack(">IB", 1 + 1, 5) + b"\xff"  # 32 pieces need 4 bytes

    async def connect_and_break() -> bool:
        """One connection from the buggy client; False if the seeder refused it."""
        stream, conn = await open_peer(seeder.listen_addr, meta.info_hash, meta.num_pieces, ip, peer_id=buggy)
        async with stream:
            if not isinstance(await next_event(stream, conn), pw.Handshake):
                return False
            await stream.send_all(bad_bitfield)
            await drain(stream, conn)
        return True

    with trio.fail_after(30):
        assert await connect_and_break()  # one offence: the connection closes, nobody is banned
        assert seeder.banned(meta.info_hash, [(ip, buggy)]) is None
        client = libtorrent_leecher(shared, tmp_path, seeder, ip=ip)
        try:
            while not any(link.addr[0] == ip for link in torrent.links):
                await torrent.peers_changed.wait()
            assert await connect_and_break()  # the second: banned now, that client only
            assert seeder.banned(meta.info_hash, [(ip, buggy)]) == "protocol"
            await connect_and_break()  # refused after the handshake
            assert count(seeder.metrics.disconnects, "banned") == 1
            assert await finishes(client, meta, 30), client.errors[-5:]
            assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
        finally:
            client.close()
    assert count(seeder.metrics.offences, "protocol") == 2
    assert count(seeder.metrics.bans, "protocol") == 1


class _Source:
    """A block source as the torrent sees one (addr, ban_keys, cancel, abort); it records aborts."""

    def __init__(self, ip: str) -> None:
        self.addr = (ip, 6881)
        self.aborted = False

    def ban_keys(self):
        return [self.addr]

    def cancel(self, index, begin, length) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


async def test_a_failed_piece_counts_against_every_peer_that_sent_blocks_of_it(lab, tmp_path):
    """Before: a piece from two senders blamed nobody, so two liars together were never banned."""
    from shoal.demo.realclients import make_shared_file
    from shoal.protocol.metainfo import parse_metainfo

    shared = make_shared_file(tmp_path / "seed", "data.bin", 1 << 20, "http://127.0.0.1:1/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    session = await lab.peer()
    torrent = await session.add(meta)
    liars = [_Source("127.0.7.1"), _Source("127.0.7.2")]
    for liar in liars:
        torrent.picker.peer_have_all(liar)
    for round_ in (1, 2):
        now = trio.current_time()
        first = torrent.picker.pick(liars[0], None, 8, now)
        second = torrent.picker.pick(liars[1], None, 8, now)
        assert {b.index for b in first} == {b.index for b in second}  # one piece, two senders
        for liar, blocks in zip(liars, (first, second), strict=True):
            for b in blocks:
                torrent.picker.block_received(liar, b.index, b.begin)
                await torrent.store_block(liar, b.index, b.begin, b"\xa5" * b.length)
        await torrent.writes_done()  # a piece is hashed in a task of its own
        assert session.metrics.failed._value.get() == round_
        banned = [session.banned(meta.info_hash, liar.ban_keys()) for liar in liars]
        assert banned == ([None, None] if round_ == 1 else ["bad_hash", "bad_hash"])
        assert [liar.aborted for liar in liars] == [round_ == 2] * 2
    assert count(session.metrics.offences, "bad_hash") == 4
