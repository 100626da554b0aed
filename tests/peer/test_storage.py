"""Tests for shoal.daemons.peer.storage: layouts, verification, resume data, crash safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shoal.daemons.peer.storage import (
    MAX_BLOCK_LENGTH,
    BadBlock,
    NotVerified,
    Storage,
    StorageError,
    hash_files,
)
from shoal.protocol import bencode
from shoal.protocol.metainfo import Metainfo, create_metainfo, hash_pieces, parse_metainfo

K16 = 16 * 1024


def make(name: str, files: list[tuple], piece_length: int = K16, seed: int = 1) -> tuple[Metainfo, bytes, bytes]:
    """(metainfo, content stream with pad zeros, .torrent bytes) for a layout."""
    rnd = random.Random(seed)
    stream = b"".join(
        bytes(f[1]) if len(f) > 2 and "p" in f[2] else rnd.randbytes(f[1]) for f in files
    )
    data, _ = create_metainfo(name, files, piece_length, hash_pieces(stream, piece_length), [["http://t/a"]])
    return parse_metainfo(data), stream, data


def download(st: Storage, meta: Metainfo, stream: bytes, pieces=None, *, block: int = K16, seed: int = 0) -> None:
    """Write every block of ``pieces`` in a random order, verifying each piece."""
    rnd = random.Random(seed)
    pieces = list(range(meta.num_pieces)) if pieces is None else list(pieces)
    rnd.shuffle(pieces)
    for i in pieces:
        off, size = i * meta.piece_length, meta.piece_size(i)
        begins = list(range(0, size, block))
        rnd.shuffle(begins)
        for b in begins:
            assert st.write_block(i, b, stream[off + b : off + min(b + block, size)])
        assert st.verify_piece(i)


def opened(meta: Metainfo, root: Path, **kw) -> Storage:
    st = Storage(meta, root, **kw)
    st.load_resume()
    return st


MULTI = [
    (("a.bin",), 10_000),
    (("sub", "b.bin"), 30_000),
    (("sub", "empty"), 0),
    (("c",), 5),
    (("d", "e", "f.bin"), 45_000),
]


# -- layouts -----------------------------------------------------------------------


def test_single_file(tmp_path: Path):
    meta, stream, _ = make("one.bin", [(("one.bin",), 3 * K16 + 1000)])
    assert meta.single_file
    with opened(meta, tmp_path) as st:
        download(st, meta, stream, block=5000)
        assert st.complete and st.num_verified == 4
        assert st.bitfield() == bytes([0b1111_0000])
        assert st.read_block(3, 0, 1000) == stream[3 * K16 :]
        assert st.read_block(1, 100, 2000) == stream[K16 + 100 : K16 + 2100]
    assert (tmp_path / "one.bin").read_bytes() == stream
    assert sorted(p.name for p in tmp_path.iterdir()) == ["." + meta.info_hash.hex() + ".shoal-resume", "one.bin"]


def test_multi_file_and_a_block_across_file_boundaries(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        # piece 0 is a.bin[0:10000] + sub/b.bin[0:6384]: one block spans both
        assert st.write_block(0, 8000, stream[8000:12000])
        assert (tmp_path / "dir" / "a.bin").stat().st_size == 10_000  # sparse
        assert (tmp_path / "dir" / "sub" / "b.bin").read_bytes() == stream[10_000:12_000]
        # piece 2 spans b.bin, the empty file, c and f.bin in one 16 KiB block
        assert st.write_block(2, 0, stream[2 * K16 : 3 * K16])
        download(st, meta, stream, block=K16)
    base = tmp_path / "dir"
    for f in meta.files:
        assert base.joinpath(*f.path).read_bytes() == stream[f.offset : f.offset + f.length]
    assert (base / "sub" / "empty").stat().st_size == 0


def test_pad_files_are_never_written(tmp_path: Path):
    files = [
        (("a",), 1000),
        ((".pad", "15384"), K16 - 1000, "p"),
        (("b",), 20_000),
        ((".pad", "12768"), 2 * K16 - 20_000, "p"),
    ]
    meta, stream, _ = make("padded", files)
    assert [f.pad for f in meta.files] == [False, True, False, True]
    with opened(meta, tmp_path) as st:
        # a peer's bytes for a pad region are dropped: the pad reads as zeros
        assert st.write_block(0, 0, stream[:1000] + b"\xff" * (K16 - 1000))
        assert st.verify_piece(0)
        download(st, meta, stream, [1, 2])
        assert st.read_block(0, 0, K16) == stream[:K16]
    assert sorted(p.name for p in (tmp_path / "padded").iterdir()) == ["a", "b"]
    assert (tmp_path / "padded" / "b").read_bytes() == stream[K16 : K16 + 20_000]


def test_files_and_directories_are_created_lazily(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        assert not (tmp_path / "dir").exists()
        download(st, meta, stream, [4])  # only f.bin
        root = tmp_path / "dir"
        assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == ["d/e/f.bin"]
        assert not (tmp_path / "dir" / "sub" / "empty").exists()  # created on completion


def test_longer_existing_file_is_truncated_on_first_write(tmp_path: Path):
    meta, stream, _ = make("one", [(("one",), 20_000)])
    (tmp_path / "one").write_bytes(b"x" * 50_000)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream)
    assert (tmp_path / "one").read_bytes() == stream


# -- verification and bounds ---------------------------------------------------------------


def test_verify_failure_then_success(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        assert not st.verify_piece(1)  # nothing written: no bytes, no hash
        assert st.hashes_computed == 0
        st.write_block(1, 0, b"\0" * K16)
        assert not st.verify_piece(1) and not st.is_verified(1)
        assert st.hashes_computed == 1
        st.write_block(1, 0, stream[K16 : 2 * K16])
        assert st.verify_piece(1) and st.is_verified(1)
        assert st.verify_piece(1) and st.hashes_computed == 2  # no re-hash
        assert st.bitfield() == bytes([0b0100_0000])  # 6 pieces: one byte


def test_unverified_read_is_refused(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        st.write_block(0, 0, stream[:K16])
        with pytest.raises(NotVerified):
            st.read_block(0, 0, K16)
        assert st.verify_piece(0)
        assert st.read_block(0, 0, K16) == stream[:K16]


def test_writes_into_a_verified_piece_are_dropped(tmp_path: Path):
    meta, stream, _ = make("one", [(("one",), K16)])
    with opened(meta, tmp_path) as st:
        download(st, meta, stream)
        assert st.write_block(0, 0, b"\0" * 100) is False
        assert st.read_block(0, 0, 100) == stream[:100]


@pytest.mark.parametrize(
    "index, begin, length",
    [
        (-1, 0, 10),
        (6, 0, 10),  # 6 pieces: 0..5
        (True, 0, 10),
        (0, -1, 10),
        (0, 0, 0),
        (0, K16 - 5, 10),  # crosses the piece end
        (5, 0, 85_005 - 5 * K16 + 1),  # past the short last piece
        (0, 0, MAX_BLOCK_LENGTH + 1),
    ],
)
def test_blocks_outside_bounds_are_refused(tmp_path: Path, index, begin, length):
    meta, _, _ = make("dir", MULTI)
    assert meta.num_pieces == 6 and meta.total_length == 85_005
    with opened(meta, tmp_path) as st:
        with pytest.raises(BadBlock):
            st.write_block(index, begin, b"x" * max(length, 0))
        with pytest.raises(ValueError):
            st.read_block(index, begin, length)


def test_write_before_load_resume_is_refused_and_closed_storage_refuses_everything(tmp_path: Path):
    meta, stream, _ = make("one", [(("one",), K16)])
    st = Storage(meta, tmp_path)
    with pytest.raises(StorageError):
        st.write_block(0, 0, stream[:10])
    st.load_resume()
    st.close()
    st.close()  # idempotent
    with pytest.raises(StorageError):
        st.write_block(0, 0, stream[:10])


def test_few_descriptors_for_many_files(tmp_path: Path):
    files = [((f"f{i}",), 3000) for i in range(30)]
    meta, stream, _ = make("many", files)
    with opened(meta, tmp_path, max_open_files=2) as st:
        download(st, meta, stream, block=1000)
        assert len(st._fds) <= 2
    with opened(meta, tmp_path, max_open_files=1) as st:
        assert st.complete


def test_hash_files_matches_hash_pieces(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream)
    files = [(f.path, f.length) for f in meta.files]
    assert hash_files(tmp_path / "dir", files, K16) == hash_pieces(stream, K16) == meta.pieces
    with pytest.raises(StorageError):
        hash_files(tmp_path / "dir", [(("a.bin",), 1)], K16)


# -- resume data -----------------------------------------------------------------------------


def test_resume_without_rehash_after_clean_shutdown(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream, [0, 2, 5])
        saved = st.bitfield()
    st = Storage(meta, tmp_path)
    assert st.load_resume() is True
    assert st.hashes_computed == 0
    assert st.bitfield() == saved and st.num_verified == 3
    assert st.read_block(5, 0, 100) == stream[5 * K16 : 5 * K16 + 100]
    download(st, meta, stream, [1, 3, 4])
    st.close()
    st = opened(meta, tmp_path)
    assert st.complete and st.hashes_computed == 0
    st.close()


def test_resume_in_a_state_dir(tmp_path: Path):
    meta, stream, _ = make("one", [(("one",), K16)])
    with opened(meta, tmp_path / "data", state_dir=tmp_path / "state") as st:
        download(st, meta, stream)
    assert (tmp_path / "state" / f"{meta.info_hash.hex()}.resume").exists()
    st = Storage(meta, tmp_path / "data", state_dir=tmp_path / "state")
    assert st.load_resume() and st.complete


@pytest.mark.parametrize("change", ["size", "mtime", "deleted"])
def test_recheck_when_a_file_changed(tmp_path: Path, change: str):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream)
    a = tmp_path / "dir" / "a.bin"  # lies in piece 0 only
    if change == "size":
        with open(a, "r+b") as fh:
            fh.truncate(9_999)
    elif change == "mtime":
        stat = a.stat()
        os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    else:
        a.unlink()
    st = Storage(meta, tmp_path)
    assert st.load_resume() is False
    expected = set(range(6)) if change == "mtime" else set(range(1, 6))
    assert {i for i in range(6) if st.is_verified(i)} == expected
    assert st.hashes_computed == len(expected)  # piece 0's bytes are gone: not hashed
    st.close()
    # the recheck saved fresh resume data: the next start trusts it
    st = Storage(meta, tmp_path)
    assert st.load_resume() is True and st.hashes_computed == 0
    st.close()


@pytest.mark.parametrize(
    "damage",
    ["garbage", "empty", "other_torrent", "spare_bits", "claims_missing_bytes"],
)
def test_bad_resume_data_forces_a_recheck(tmp_path: Path, damage: str):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream, [0, 1])
        path = st.resume_path
    record = bencode.decode(path.read_bytes())
    if damage == "garbage":
        path.write_bytes(b"\x00garbage")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_torrent":
        record[b"info hash"] = bytes(20)
        path.write_bytes(bencode.encode(record))
    elif damage == "spare_bits":
        record[b"bitfield"] = bytes([0b1100_0001])
        path.write_bytes(bencode.encode(record))
    else:  # sizes and mtimes match, but the bitfield claims pieces with no bytes
        record[b"bitfield"] = bytes([0b1111_1100])
        path.write_bytes(bencode.encode(record))
    st = Storage(meta, tmp_path)
    assert st.load_resume() is False
    assert st.bitfield() == bytes([0b1100_0000])
    st.close()


def test_full_recheck(tmp_path: Path):
    meta, stream, _ = make("dir", MULTI)
    with opened(meta, tmp_path) as st:
        download(st, meta, stream)
        with open(tmp_path / "dir" / "d" / "e" / "f.bin", "r+b") as fh:
            fh.seek(100)
            fh.write(b"corrupt")
        # f.bin starts at 40005; its byte 100 is in piece 2 (32768..49151)
        assert st.recheck() == 5
        assert not st.is_verified(2)
        download(st, meta, stream, [2])
        assert st.complete


# -- crash safety -----------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys
    from pathlib import Path
    from shoal.daemons.peer.storage import Storage
    from shoal.protocol.metainfo import parse_metainfo

    torrent, root, content, seed = sys.argv[1:5]
    meta = parse_metainfo(Path(torrent).read_bytes())
    stream = Path(content).read_bytes()
    rnd = random.Random(int(seed))
    st = Storage(meta, Path(root))
    st.load_resume()
    step = 0
    while True:
        missing = [i for i in range(meta.num_pieces) if not st.is_verified(i)]
        if not missing:
            st.close()
            print("done", flush=True)
            sys.stdin.read()  # wait to be killed (or for EOF)
            break
        i = rnd.choice(missing)
        off, size = i * meta.piece_length, meta.piece_size(i)
        bad = rnd.random() < 0.3
        begins = list(range(0, size, 4096))
        rnd.shuffle(begins)
        for b in begins[: rnd.randint(1, len(begins))] if rnd.random() < 0.2 else begins:
            data = stream[off + b : off + min(b + 4096, size)]
            if bad and rnd.random() < 0.5:
                data = rnd.randbytes(len(data))
            st.write_block(i, b, data)
        st.verify_piece(i)
        done = [j for j in range(meta.num_pieces) if st.is_verified(j)]
        if done and rnd.random() < 0.2:  # a late duplicate with wrong bytes
            st.write_block(rnd.choice(done), 0, rnd.randbytes(100))
        if rnd.random() < 0.4:
            st.save_resume()
        step += 1
        print("step", step, flush=True)
    """
)


