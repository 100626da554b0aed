"""TrackerService end to end without sockets: request bytes in, response bytes out.

Every rejection is checked twice: the client sees a failure (or nothing, for
forged UDP), and shoal_tracker_rejected_total counts it by reason.
"""

import dataclasses
import struct

import pytest
from prometheus_client import CollectorRegistry

from shoal.daemons.runtime.http import HttpRequest
from shoal.daemons.tracker.access import ConnectionIds, load_policy
from shoal.daemons.tracker.config import AccessSection, TrackerSection
from shoal.daemons.tracker.metrics import TrackerMetrics
from shoal.daemons.tracker.service import TrackerService
from shoal.daemons.tracker.swarm import SwarmTable
from shoal.protocol import udp_tracker as udp
from shoal.protocol.tracker import (
    Announce,
    AnnounceResponse,
    Event,
    Failure,
    Scrape,
    decode_announce_response,
    decode_scrape_response,
    encode_announce_query,
    encode_scrape_query,
)

IH = bytes(range(20))
CLIENT = ("192.0.2.10", 40000)


def pid(n: int) -> bytes:
    return b"-LT2110-" + n.to_bytes(12, "big")


class Fixture:
    def __init__(self, section=None, access=None):
        self.registry = CollectorRegistry()
        self.table = SwarmTable(max_torrents=10, max_peers_per_torrent=100, max_peers=1000)
        self.metrics = TrackerMetrics(self.registry, self.table.stats)
        self.service = TrackerService(
            section or TrackerSection(), load_policy(access or AccessSection(rate_limit=0)),
            self.table, self.metrics, ConnectionIds(b"s" * 32),
        )

    def get(self, target: bytes, client=CLIENT, method=b"GET"):
        return self.service.handle_http(HttpRequest(method, target, [], b"", client), now=100.0)

    def announce(self, n: int, *, left=1000, event=Event.STARTED, client=CLIENT, path=b"/announce", **kw):
        a = Announce(info_hash=IH, peer_id=pid(n), port=6881 + n, uploaded=0, downloaded=0, left=left,
                     event=event, **kw)
        resp = self.get(path + b"?" + encode_announce_query(a), client)
        assert resp.status == 200
        return decode_announce_response(resp.body)

    def value(self, name, **labels):
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v


def test_http_announce_compact_excludes_requester_and_counts():
    f = Fixture()
    for n in range(3):
        f.announce(n, client=(f"192.0.2.{n + 1}", 5000))
    reply = f.announce(3, client=("192.0.2.4", 5000))
    assert isinstance(reply, AnnounceResponse)
    assert reply.interval == 1800 and reply.min_interval == 900
    assert reply.incomplete == 4 and reply.complete == 0
    assert {(p.ip, p.port) for p in reply.peers} == {("192.0.2.1", 6881), ("192.0.2.2", 6882), ("192.0.2.3", 6883)}
    assert f.value("shoal_tracker_announces_total", protocol="http", event="started") == 4


def test_http_announce_dict_form_and_peers6():
    f = Fixture()
    f.announce(1, client=("2001:db8::1", 5000))
    f.announce(2, client=("192.0.2.2", 5000))
    compact = f.announce(3)
    assert {p.ip for p in compact.peers} == {"2001:db8::1", "192.0.2.2"}
    dict_form = f.announce(4, compact=False)
    assert {(p.ip, p.peer_id) for p in dict_form.peers} >= {("2001:db8::1", pid(1)), ("192.0.2.2", pid(2))}
    no_id = f.announce(5, compact=False, no_peer_id=True)
    assert all(p.peer_id is None for p in no_id.peers)


def test_numwant_default_and_cap():
    f = Fixture(TrackerSection(numwant_default=3, numwant_max=5))
    for n in range(10):
        f.announce(n)
    assert len(f.announce(20).peers) == 3
    assert len(f.announce(21, numwant=100).peers) == 5
    assert len(f.announce(22, numwant=0).peers) == 0


def test_ipv4_mapped_client_is_recorded_as_ipv4():
    f = Fixture()
    f.announce(1, client=("::ffff:192.0.2.7", 5000))
    assert f.table.swarms[IH].peers[pid(1)].ip == "192.0.2.7"


