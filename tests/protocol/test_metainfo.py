"""Tests for shoal.protocol.metainfo: golden parse, round-trips, interop, unsafe input, magnets, fuzz."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.daemons.peer.storage import hash_files
from shoal.protocol import metainfo
from shoal.protocol.bencode import decode, encode
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.metainfo import (
    FileEntry,
    Magnet,
    create_metainfo,
    create_single_file,
    format_magnet,
    hash_pieces,
    parse_info,
    parse_magnet,
    parse_metainfo,
)

from .fuzz import checkers, mutated

FAST = settings(max_examples=200, deadline=None)
parses_or_remote, reason_of = checkers(metainfo.REASONS)

K16 = 16 * 1024
H = [bytes([i]) * 20 for i in range(256)]  # distinct fake piece hashes


def info_span(data: bytes) -> bytes:
    """The info dictionary's bytes, found the slow and obvious way."""
    start = data.index(b"4:infod") + len(b"4:info")
    for end in range(start + 1, len(data) + 1):
        try:
            decode(data[start:end], max_size=len(data))
        except RemoteProtocolError:
            continue
        return data[start:end]
    raise AssertionError("no info span")


def torrent(info: dict, **top) -> bytes:
    return encode({"info": info, **top})


def multi_info(files, *, piece_length=K16, name="data", **extra) -> dict:
    total = sum(f["length"] for f in files)
    return {
        "name": name,
        "piece length": piece_length,
        "pieces": b"".join(H[: -(-total // piece_length)]),
        "files": files,
        **extra,
    }


# -- golden ------------------------------------------------------------------------

GOLDEN_MULTI = (
    b"d"
    b"8:announce20:http://t.example/ann"
    b"13:announce-listll20:http://t.example/annel15:udp://u.example9:wss://w.xee"
    b"7:comment5:hello"
    b"10:created by5:shoal"
    b"13:creation datei1700000000e"
    b"4:info"
    b"d"
    b"5:filesl"
    b"d6:lengthi20000e4:pathl3:dir5:a.binee"
    b"d4:attr1:p6:lengthi12768e4:pathl4:.pad5:12768ee"
    b"d4:attr2:xh6:lengthi100e4:pathl5:b.txtee"
    b"d6:lengthi0e4:pathl5:emptyee"
    b"e"
    b"4:name4:demo"
    b"12:piece lengthi16384e"
    b"6:pieces60:" + H[1] + H[2] + H[3] + b"7:privatei1e"
    b"e"
    b"8:url-list20:http://seed.example/"
    b"e"
)


def test_golden_multi_file():
    m = parse_metainfo(GOLDEN_MULTI)
    raw = info_span(GOLDEN_MULTI)
    assert m.raw_info == raw
    assert m.info_hash == hashlib.sha1(raw).digest()
    assert m.name == "demo" and not m.single_file
    assert m.piece_length == K16 and m.num_pieces == 3
    assert [m.piece_hash(i) for i in range(3)] == [H[1], H[2], H[3]]
    assert m.files == (
        FileEntry(("dir", "a.bin"), 20000, 0),
        FileEntry((".pad", "12768"), 12768, 20000, pad=True, attr="p"),
        FileEntry(("b.txt",), 100, 32768, attr="xh"),
        FileEntry(("empty",), 0, 32868),
    )
    assert m.total_length == 32868
    assert [m.piece_size(i) for i in range(3)] == [K16, K16, 100]
    assert m.private
    # BEP 12: announce-list wins over announce.
    assert m.announce_list == (("http://t.example/ann",), ("udp://u.example", "wss://w.x"))
    assert m.url_list == ("http://seed.example/",)
    assert (m.comment, m.created_by, m.creation_date) == ("hello", "shoal", 1700000000)
    with pytest.raises(IndexError):
        m.piece_size(3)


def test_golden_single_file_and_create_single_file_compat():
    data = b"abc" * 20000
    pieces = hash_pieces(data, K16)
    meta, info_hash = create_single_file("f.bin", len(data), K16, pieces, "http://t/a", private=True)
    m = parse_metainfo(meta)
    assert m.info_hash == info_hash
    assert m.single_file and m.name == "f.bin"
    assert m.files == (FileEntry(("f.bin",), 60000, 0),)
    assert m.pieces == pieces and m.private
    assert m.announce_list == (("http://t/a",),) and m.created_by == "shoal"


def test_announce_only_and_no_trackers():
    info = multi_info([{"length": 5, "path": [b"x"]}])
    assert parse_metainfo(torrent(info, announce="http://a/")).announce_list == (("http://a/",),)
    m = parse_metainfo(torrent(info))
    assert m.announce_list == () and m.url_list == () and m.comment is None
    # empty strings (written by some creators) are dropped, url-list may be a list
    m = parse_metainfo(torrent(info, announce="", **{"url-list": ["http://s/", "", "http://s/"]}))
    assert m.announce_list == () and m.url_list == ("http://s/",)


def test_parse_info_checks_the_expected_hash():
    m = parse_metainfo(GOLDEN_MULTI)
    again = parse_info(m.raw_info, expected_info_hash=m.info_hash)
    assert again == dataclasses.replace(
        m, announce_list=(), url_list=(), comment=None, created_by=None, creation_date=None
    )
    assert reason_of(parse_info, m.raw_info, expected_info_hash=bytes(20)) == "info_hash_mismatch"


# -- creation round trip -------------------------------------------------------------

component = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12
).filter(lambda c: c not in (".", "..") and len(c.encode()) <= 255)
url = st.builds(lambda h, p: f"http://{h}.example:{p}/announce", st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                st.integers(1, 65535))


@st.composite
def layouts(draw):
    """(name, files, piece_length) with collision-free paths, some pad files."""
    name = draw(component)
    n = draw(st.integers(1, 8))
    files = []
    used = set()
    for i in range(n):
        # directories and files come from disjoint namespaces ("d:"/"f:"
        # prefixes), so no file can sit where a directory must be
        dirs = tuple("d:" + c for c in draw(st.lists(component, max_size=3)))
        path = dirs + ("f:" + draw(component),)
        if path in used:
            continue
        used.add(path)
        files.append((path, draw(st.integers(0, 70000))))
        if draw(st.integers(0, 4)) == 0:
            files.append(((".pad", str(i)), draw(st.integers(1, 20000)), "p"))
    if sum(f[1] for f in files) == 0:
        files.append((("f:last",), 1))
    if draw(st.booleans()):
        files = [((name,), draw(st.integers(1, 100000)))]  # the single-file rule
    piece_length = draw(st.sampled_from([K16, 2 * K16, 4 * K16]))
    return name, files, piece_length


@FAST
@given(
    layouts(),
    st.lists(st.lists(url, max_size=3), max_size=3),
    st.lists(url, max_size=2, unique=True),
    st.booleans(),
    st.none() | st.text(max_size=20),
    st.randoms(use_true_random=False),
)
def test_create_parse_round_trip(layout, tiers, seeds, private, comment, rnd):
    name, files, piece_length = layout
    total = sum(f[1] for f in files)
    pieces = rnd.randbytes(20 * -(-total // piece_length))
    data, info_hash = create_metainfo(
        name, files, piece_length, pieces, tiers, url_list=seeds, private=private, comment=comment
    )
    m = parse_metainfo(data)
    assert m.info_hash == info_hash == hashlib.sha1(m.raw_info).digest()
    assert m.name == name and m.piece_length == piece_length and m.pieces == pieces
    assert m.single_file == (len(files) == 1 and files[0][0] == (name,))
    offset = 0
    for entry, f in zip(m.files, files, strict=True):
        assert (entry.path, entry.length, entry.offset, entry.pad) == (f[0], f[1], offset, len(f) == 3)
        offset += f[1]
    assert m.total_length == total and m.private == private and m.comment == comment
    want_tiers = []
    seen = set()
    for tier in tiers:
        t = tuple(u for u in dict.fromkeys(tier) if u not in seen)
        seen.update(t)
        if t:
            want_tiers.append(t)
    if sum(map(len, tiers)) == 1:
        want_tiers = [tuple(u for t in tiers for u in t)]
    assert m.announce_list == tuple(want_tiers)
    assert m.url_list == tuple(seeds)


@pytest.mark.interop
@settings(max_examples=60, deadline=None)
@given(layouts(), st.lists(st.lists(url, max_size=2), max_size=2), st.booleans(), st.randoms(use_true_random=False))
def test_libtorrent_agrees_on_the_info_hash_of_our_torrents(layout, tiers, private, rnd):
    name, files, piece_length = layout
    total = sum(f[1] for f in files)
    pieces = rnd.randbytes(20 * -(-total // piece_length))
    data, info_hash = create_metainfo(name, files, piece_length, pieces, tiers, private=private)
    assert lt_info_hash(data) == info_hash


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(name="a/b"), "bad_name"),
        (dict(name=".."), "bad_name"),
        (dict(files=[(("..",), 5)]), "bad_path"),
        (dict(files=[(("a", ""), 5)]), "bad_path"),
        (dict(files=[(("a",), 5), (("a",), 5)]), "duplicate_path"),
        (dict(files=[(("a",), 5), (("a", "b"), 5)]), "duplicate_path"),
        (dict(files=[(("a",), -1)]), "bad_file_length"),
        (dict(files=[(("a",), 0)]), "bad_total_length"),
        (dict(piece_length=3 * K16), "bad_piece_length"),
        (dict(pieces=b""), "bad_pieces"),
        (dict(announce_list=[["bad url"]]), "bad_url"),
    ],
)
def test_create_refuses_bad_arguments(kwargs, reason):
    args = dict(name="n", files=[(("a",), 5)], piece_length=K16, pieces=H[0], announce_list=())
    args.update(kwargs)
    with pytest.raises(LocalProtocolError) as info:
        create_metainfo(**args)
    assert info.value.reason == reason


# -- interop: torrents made by mktorrent and libtorrent -------------------------------


@pytest.fixture
def content(tmp_path: Path) -> Path:
    """A directory with several files, a subdirectory and an empty file."""
    d = tmp_path / "content"
    (d / "sub" / "deeper").mkdir(parents=True)
    rnd = __import__("random").Random(7)
    for rel, size in [("a.bin", 100_000), ("b.txt", 5_000), ("sub/c.dat", 70_001), ("sub/deeper/d", 1), ("zero", 0)]:
        (d / rel).write_bytes(rnd.randbytes(size))
    return d


def lt_info_hash(data: bytes) -> bytes:
    import libtorrent as lt

    return lt.torrent_info(data).info_hashes().v1.to_bytes()


def on_disk(directory: Path) -> dict[tuple[str, ...], int]:
    return {p.relative_to(directory).parts: p.stat().st_size for p in directory.rglob("*") if p.is_file()}


@pytest.mark.interop
@pytest.mark.parametrize("single", [False, True])
def test_parses_mktorrent_output(content: Path, tmp_path: Path, single: bool):
    assert shutil.which("mktorrent"), "mktorrent is missing: install Debian mktorrent"
    target = content / "a.bin" if single else content
    out = tmp_path / "m.torrent"
    subprocess.run(
        ["mktorrent", "-l", "15", "-a", "http://t.example/announce", "-o", str(out), str(target)],
        check=True, capture_output=True, timeout=30,
    )
    data = out.read_bytes()
    m = parse_metainfo(data)
    assert m.info_hash == lt_info_hash(data)
    assert m.piece_length == 2**15 and m.single_file == single
    assert m.announce_list == (("http://t.example/announce",),)
    assert m.created_by.startswith("mktorrent")
    if single:
        assert m.files == (FileEntry(("a.bin",), 100_000, 0),)
    else:
        assert m.name == "content"
        assert {f.path: f.length for f in m.files} == on_disk(content)
    # our own hashing of the same files agrees with mktorrent's
    files = [(f.path, f.length) for f in m.files]
    assert hash_files(content, files, m.piece_length) == m.pieces


@pytest.mark.interop
@pytest.mark.parametrize("v1_only", [True, False], ids=["v1", "hybrid"])
def test_parses_libtorrent_output(content: Path, v1_only: bool):
    import libtorrent as lt

    flags = lt.create_torrent.v1_only if v1_only else 0
    ct = lt.create_torrent(lt.list_files(str(content)), K16, flags=flags)
    ct.add_tracker("udp://t.example:6969", 0)
    ct.add_url_seed("http://seed.example/")
    lt.set_piece_hashes(ct, str(content.parent))
    data = lt.bencode(ct.generate())
    m = parse_metainfo(data)
    assert m.info_hash == lt_info_hash(data)
    assert m.announce_list == (("udp://t.example:6969",),) and m.url_list == ("http://seed.example/",)
    real = {f.path: f.length for f in m.files if not f.pad}
    assert real == on_disk(content)
    pads = [f for f in m.files if f.pad]
    if v1_only:
        assert not pads
    else:
        # hybrid torrents align every file to a piece with BEP 47 pad files
        assert pads and all(f.path[0] == ".pad" for f in pads)
        assert all(f.offset % K16 == 0 for f in m.files if not f.pad and f.length)
        assert decode(m.raw_info)[b"meta version"] == 2
    files = [(f.path, f.length, f.attr) for f in m.files]
    assert hash_files(content, files, K16) == m.pieces


# -- strictness ------------------------------------------------------------------------

UNSAFE = [
    [],
    [b""],
    [b"."],
    [b".."],
    [b"ok", b".."],
    [b"..", b"etc", b"passwd"],
    [b"/etc"],
    [b"a/b"],
    [b"a\x00b"],
    [b"\xff\xfe"],
    [b"x" * 256],
    [b"d"] * 65,
    [5],
]


@pytest.mark.parametrize("path", UNSAFE, ids=repr)
def test_unsafe_paths_are_refused(path):
    info = multi_info([{"length": 5, "path": path}])
    assert reason_of(parse_metainfo, torrent(info)) == "bad_path"


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"\x00", b"\xc3"])
def test_unsafe_names_are_refused(name):
    info = multi_info([{"length": 5, "path": [b"x"]}], name=name)
    assert reason_of(parse_metainfo, torrent(info)) == "bad_path"
    single = {"name": name, "length": 5, "piece length": K16, "pieces": H[0]}
    assert reason_of(parse_metainfo, torrent(single)) == "bad_path"


def single_info(**over) -> dict:
    info = {"name": "n", "length": 5, "piece length": K16, "pieces": H[0]}
    info.update(over)
    return {k: v for k, v in info.items() if v is not None}


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"le", "not_a_dict"),
        (encode({"announce": "x"}), "missing_info"),
        (encode({"info": []}), "not_a_dict"),
        (torrent(single_info(name=None)), "bad_name"),
        (torrent(single_info(name=5)), "bad_name"),
        (torrent(single_info(**{"piece length": None})), "bad_piece_length"),
        (torrent(single_info(**{"piece length": 3 * K16})), "bad_piece_length"),
        (torrent(single_info(**{"piece length": 8192})), "bad_piece_length"),
        (torrent(single_info(**{"piece length": 2**27})), "bad_piece_length"),
        (torrent(single_info(pieces=H[0] + H[1])), "bad_pieces"),
        (torrent(single_info(pieces=b"")), "bad_pieces"),
        (torrent(single_info(pieces=None)), "bad_pieces"),
        (torrent(single_info(length=-1)), "bad_file_length"),
        (torrent(single_info(length=b"5")), "bad_file_length"),
        (torrent(single_info(length=0, pieces=b"")), "bad_total_length"),
        (torrent(single_info(length=2**51)), "bad_total_length"),
        (torrent(single_info(length=None)), "bad_layout"),
        (torrent(single_info(files=[{"length": 5, "path": [b"a"]}])), "bad_layout"),
        (torrent(multi_info([])), "bad_layout"),
        (torrent(dict(multi_info([{"length": 5, "path": [b"a"]}]), files={})), "bad_files"),
        (torrent(dict(multi_info([{"length": 5, "path": [b"a"]}]), files=[5])), "bad_files"),
        (torrent(multi_info([{"length": 5, "path": [b"a"]}, {"length": 5, "path": [b"a"]}])), "duplicate_path"),
        (torrent(multi_info([{"length": 5, "path": [b"a"]}, {"length": 5, "path": [b"a", b"b"]}])), "duplicate_path"),
        (torrent(multi_info([{"length": 5, "path": [b"a", b"b"]}, {"length": 5, "path": [b"a"]}])), "duplicate_path"),
        (torrent(multi_info([{"length": 5, "path": [b"a"], "attr": 1}])), "bad_attr"),
        (torrent(single_info(private=b"1")), "bad_field"),
        (torrent(single_info(), comment=5), "bad_field"),
        (torrent(single_info(), **{"creation date": b"x"}), "bad_field"),
        (torrent(single_info(), announce=5), "bad_tracker"),
        (torrent(single_info(), announce="http://a b/"), "bad_tracker"),
        (torrent(single_info(), **{"announce-list": [b"http://a/"]}), "bad_tracker"),
        (torrent(single_info(), **{"announce-list": [[b"\xff"]]}), "bad_tracker"),
        (torrent(single_info(), **{"announce-list": [[f"http://{i}/" for i in range(300)]]}), "bad_tracker"),
        (torrent(single_info(), **{"url-list": 5}), "bad_url_list"),
        (torrent(single_info(), **{"url-list": [b"http://x/\n"]}), "bad_url_list"),
        (torrent(single_info(**{"meta version": 2, "pieces": None, "file tree": {}})), "v2_only"),
        (torrent(single_info(**{"meta version": 3})), "bad_version"),
        (torrent(single_info()) + b"\n", "trailing_data"),
        (torrent(single_info())[:-5], "truncated"),
        (b"d4:infod4:name1:n12:piece lengthi16384e4:name1:nee", "unsorted_keys"),
    ],
)
def test_bad_metainfo_is_refused(data, reason):
    assert reason_of(parse_metainfo, data) == reason


