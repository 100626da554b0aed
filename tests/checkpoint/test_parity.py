"""N+1 XOR parity: block deltas, incremental updates, reconstruction, snapshots."""

import contextlib
import mmap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.checkpoint.parity import BLOCK_SIZE, Parity, changed_blocks, xor_into

BS = 16  # small blocks so that random data crosses many block boundaries


def xor_all(bufs: list[bytes]) -> bytes:
    """Reference parity, straight from the seed's formula b_c,j = XOR_i b_i,j (zero-padded)."""
    size = max((len(b) for b in bufs), default=0)
    out = bytearray(size)
    for b in bufs:
        for j, byte in enumerate(b):
            out[j] ^= byte
    return bytes(out)


def test_xor_into_matches_bytewise_xor_aligned_and_not():
    rng = np.random.default_rng(1)
    for n in (0, 1, 7, 8, 9, 64, 1001):
        a = rng.integers(0, 256, n + 3, dtype=np.uint8)
        b = rng.integers(0, 256, n + 3, dtype=np.uint8)
        for off in (0, 1, 3):  # odd offsets defeat the 8-byte fast path
            d = a.copy()
            xor_into(d[off : off + n], b[off : off + n].tobytes())
            want = a.copy()
            want[off : off + n] ^= b[off : off + n]
            assert np.array_equal(d, want)


def test_xor_into_refuses_a_longer_source():
    with pytest.raises(ValueError):
        xor_into(np.zeros(4, dtype=np.uint8), b"12345")


def test_changed_blocks_reports_only_blocks_that_differ():
    old = bytes(range(64))
    new = bytearray(old)
    new[17] ^= 0xFF  # block 1
    new[63] ^= 0x01  # block 3
    got = changed_blocks(old, new, BS)
    assert [k for k, _ in got] == [1, 3]
    assert got[0][1] == bytes(0xFF if j == 1 else 0 for j in range(16))
    assert got[1][1] == bytes(15) + b"\x01"
    assert changed_blocks(old, old, BS) == []


def test_changed_blocks_growth_and_shrink_zero_pad():
    old = b"A" * 20
    grown = b"A" * 20 + b"BC"
    assert changed_blocks(old, grown, BS) == [(1, bytes(4) + b"BC")]
    # shrinking sends the old tail, so XORing it into the parity removes it
    assert changed_blocks(grown, old, BS) == [(1, bytes(4) + b"BC")]
    assert changed_blocks(b"xyz", b"", BS) == [(0, b"xyz")]
    # a block of zeros appended is no change at all (zero padding is the identity)
    assert changed_blocks(b"q", b"q" + bytes(40), BS) == []


def test_changed_blocks_accepts_numpy_arrays_bytearrays_and_mmaps():
    arr = np.arange(10, dtype=np.float64)
    before = arr.tobytes()
    arr[3] = -1.0
    m = mmap.mmap(-1, arr.nbytes)
    m[:] = before
    deltas = changed_blocks(m, arr, BS)
    assert [k for k, _ in deltas] == [1]  # float 3 lives in bytes 24..31, block 1
    rebuilt = bytearray(before)
    for k, d in deltas:
        for j, byte in enumerate(d):
            rebuilt[k * BS + j] ^= byte
    assert bytes(rebuilt) == arr.tobytes()
    m.close()


def test_reconstruct_needs_every_survivor_and_checks_sizes():
    p = Parity.recompute({0: b"abc", 1: b"defgh", 2: b""}, BS)
    assert p.nbytes == 5
    assert p.reconstruct(1, {0: b"abc", 2: b""}) == b"defgh"
    assert p.reconstruct(2, {0: b"abc", 1: b"defgh"}) == b""
    with pytest.raises(ValueError, match="missing"):
        p.reconstruct(1, {0: b"abc"})
    with pytest.raises(ValueError, match="expects"):
        p.reconstruct(1, {0: b"abcd", 2: b""})
    with pytest.raises(KeyError):
        p.reconstruct(7, {0: b"abc", 1: b"defgh", 2: b""})


def test_apply_rejects_oversized_deltas_and_negative_blocks():
    p = Parity(BS)
    with pytest.raises(ValueError):
        p.apply(0, 0, bytes(BS + 1))
    with pytest.raises(ValueError):
        p.apply(0, -1, b"x")
    with pytest.raises(ValueError):
        Parity(0)


def test_snapshot_round_trip_and_bad_snapshots():
    p = Parity.recompute({0: b"hello world", 3: b"parity"}, BS)
    snap = p.snapshot()
    q = Parity.from_snapshot(snap)
    assert q == p and q.sizes == {0: 11, 3: 6} and q.block_size == BS
    for bad in (b"", b"nonsense" * 4, snap[:-1], snap + b"x"):
        with pytest.raises(ValueError):
            Parity.from_snapshot(bad)


def test_default_block_size_is_64_kib():
    assert BLOCK_SIZE == 65536 and Parity().block_size == BLOCK_SIZE


checkpoint = st.binary(min_size=0, max_size=200)


@settings(max_examples=150, deadline=None)
@given(
    ranks=st.integers(min_value=1, max_value=5),
    data=st.data(),
    block_size=st.sampled_from([1, 7, 16, 64]),
)
def test_incremental_deltas_equal_recompute_and_any_single_loss_is_rebuilt(ranks, data, block_size):
    """Random checkpoints of different sizes, a random sequence of checkpoints per rank:
    the incrementally updated parity equals the parity recomputed from scratch (and
    the seed's formula), and every single lost rank is rebuilt bit for bit."""
    current = {r: b"" for r in range(ranks)}
    p = Parity(block_size)
    for r in range(ranks):
        p.set_size(r, 0)
    steps = data.draw(st.lists(st.tuples(st.integers(0, ranks - 1), checkpoint), max_size=12))
    for rank, new in steps:
        # sometimes a small in-place edit instead of a whole new buffer
        if data.draw(st.booleans()) and current[rank]:
            b = bytearray(current[rank])
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
            new = bytes(b)
        p.apply_all(rank, changed_blocks(current[rank], new, block_size), len(new))
        current[rank] = new

    fresh = Parity.recompute(current, block_size)
    assert p == fresh
    assert bytes(p.view()) == xor_all(list(current.values()))
    assert Parity.from_snapshot(p.snapshot()) == p
    for lost in range(ranks):
        survivors = {r: c for r, c in current.items() if r != lost}
        assert p.reconstruct(lost, survivors) == current[lost]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_from_snapshot_of_arbitrary_bytes_succeeds_or_raises_value_error(data):
    with contextlib.suppress(ValueError):
        Parity.from_snapshot(b"SHPAR1" + data)