def test_client_ip_param_only_when_trusted():
    f = Fixture()
    f.announce(1, ip="198.51.100.9")
    assert f.table.swarms[IH].peers[pid(1)].ip == CLIENT[0]
    g = Fixture(TrackerSection(trust_client_ip=True))
    g.announce(1, ip="198.51.100.9")
    assert g.table.swarms[IH].peers[pid(1)].ip == "198.51.100.9"


def test_scrape_bep48():
    f = Fixture()
    f.announce(1, left=0)
    f.announce(2)
    f.announce(2, left=0, event=Event.COMPLETED)
    other = b"\xee" * 20
    resp = f.get(b"/scrape?" + encode_scrape_query(Scrape((IH, other))))
    files = decode_scrape_response(resp.body)
    assert (files[IH].complete, files[IH].downloaded, files[IH].incomplete) == (2, 1, 0)
    assert (files[other].complete, files[other].incomplete) == (0, 0)
    assert f.value("shoal_tracker_scrapes_total", protocol="http") == 1


@pytest.mark.parametrize(
    "target, reason",
    [
        (b"/announce?info_hash=abc", None),  # parser reason, whichever it is
        (b"/announce?" + b"a" * 5000, None),
        (b"/announce?info_hash=%zz", None),
        (b"/scrape", "scrape_all_refused"),
        (b"/scrape?info_hash=%GG", None),
    ],
)
def test_malformed_http_gets_failure_and_is_counted(target, reason):
    f = Fixture()
    resp = f.get(target)
    assert resp.status == 200
    failure = decode_announce_response(resp.body)
    assert isinstance(failure, Failure) and failure.reason
    rejected = {s.labels["reason"]: s.value for m in f.registry.collect() for s in m.samples
                if s.name == "shoal_tracker_rejected_total" and s.value}
    assert sum(rejected.values()) == 1
    if reason:
        assert rejected == {reason: 1.0}
    assert f.table.peer_count == 0


def test_not_found_and_bad_method():
    f = Fixture()
    assert f.get(b"/index.html").status == 404
    assert f.get(b"/announce", method=b"POST").status == 405
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="not_found") == 1
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="bad_method") == 1


def test_whitelist_and_passkeys(tmp_path):
    (tmp_path / "wl").write_text(IH.hex() + "\n")
    (tmp_path / "keys").write_text("s3cret\n")
    f = Fixture(access=AccessSection(mode="whitelist", whitelist_file=tmp_path / "wl",
                                     passkeys_file=tmp_path / "keys", rate_limit=0))
    assert isinstance(f.announce(1, path=b"/s3cret/announce"), AnnounceResponse)
    assert isinstance(f.announce(2, path=b"/wrong/announce"), Failure)
    assert isinstance(f.announce(3, path=b"/announce"), Failure)
    bad = Announce(info_hash=b"\x01" * 20, peer_id=pid(4), port=1, uploaded=0, downloaded=0, left=0)
    reply = decode_announce_response(f.get(b"/s3cret/announce?" + encode_announce_query(bad)).body)
    assert isinstance(reply, Failure) and "whitelist" in reply.reason
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="bad_passkey") == 2
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="not_whitelisted") == 1
    assert f.table.peer_count == 1


def test_rate_limit_per_ip():
    f = Fixture(access=AccessSection(rate_limit=1.0, rate_burst=2, rate_limit_exempt=()))
    replies = [f.announce(1) for _ in range(3)]
    assert [type(r).__name__ for r in replies] == ["AnnounceResponse", "AnnounceResponse", "Failure"]
    assert isinstance(f.announce(2, client=("192.0.2.99", 1)), AnnounceResponse)
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="rate_limited") == 1


def test_table_full_is_a_failure_not_a_crash():
    f = Fixture(TrackerSection(), AccessSection(rate_limit=0))
    f.table.max_peers_per_torrent = 1
    assert isinstance(f.announce(1), AnnounceResponse)
    assert isinstance(f.announce(2), Failure)
    assert f.value("shoal_tracker_rejected_total", protocol="http", reason="peer_limit") == 1


# -- UDP -------------------------------------------------------------------------


def udp_connect(f: Fixture, client=CLIENT) -> int:
    reply = f.service.handle_udp(udp.encode_request(udp.ConnectRequest(7)), client, now=100.0)
    resp = udp.parse_response(reply)
    assert isinstance(resp, udp.ConnectResponse) and resp.transaction_id == 7
    return resp.connection_id


