"""The application library: registration, incremental deltas, the image kept
consistent with the parity, the message log kept bounded."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest
import trio

from shoal.ckpt import Rank
from shoal.core.checkpoint.parity import Parity
from shoal.daemons.runtime.config import ListenAddr
from tests.checkpoint.cluster import config, start_daemon

NOWHERE = ListenAddr("127.0.0.1", 1)


def test_register_accepts_arrays_bytearrays_and_mmaps_and_refuses_the_rest() -> None:
    r = Rank(NOWHERE, "g", 0, 2, block_size=4096)
    a = r.register("a", np.zeros(1000, dtype=np.float64))
    r.register("b", bytearray(10))
    m = mmap.mmap(-1, 5000)
    r.register("c", m)
    assert r.state["a"] is a
    # Each buffer starts on a block boundary, so a change in one never shifts another.
    assert [off for _, _, off in r.image.layout] == [0, 8192, 12288]
    with pytest.raises(ValueError, match="C-contiguous"):
        r.register("d", np.zeros((10, 10))[:, 1])
    with pytest.raises(ValueError, match="writable"):
        r.register("e", b"read only")
    with pytest.raises(ValueError, match="already registered"):
        r.register("a", np.zeros(3))
    with pytest.raises(ValueError):
        Rank(NOWHERE, "g", 2, 2)


async def _touch(rank: Rank) -> bytes:
    """Each step changes one int64 of a 1 MiB array, then exchanges a message."""
    big, i = rank.state["big"], rank.state["i"]
    other = 1 - rank.rank
    while i[0] < 40:
        big[int(i[0]) * 512] += 1 + rank.rank
        await rank.send(other, i)
        await rank.recv(other)
        i[0] += 1
        await rank.safe_point()
    return big.tobytes()


async def test_checkpoints_send_only_changed_blocks_and_image_matches_parity(tmp_path: Path, nursery) -> None:
    ctx, app, scope = await start_daemon(nursery, config(tmp_path, "c"))
    # interval 0: a checkpoint at every safe point the Timeout rule allows
    ranks = [Rank(ctx.addresses["rpc"], "g", i, 2, block_size=4096, interval=0.0) for i in range(2)]
    for r in ranks:
        r.register("big", np.zeros(1 << 17, dtype=np.int64))  # 1 MiB
        r.register("i", np.zeros(1, dtype=np.int64))
    results: dict[int, bytes] = {}
    done = trio.Event()

    async def run(r: Rank) -> None:
        results[r.rank] = await r.run(_touch)
        if len(results) == 2:
            done.set()

    for r in ranks:
        nursery.start_soon(run, r)
    with trio.fail_after(30):
        await done.wait()
    checkpoints = sum(r.stats["checkpoints"] for r in ranks)
    delta_bytes = app.metrics.delta_bytes._value.get()
    assert checkpoints >= 6
    # The cost follows the change, not the state: every step touches one new 4 KiB
    # block (80 over both ranks); each checkpoint adds the counter's block and the
    # log's. A full copy would be 1 MiB per checkpoint.
    assert delta_bytes <= (80 + 3 * checkpoints) * 4096, (delta_bytes, checkpoints)
    assert delta_bytes < checkpoints * (1 << 20) / 10
    # Every rank's kept image is what the parity holds for it.
    group = app.service.groups["g"]
    parity: Parity = group.code.p
    images = {r.rank: r.image.buf[: r.image.size].tobytes() for r in ranks}
    for r in ranks:
        assert parity.reconstruct(r.rank, {o: images[o] for o in images if o != r.rank}) == images[r.rank]
    assert parity == Parity.recompute(images, 4096)
    # Messages are acknowledged once a checkpoint of the receiver covers them, then
    # archived and purged: the sent table holds only the last intervals' messages.
    for r in ranks:
        assert r.stats["checkpoints"] >= 4
        assert len(r.mail.msglog.sent) < 40
    scope.cancel()


async def test_status_reports_the_model_from_measured_overheads(tmp_path: Path, nursery) -> None:
    from shoal.ckpt.cli import format_status
    from shoal.core.checkpoint.overhead import model

    ctx, app, scope = await start_daemon(nursery, config(tmp_path, "c"))
    ranks = [Rank(ctx.addresses["rpc"], "g", i, 2, block_size=4096, interval=0.01) for i in range(2)]
    for r in ranks:
        r.register("big", np.zeros(1 << 17, dtype=np.int64))
        r.register("i", np.zeros(1, dtype=np.int64))
    async with trio.open_nursery() as inner:
        for r in ranks:
            inner.start_soon(r.run, _touch)
    status = await app.service.rpc_status(None)
    (g,) = status["groups"]
    assert g["O"] > 0 and g["L"] > 0 and g["samples"][0] > 0
    expected = model(g["O"], g["L"], g["R"], 86400.0)
    assert g["T_opt"] == pytest.approx(expected.T_opt) and g["r"] == pytest.approx(expected.r)
    assert g["recommended_interval"] == g["T_opt"]
    text = format_status(status)
    assert "T_opt" in text and f"{g['T_opt']:.1f} s" in text
    gauges = app.service.gauges()
    assert gauges["shoal_checkpoint_optimal_interval_seconds"] > 0
    scope.cancel()
