"""Reed-Solomon with m parity holders: any m losses are rebuilt; deltas equal re-encoding."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.checkpoint.erasure import MUL, ReedSolomon, RSParity, gf_mul
from shoal.core.checkpoint.parity import changed_blocks


def slow_gf_mul(a: int, b: int) -> int:
    """Carry-less multiply then reduce by x^8+x^4+x^3+x^2+1, bit by bit."""
    p = 0
    while b:
        if b & 1:
            p ^= a
        b >>= 1
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
    return p


def test_multiplication_table_is_gf256():
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, 256, (500, 2)):
        assert MUL[a, b] == slow_gf_mul(int(a), int(b))
    assert (MUL[1] == np.arange(256)).all() and not MUL[0].any()


def test_table_products_equal_zfecs_own_encoding_for_every_byte_value():
    """The delta rule uses our tables with zfec's coefficients: check they agree with
    zfec on all 256 values of every data shard position."""
    k, m = 4, 3
    rs = ReedSolomon(k, m)
    values = bytes(range(256))
    for i in range(k):
        shards = [values if x == i else bytes(256) for x in range(k)]
        assert rs.encode(shards) == [gf_mul(c, values).tobytes() for c in rs.coefficients[i]]


def test_m2_any_two_lost_shards_recovered_bit_for_bit():
    rng = np.random.default_rng(7)
    k, m = 5, 2
    rs = ReedSolomon(k, m)
    data = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 3000, k)]
    sizes = [len(d) for d in data]
    parity = rs.encode(data)
    everything = {i: d for i, d in enumerate(data)} | {k + j: p for j, p in enumerate(parity)}
    for lost in itertools.combinations(range(k + m), 2):
        have = {i: s for i, s in everything.items() if i not in lost}
        assert rs.decode(have, sizes) == data, lost


def test_decode_needs_k_shards_and_bad_parameters_are_refused():
    rs = ReedSolomon(3, 2)
    with pytest.raises(ValueError):
        rs.decode({0: b"a", 4: b"b"}, [1, 1, 1])
    with pytest.raises(ValueError):
        rs.encode([b"a", b"b"])
    for k, m in ((0, 1), (1, 0), (200, 57)):
        with pytest.raises(ValueError):
            ReedSolomon(k, m)
    assert rs.encode([b"", b"", b""]) == [b"", b""]


def test_rsparity_reconstruct_checks_its_inputs():
    cks = {0: b"abc", 1: b"defg", 2: b"h"}
    p = RSParity.recompute(3, 2, cks, 4)
    assert p.reconstruct([0, 2], {1: b"defg"}) == {0: b"abc", 2: b"h"}
    # holder 0 lost as well: one rank is still rebuilt from holder 1 alone
    assert p.reconstruct([1], {0: b"abc", 2: b"h"}, holders=[1]) == {1: b"defg"}
    with pytest.raises(ValueError, match="exceed"):
        p.reconstruct([0, 1, 2], {})
    with pytest.raises(ValueError, match="holders"):
        p.reconstruct([0, 1], {2: b"h"}, holders=[0])
    with pytest.raises(ValueError, match="missing"):
        p.reconstruct([0], {1: b"defg"})
    with pytest.raises(ValueError):
        p.apply(3, 0, b"x")  # rank outside 0..k-1
    with pytest.raises(ValueError):
        p.apply(0, 0, b"12345")  # longer than a block


def test_rsparity_snapshot_round_trip_and_bad_snapshots():
    p = RSParity.recompute(3, 2, {0: b"abc", 1: b"defg", 2: b"h"}, 4)
    snap = p.snapshot()
    assert RSParity.from_snapshot(snap) == p
    for bad in (b"", b"x" * 40, snap[:-1], snap + b"\0"):
        with pytest.raises(ValueError):
            RSParity.from_snapshot(bad)


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 5),
    data=st.data(),
    block_size=st.sampled_from([3, 16, 64]),
)
def test_incremental_deltas_equal_reencoding_and_any_two_ranks_are_rebuilt(k, data, block_size):
    m = 2
    current = {r: b"" for r in range(k)}
    p = RSParity(k, m, block_size)
    for r in range(k):
        p.set_size(r, 0)
    steps = data.draw(st.lists(st.tuples(st.integers(0, k - 1), st.binary(max_size=150)), max_size=10))
    for rank, new in steps:
        p.apply_all(rank, changed_blocks(current[rank], new, block_size), len(new))
        current[rank] = new
    assert p == RSParity.recompute(k, m, current, block_size)
    if p.nbytes:
        assert [bytes(v) for v in p.views()] == ReedSolomon(k, m).encode([current[i] for i in range(k)])
    for lost in itertools.combinations(range(k), 2):
        survivors = {r: c for r, c in current.items() if r not in lost}
        assert p.reconstruct(lost, survivors) == {r: current[r] for r in lost}


def test_gf_mul_pairs_table_matches_the_byte_table_for_odd_and_even_lengths():
    rng = np.random.default_rng(3)
    for n in (0, 1, 2, 7, 1000, 1001):
        d = rng.integers(0, 256, n, dtype=np.uint8)
        for c in (0, 1, 2, 137, 255):
            assert np.array_equal(gf_mul(c, d.tobytes()), MUL[c][d])