def test_hybrid_is_read_as_v1():
    m = parse_metainfo(torrent(single_info(**{"meta version": 2, "file tree": {"n": {"": {"length": 5}}}})))
    assert m.files == (FileEntry(("n",), 5, 0),)


def test_bounds_on_size_and_file_count():
    data = torrent(multi_info([{"length": 5, "path": [b"f%d" % i]} for i in range(3)]))
    assert parse_metainfo(data, max_files=3)
    assert reason_of(parse_metainfo, data, max_files=2) == "too_many_files"
    assert reason_of(parse_metainfo, data, max_size=len(data) - 1) == "too_long"


def test_pad_files_may_repeat_a_path():
    info = multi_info(
        [
            {"length": 5, "path": [b"a"]},
            {"length": K16 - 5, "path": [b".pad", b"x"], "attr": b"p"},
            {"length": 5, "path": [b"b"]},
            {"length": K16 - 5, "path": [b".pad", b"x"], "attr": b"p"},
        ]
    )
    m = parse_metainfo(torrent(info))
    assert [f.pad for f in m.files] == [False, True, False, True]


# -- fuzz ------------------------------------------------------------------------------


@st.composite
def valid_torrents(draw) -> bytes:
    name, files, piece_length = draw(layouts())
    total = sum(f[1] for f in files)
    pieces = bytes(20 * -(-total // piece_length))
    data, _ = create_metainfo(
        name, files, piece_length, pieces, draw(st.lists(st.lists(url, max_size=2), max_size=2)),
        url_list=draw(st.lists(url, max_size=1)), private=draw(st.booleans()),
    )
    return data


@settings(max_examples=300, deadline=None)
@given(mutated(valid_torrents()))
def test_fuzz_parse_metainfo(data):
    m = parses_or_remote(parse_metainfo, data)
    if m is not None:
        assert m.info_hash == hashlib.sha1(m.raw_info).digest()
        assert len(m.pieces) == 20 * -(-m.total_length // m.piece_length)


@settings(max_examples=150, deadline=None)
@given(mutated(valid_torrents().map(lambda d: parse_metainfo(d).raw_info)))
def test_fuzz_parse_info(data):
    parses_or_remote(parse_info, data)


@FAST
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    parses_or_remote(parse_metainfo, data)
    parses_or_remote(parse_info, data)


# -- magnet links -------------------------------------------------------------------------

IH = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")


def test_magnet_hex_with_several_trackers():
    m = parse_magnet(
        "magnet:?xt=urn:btih:0123456789ABCDEF0123456789abcdef01234567&dn=My+File%20%C3%A9"
        "&tr=http%3A%2F%2Fa.example%2Fann&tr=udp://b.example:80&tr=http%3A%2F%2Fa.example%2Fann"
        "&ws=http%3A%2F%2Fseed%2F&x.pe=10.0.0.1:6881&x.pe=[::1]:51413&x.pe=host.example:1"
        "&xl=12345&tr.1=udp://c.example:1"
    )
    assert m == Magnet(
        IH,
        "My File é",
        ("http://a.example/ann", "udp://b.example:80", "udp://c.example:1"),
        ("http://seed/",),
        (("10.0.0.1", 6881), ("::1", 51413), ("host.example", 1)),
    )


@pytest.mark.parametrize("case", [str.upper, str.lower])
def test_magnet_base32(case):
    b32 = case(base64.b32encode(IH).decode())
    m = parse_magnet(f"MAGNET:?xt=urn:btih:{b32}")
    assert m == Magnet(IH)


def test_magnet_hybrid_topics_use_btih():
    m = parse_magnet(f"magnet:?xt=urn:btmh:1220{'ab' * 32}&xt=urn:btih:{IH.hex()}&xt=urn:btih:{IH.hex()}")
    assert m.info_hash == IH


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "magnet:",
        "magnet:?",
        "magnet:?dn=x&tr=http://a/",  # no xt
        f"http://x/?xt=urn:btih:{IH.hex()}",
        f"magnet:?xt=urn:btmh:1220{'ab' * 32}",  # v2 only
        "magnet:?xt=urn:btih:0123",  # short
        "magnet:?xt=urn:btih:" + "g" * 40,
        "magnet:?xt=urn:btih:" + "1" * 32,  # '1' is not base32
        f"magnet:?xt=urn:btih:{IH.hex()}&xt=urn:btih:{'00' * 20}",
        f"magnet:?xt=urn:btih:{IH.hex()}&dn=%zz",
        f"magnet:?xt=urn:btih:{IH.hex()}&dn=%ff",
        f"magnet:?xt=urn:btih:{IH.hex()}&dn=a%0Ab",
        f"magnet:?xt=urn:btih:{IH.hex()}&tr=",
        f"magnet:?xt=urn:btih:{IH.hex()}&tr=http://a%20b/",
        f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=1.2.3.4",
        f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=1.2.3.4:0",
        f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=1.2.3.4:99999",
        f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=[nothex]:1",
        f"magnet:?xt=urn:btih:{IH.hex()}&x.pe=bad_host!:1",
        f"magnet:?xt=urn:btih:{IH.hex()}&garbage",
        f"magnet:?xt=urn:btih:{IH.hex()}" + "".join(f"&tr=http://a/{i}" for i in range(300)),
        "magnet:?xt=urn:btih:" + IH.hex() + "&dn=" + "a" * 20000,
        "\x00garbage\uffff",
    ],
)
def test_bad_magnets(uri):
    with pytest.raises(RemoteProtocolError) as info:
        parse_magnet(uri)
    assert info.value.reason == "bad_magnet"


host = st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z]{2,5})?", fullmatch=True) | st.ip_addresses().map(str)