def udp_announce(f, cid, n, *, left=100, client=CLIENT, url_data=b"", now=100.0):
    a = Announce(info_hash=IH, peer_id=pid(n), port=7000 + n, uploaded=0, downloaded=0, left=left,
                 event=Event.STARTED)
    dgram = udp.encode_request(udp.AnnounceRequest(cid, 9, a, url_data=url_data))
    reply = f.service.handle_udp(dgram, client, now=now)
    return None if reply is None else udp.parse_response(reply, ipv6=":" in client[0])


def test_udp_connect_announce_scrape():
    f = Fixture()
    cid = udp_connect(f)
    udp_announce(f, cid, 1)
    cid2 = udp_connect(f, ("192.0.2.11", 40001))
    resp = udp_announce(f, cid2, 2, left=0, client=("192.0.2.11", 40001))
    assert isinstance(resp, udp.AnnounceResponse)
    assert (resp.leechers, resp.seeders, resp.interval) == (1, 1, 1800)
    assert [(p.ip, p.port) for p in resp.peers] == [("192.0.2.10", 7001)]
    scrape = f.service.handle_udp(udp.encode_request(udp.ScrapeRequest(cid, 3, (IH,))), CLIENT, now=100.0)
    stats = udp.parse_response(scrape).stats[0]
    assert (stats.complete, stats.incomplete) == (1, 1)
    assert f.value("shoal_tracker_udp_connects_total") == 2
    assert f.value("shoal_tracker_announces_total", protocol="udp", event="started") == 2


def test_udp_ipv6_client_gets_ipv6_peers_only():
    f = Fixture()
    v6 = ("2001:db8::10", 4000)
    udp_announce(f, udp_connect(f), 1)
    udp_announce(f, udp_connect(f, ("2001:db8::11", 4000)), 2, client=("2001:db8::11", 4000))
    resp = udp_announce(f, udp_connect(f, v6), 3, client=v6)
    assert [p.ip for p in resp.peers] == ["2001:db8::11"]


def test_udp_wrong_or_stale_connection_id_gets_error_and_is_counted():
    f = Fixture()
    cid = udp_connect(f)
    assert isinstance(udp_announce(f, cid ^ 1, 1), udp.ErrorResponse)
    assert isinstance(udp_announce(f, cid, 1, client=("192.0.2.66", CLIENT[1])), udp.ErrorResponse)
    assert isinstance(udp_announce(f, cid, 1, now=100.0 + 180), udp.ErrorResponse)
    assert f.value("shoal_tracker_rejected_total", protocol="udp", reason="bad_connection_id") == 3
    assert f.table.peer_count == 0


@pytest.mark.parametrize(
    "dgram",
    [
        b"",
        b"\x00" * 15,
        struct.pack(">QII", 0x41727101980 + 1, 0, 1),  # wrong protocol id
        struct.pack(">QII", 1, 1, 1) + b"\x00" * 10,  # truncated announce
        struct.pack(">QII", 1, 9, 1) + b"\x00" * 90,  # unknown action
        struct.pack(">QII", 1, 2, 1) + b"\x00" * 19,  # scrape with a partial hash
    ],
)
def test_udp_malformed_is_dropped_and_counted(dgram):
    f = Fixture()
    assert f.service.handle_udp(dgram, CLIENT, now=100.0) is None
    counted = sum(s.value for m in f.registry.collect() for s in m.samples
                  if s.name == "shoal_tracker_rejected_total" and s.labels["protocol"] == "udp")
    assert counted == 1


def test_udp_passkey_in_bep41_url_data(tmp_path):
    (tmp_path / "keys").write_text("k1\n")
    f = Fixture(access=AccessSection(passkeys_file=tmp_path / "keys", rate_limit=0))
    cid = udp_connect(f)
    assert isinstance(udp_announce(f, cid, 1, url_data=b"/k1/announce"), udp.AnnounceResponse)
    assert isinstance(udp_announce(f, cid, 2, url_data=b"/k2/announce"), udp.ErrorResponse)
    assert isinstance(udp_announce(f, cid, 3), udp.ErrorResponse)
    assert f.table.peer_count == 1


def test_reload_swaps_policy():
    f = Fixture()
    f.service.section = dataclasses.replace(f.service.section, numwant_max=1, numwant_default=1)
    for n in range(3):
        f.announce(n)
    assert len(f.announce(9).peers) == 1
