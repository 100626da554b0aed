"""Parity update throughput against a plain numpy copy, and Reed-Solomon throughput.

    .venv/bin/python bench/checkpoint/parity.py [--mib 64] [--repeat 7]

What is timed (--repeat rounds, each round times every operation once, in this one
process, so the ratios compare like with like on a shared, noisy machine; the
"vs copy" column is the median over rounds of copy time / operation time):

- copy:           np.copyto of the whole state into another buffer (the reference:
                  the least work that touches every byte of a checkpoint)
- parity apply:   the coordinator's work for a checkpoint in which every block
                  changed: Parity.apply of every 64 KiB block delta
- xor_into:       one dst ^= src over the whole buffer (the kernel under apply)
- changed_blocks: the rank's work: compare old/new, XOR the changed blocks
                  (every block changed, the worst case)
- rs encode:      zfec Reed-Solomon, k=8 data shards of --mib/8 each, m=2
- rs decode:      rebuild two lost data shards
- rs apply:       RSParity.apply of every block delta of one rank (m=2 holders)

Throughput is state bytes per second. The target (issue 5) is parity apply at
>= 60% of copy bandwidth. Writes parity.json next to this script.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from shoal.core.checkpoint.erasure import ReedSolomon, RSParity
from shoal.core.checkpoint.parity import BLOCK_SIZE, Parity, changed_blocks, xor_into


def interleaved(ops: list[tuple[str, object]], repeat: int) -> dict[str, list[float]]:
    """Time every op once per round, ``repeat`` rounds, so that all ops see the same
    background load (the machine is shared); returns each op's list of seconds."""
    times: dict[str, list[float]] = {name: [] for name, _ in ops}
    for _ in range(repeat):
        for name, fn in ops:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="state size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("parity.json"))
    args = ap.parse_args()

    n = args.mib * 1024 * 1024
    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, n, dtype=np.uint8)
    new = rng.integers(0, 256, n, dtype=np.uint8)
    dst = np.empty_like(old)
    deltas = changed_blocks(old, new, BLOCK_SIZE)
    assert len(deltas) == -(-n // BLOCK_SIZE)
    parity = Parity(BLOCK_SIZE)
    parity.set_size(0, n)

    def apply_all():
        for k, d in deltas:
            parity.apply(0, k, d)

    k, m = 8, 2
    shard = n // k
    shards = [rng.integers(0, 256, shard, dtype=np.uint8).tobytes() for _ in range(k)]
    rs = ReedSolomon(k, m)
    parity_shards = rs.encode(shards)
    survivors = {i: s for i, s in enumerate(shards) if i >= 2} | {k + j: p for j, p in enumerate(parity_shards)}
    rsp = RSParity(k, m, BLOCK_SIZE)
    rsp.set_size(0, n)

    def rs_apply():
        for b, d in deltas:
            rsp.apply(0, b, d)

    ops = [
        ("copy", lambda: np.copyto(dst, new)),
        ("parity apply", apply_all),
        ("xor_into", lambda: xor_into(dst, new)),
        ("changed_blocks", lambda: changed_blocks(old, new, BLOCK_SIZE)),
        ("rs encode k=8 m=2", lambda: rs.encode(shards)),
        ("rs decode 2 lost", lambda: rs.decode(survivors, [shard] * k)),
        ("rs apply m=2", rs_apply),
    ]
    assert rs.decode(survivors, [shard] * k) == shards
    times = interleaved(ops, args.repeat)
    copy_t = times["copy"]

    result = {
        "command": f".venv/bin/python bench/checkpoint/parity.py --mib {args.mib} --repeat {args.repeat}",
        "state_mib": args.mib,
        "block_size": BLOCK_SIZE,
        "machine": f"{platform.machine()} {platform.python_version()} numpy {np.__version__}",
        "rows": {},
    }
    print(f"state {args.mib} MiB, block {BLOCK_SIZE // 1024} KiB, {args.repeat} interleaved rounds")
    print(f"{'operation':<20} {'best s':>9} {'MB/s':>9} {'vs copy':>8}   (vs copy: median of per-round ratios)")
    for name, _ in ops:
        secs = min(times[name])
        mbs = n / secs / 1e6
        ratio = statistics.median(c / t for c, t in zip(copy_t, times[name], strict=False))
        result["rows"][name] = {"seconds": secs, "mb_per_s": round(mbs, 1), "vs_copy": round(ratio, 3)}
        print(f"{name:<20} {secs:9.4f} {mbs:9.1f} {ratio:8.1%}")
    ratio = result["rows"]["parity apply"]["vs_copy"]
    result["target_parity_vs_copy"] = 0.60
    result["target_met"] = ratio >= 0.60
    print(f"parity apply / copy = {ratio:.1%} (target >= 60%: {'met' if ratio >= 0.60 else 'MISSED'})")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