@FAST
@given(
    st.binary(min_size=20, max_size=20),
    st.none() | st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30),
    st.lists(url, max_size=4, unique=True),
    st.lists(url, max_size=2, unique=True),
    st.lists(st.tuples(host, st.integers(1, 65535)), max_size=3, unique=True),
)
def test_magnet_round_trip(info_hash, name, trackers, seeds, peers):
    m = Magnet(info_hash, name, tuple(trackers), tuple(seeds), tuple(peers))
    assert parse_magnet(format_magnet(m)) == m
    assert parse_magnet(m.uri()) == m


def test_metainfo_magnet():
    m = parse_metainfo(GOLDEN_MULTI)
    mag = m.magnet()
    assert mag == Magnet(m.info_hash, "demo", ("http://t.example/ann", "udp://u.example", "wss://w.x"), ("http://seed.example/",))
    assert parse_magnet(format_magnet(mag)) == mag


@FAST
@given(st.text(max_size=300) | st.text(max_size=300).map(lambda s: f"magnet:?xt=urn:btih:{IH.hex()}&" + s))
def test_fuzz_parse_magnet(text):
    try:
        parse_magnet(text)
    except RemoteProtocolError as exc:
        assert exc.reason == "bad_magnet"


def test_magnet_rejects_non_str():
    with pytest.raises(LocalProtocolError):
        parse_magnet(b"magnet:?")  # type: ignore[arg-type]


def test_metainfo_file_wraps_fetched_metadata_byte_for_byte():
    """A dictionary another client encoded (here: keys it might order its own
    way inside nested values are kept) is spliced in unchanged, so the
    info-hash of the file is the magnet's."""
    from shoal.protocol.metainfo import metainfo_file

    data, info_hash = create_metainfo("set", [(("a",), 5), (("b",), 40000)], 16384, b"\x01" * 60,
                                      [["http://t.example/announce"]])
    raw_info = parse_metainfo(data).raw_info
    wrapped = metainfo_file(raw_info, [["http://t1.example/a"], ["udp://t2.example:80"]], ["http://ws.example/"])
    m = parse_metainfo(wrapped)
    assert m.info_hash == info_hash and m.raw_info == raw_info
    assert m.trackers == ("http://t1.example/a", "udp://t2.example:80")
    assert m.url_list == ("http://ws.example/",)
    bare = parse_metainfo(metainfo_file(raw_info))
    assert bare.info_hash == info_hash and bare.trackers == ()
    with pytest.raises(LocalProtocolError):
        metainfo_file(raw_info, [["not a url"]])