def disk_stream(meta: Metainfo, root: Path) -> bytes:
    """The content as stored, read without Storage (missing bytes as b'?')."""
    out = bytearray()
    base = root if meta.single_file else root / meta.name
    for f in meta.files:
        if f.pad:
            out += bytes(f.length)
            continue
        p = base.joinpath(*f.path)
        data = p.read_bytes() if p.exists() else b""
        out += data[: f.length] + b"?" * (f.length - len(data))
    return bytes(out)


def claimed(meta: Metainfo, bitfield: bytes) -> list[int]:
    return [i for i in range(meta.num_pieces) if bitfield[i >> 3] & (0x80 >> (i & 7))]


def assert_claims_hold(meta: Metainfo, root: Path, bitfield: bytes) -> None:
    disk = disk_stream(meta, root)
    for i in claimed(meta, bitfield):
        piece = disk[i * meta.piece_length : i * meta.piece_length + meta.piece_size(i)]
        assert hashlib.sha1(piece).digest() == meta.piece_hash(i), f"piece {i} claimed but wrong on disk"


def test_sigkill_at_random_moments_never_leaves_a_false_claim(tmp_path: Path):
    files = [
        (("x", "a"), 50_000),
        ((".pad", "15536"), 15_536, "p"),
        (("b",), 120_000),
        (("x", "c"), 33_333),
    ]
    meta, stream, data = make("crashy", files)
    (tmp_path / "t.torrent").write_bytes(data)
    (tmp_path / "content").write_bytes(stream)
    root = tmp_path / "dl"
    resume = root / f".{meta.info_hash.hex()}.shoal-resume"
    rnd = random.Random(2024)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    kills = 0
    for round_ in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "t.torrent"), str(root), str(tmp_path / "content"),
             str(round_)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        try:
            target = rnd.randint(1, 6)
            seen = 0
            while seen < target:
                line = proc.stdout.readline()
                assert line, f"child exited early with {proc.wait()}"
                if line == b"done\n":
                    break
                seen += 1
            proc.send_signal(signal.SIGKILL)  # mid-work: the child is still running
            proc.wait(timeout=10)
            kills += proc.returncode == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdin.close()
            proc.stdout.close()
        # 1. the resume file on disk claims only pieces whose bytes are right
        if resume.exists():
            assert_claims_hold(meta, root, bencode.decode(resume.read_bytes())[b"bitfield"])
        # 2. a restart believes only pieces whose bytes are right
        st = Storage(meta, root)
        st.load_resume()
        assert_claims_hold(meta, root, st.bitfield())
        st.close()
    assert kills == 8
    # finally let it run to completion and shut down cleanly: no re-hash next time
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "t.torrent"), str(root), str(tmp_path / "content"), "99"],
        input=b"", capture_output=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.endswith(b"done\n"), proc.stderr
    st = Storage(meta, root)
    assert st.load_resume() is True and st.complete and st.hashes_computed == 0
    assert disk_stream(meta, root) == stream
    st.close()


