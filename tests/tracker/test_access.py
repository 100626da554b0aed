"""Access control: routes, passkeys, whitelist files, per-IP limits, UDP connection ids."""

import pytest

from shoal.daemons.runtime.config import ConfigError, load_config
from shoal.daemons.runtime.ratelimit import KeyedRateLimiter, TokenBucket
from shoal.daemons.tracker.access import AddressSlots, ConnectionIds, Route, load_policy
from shoal.daemons.tracker.config import AccessSection, TrackerConfig


def test_open_routes():
    p = load_policy(AccessSection())
    assert p.route(b"/announce") == Route("announce", None)
    assert p.route(b"/scrape") == Route("scrape", None)
    for bad in (b"/", b"/announce/", b"/x/announce", b"/announce.php", b"announce", b"/a/b/announce"):
        assert p.route(bad) == "not_found", bad


def test_passkeys(tmp_path):
    keys = tmp_path / "passkeys"
    keys.write_text("# users\nalice-key\nbob_key  # bob\n")
    p = load_policy(AccessSection(passkeys_file=keys))
    assert p.route(b"/alice-key/announce") == Route("announce", b"alice-key")
    assert p.route(b"/bob_key/scrape") == Route("scrape", b"bob_key")
    assert p.route(b"/mallory/announce") == "bad_passkey"
    assert p.route(b"/announce") == "bad_passkey"


def test_whitelist(tmp_path):
    wl = tmp_path / "whitelist"
    wl.write_text("aa" * 20 + "\n# comment\n" + "BB" * 20 + "\n")
    p = load_policy(AccessSection(mode="whitelist", whitelist_file=wl))
    assert p.torrent_allowed(b"\xaa" * 20) and p.torrent_allowed(b"\xbb" * 20)
    assert not p.torrent_allowed(b"\xcc" * 20)
    assert load_policy(AccessSection()).torrent_allowed(b"\xcc" * 20)


@pytest.mark.parametrize(
    "field, text, where",
    [("whitelist_file", "abc\n", "line 1"), ("passkeys_file", "ok\nbad key!\n", "line 2")],
)
def test_bad_list_files_name_file_and_line(tmp_path, field, text, where):
    f = tmp_path / "list"
    f.write_text(text)
    kw = {field: f, "mode": "whitelist"} if field == "whitelist_file" else {field: f}
    with pytest.raises(ConfigError) as exc:
        load_policy(AccessSection(**kw))
    assert str(exc.value).startswith(f"{f}: {where}: ")


def test_missing_list_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(AccessSection(passkeys_file=tmp_path / "nope"))


def test_token_bucket_refills_at_rate():
    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.5)  # one token back after 0.5 s at 2/s
    assert not b.take(0.5)
    assert b.take(100.0) and b.tokens == pytest.approx(2.0)  # capped at burst


def test_keyed_limiter_is_bounded():
    lim = KeyedRateLimiter(rate=1.0, burst=1, max_keys=3)
    for ip in ("a", "b", "c", "d"):
        assert lim.allow(ip, 0.0)
    assert len(lim.buckets) == 3 and "a" not in lim.buckets
    assert not lim.allow("d", 0.0)


def test_rate_limit_per_ip_with_exempt_networks():
    p = load_policy(AccessSection(rate_limit=1.0, rate_burst=2, rate_limit_exempt=("10.1.0.0/16",)))
    assert [p.rate_ok("192.0.2.1", 0.0) for _ in range(3)] == [True, True, False]
    assert p.rate_ok("192.0.2.2", 0.0)  # another address has its own bucket
    assert all(p.rate_ok("10.1.2.3", 0.0) for _ in range(100))
    assert p.rate_ok("192.0.2.1", 1.0)


def test_connection_ids_are_bound_to_ip_and_expire():
    ids = ConnectionIds(b"k" * 32)
    cid = ids.issue("192.0.2.1", now=1000.0)
    assert ids.valid(cid, "192.0.2.1", now=1000.0)
    assert ids.valid(cid, "192.0.2.1", now=1000.0 + 60)  # the BEP's two minutes
    assert not ids.valid(cid, "192.0.2.1", now=1000.0 + 120.1)
    assert not ids.valid(cid, "192.0.2.2", now=1000.0)
    assert not ConnectionIds(b"j" * 32).valid(cid, "192.0.2.1", now=1000.0)


def test_connection_ids_count_wall_minutes_whatever_the_monotonic_origin():
    # Two processes of one tracker: the same key, monotonic clocks with
    # different origins (trio's starts at a random offset), the same wall
    # clock. Each passes clock_offset = wall - monotonic, read at its start.
    wall = 1_800_000_000.0
    before = ConnectionIds(b"k" * 32, clock_offset=wall - 12_345.0)
    cid = before.issue("192.0.2.1", now=12_345.0)
    after = ConnectionIds(b"k" * 32, clock_offset=(wall + 5.0) - 98_765.0)  # restarted 5 s later
    assert after.valid(cid, "192.0.2.1", now=98_765.0)
    assert after.valid(cid, "192.0.2.1", now=98_765.0 + 55.0)
    assert not after.valid(cid, "192.0.2.1", now=98_765.0 + 125.0)
    # Without the offset the minutes would not line up.
    assert not ConnectionIds(b"k" * 32).valid(cid, "192.0.2.1", now=98_765.0)


def test_address_slots_cap_each_address_and_free_on_release():
    slots = AddressSlots(2)
    a = slots.acquire("192.0.2.1")
    assert a is not None and slots.acquire("192.0.2.1") == a
    assert slots.acquire("192.0.2.1") is None  # a third from the same address
    b = slots.acquire("192.0.2.2")  # another address has its own share
    assert b is not None and b != a
    slots.release(a)
    assert slots.acquire("192.0.2.1") == a
    for key in (a, a, b):
        slots.release(key)
    assert slots.open == {}  # nothing kept for addresses that left
    slots.cap = 1  # a reload lowers the cap
    assert slots.acquire("192.0.2.1") is not None and slots.acquire("192.0.2.1") is None


def test_address_slots_count_an_ipv6_slash_64_as_one_address():
    # One subscriber has a whole /64: walking through it must not dodge the cap.
    slots = AddressSlots(2)
    assert slots.acquire("2001:db8:1:2::1") is not None
    assert slots.acquire("2001:db8:1:2:ffff::9") is not None
    assert slots.acquire("2001:db8:1:2::77") is None
    assert slots.acquire("2001:db8:1:3::1") is not None  # the next /64 is someone else
    assert slots.acquire("fe80::1%eth0") is not None  # scoped: on its own


def test_per_address_cap_above_the_global_cap_is_a_one_line_config_error(tmp_path):
    f = tmp_path / "tracker.toml"
    f.write_text("[tracker]\nmax_http_connections = 10\nmax_http_connections_per_ip = 11\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, TrackerConfig)
    assert "max_http_connections_per_ip: must not exceed max_http_connections" in str(exc.value)
    assert "\n" not in str(exc.value)