def test_write_piece_hashes_from_memory_and_writes_only_a_match(tmp_path):
    """The whole-piece path: the same bytes on disk as block writes + verify, across files."""
    meta, stream, _ = make("multi", MULTI, piece_length=2 * K16)
    st = opened(meta, tmp_path / "dl", state_dir=tmp_path / "state")
    before = st.hashes_computed
    for i in range(meta.num_pieces):
        off, size = i * meta.piece_length, meta.piece_size(i)
        blocks = [(b, stream[off + b:off + min(b + K16, size)]) for b in range(0, size, K16)]
        if i == 0:
            bad = [(b, bytes(len(d))) for b, d in blocks]
            assert not st.write_piece(0, bad) and not st.is_verified(0)
        assert st.write_piece(i, blocks[::-1]) and st.is_verified(i)  # any order
    assert st.complete and st.hashes_computed - before == meta.num_pieces + 1
    st.close()
    fresh = opened(meta, tmp_path / "dl", state_dir=tmp_path / "other")  # no resume data: re-hash from disk
    assert fresh.complete
    fresh.close()
    with pytest.raises(ValueError):
        opened(meta, tmp_path / "x", state_dir=tmp_path / "s2").write_piece(0, [(0, stream[:K16])])


def test_whole_piece_reads_on_the_event_loop_and_in_a_thread(tmp_path: Path):
    # Pieces spanning files and a pad file: read_piece (the thread path) and
    # read_piece_nowait (preadv2 RWF_NOWAIT from the page cache, on the loop) agree.
    files = [(("a",), 1000), ((".pad", "15384"), K16 - 1000, "p"), (("b",), 50_000), (("c",), 7)]
    meta, stream, _ = make("whole", files)
    with opened(meta, tmp_path) as st:
        with pytest.raises(NotVerified):
            st.read_piece(1)
        with pytest.raises(NotVerified):
            st.read_piece_nowait(1)
        download(st, meta, stream)
        for i in range(meta.num_pieces):
            want = stream[i * K16 : i * K16 + meta.piece_size(i)]
            assert st.read_piece(i) == want
            assert bytes(st.read_piece_nowait(i)) == want  # just written: in the page cache
    with opened(meta, tmp_path) as st:  # files not open yet: the loop does not open them
        assert st.read_piece_nowait(1) is None
        assert st.read_piece(1) == stream[K16 : 2 * K16]
        assert bytes(st.read_piece_nowait(1)) == stream[K16 : 2 * K16]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_whole_piece_read_on_tmpfs_falls_back_to_the_thread_path():
    # tmpfs refuses RWF_NOWAIT (EOPNOTSUPP): the caller is told to use read_piece.
    import tempfile

    meta, stream, _ = make("shm.bin", [(("shm.bin",), 3 * K16)])
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d, opened(meta, Path(d)) as st:
        download(st, meta, stream)
        got = st.read_piece_nowait(0)
        assert got is None or bytes(got) == stream[:K16]
        assert st.read_piece(2) == stream[2 * K16 :]
