"""Bad input at the coordinator: refused with a clear error, counted, and the
daemon keeps serving."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import trio

from shoal.daemons.runtime.rpc import RpcError, connect_tcp
from tests.checkpoint.cluster import config, start_daemon


def refused(app, reason: str) -> float:
    return app.metrics.refused.labels(reason)._value.get()


def join_params(rank: int, **kw) -> dict:
    p = {"group": "g", "rank": rank, "n": 2, "mode": "enhanced", "block_size": 4096, "m": 1, "have": -1,
         "epoch": 0, "addr": ["127.0.0.1", 1]}
    p.update(kw)
    return p


@pytest.fixture
async def coordinator(tmp_path: Path, nursery):
    ctx, app, scope = await start_daemon(nursery, config(tmp_path, "c"))
    yield ctx.addresses["rpc"], app, ctx
    scope.cancel()


async def test_unknown_group_is_refused_and_counted(coordinator) -> None:
    addr, app, _ = coordinator
    async with await connect_tcp(addr) as c:
        for method in ("request", "commit", "watch", "ready"):
            with pytest.raises(RpcError) as err:
                await c.call(method, {"group": "nope", "rank": 0, "key": b"x" * 16, "epoch": 0})
            assert err.value.code == "unknown_group"
    assert refused(app, "unknown_group") == 4


async def test_a_rank_claiming_another_ranks_id_is_refused_and_counted(coordinator) -> None:
    addr, app, _ = coordinator
    async with await connect_tcp(addr) as c:
        mine = await c.call("join", join_params(0))
        # The same id again while rank 0 is alive: refused.
        with pytest.raises(RpcError) as err:
            await c.call("join", join_params(0))
        assert err.value.code == "rank_taken"
        # Rank 0's key used to act as rank 1, and a made-up key for rank 0: refused.
        await c.call("join", join_params(1))
        for rank, key in ((1, mine["key"]), (0, b"\0" * 16)):
            with pytest.raises(RpcError) as err:
                await c.call("delta", {"group": "g", "rank": rank, "key": key, "epoch": 0, "number": 0,
                                       "blocks": [[0, b"\1" * 10]]})
            assert err.value.code == "bad_identity"
        # A join that disagrees with the group's shape.
        with pytest.raises(RpcError) as err:
            await c.call("join", join_params(1, n=3))
        assert err.value.code == "group_mismatch"
        # Nothing was staged by the refused calls; rank 0's own call works.
        assert app.service.groups["g"].slots[1].staged == {}
        assert await c.call("delta", {"group": "g", "rank": 0, "key": mine["key"], "epoch": 0, "number": 0,
                                      "blocks": [[0, b"\1" * 10]]}) == 1
    assert refused(app, "rank_taken") == 1
    assert refused(app, "bad_identity") == 2
    assert refused(app, "group_mismatch") == 1


@pytest.mark.parametrize("params", [
    None, [], {"group": 5}, join_params(-1), join_params(0, n=0), join_params(0, mode="fast"),
    join_params(0, block_size=10), join_params(0, addr="x"), join_params(3), join_params(0, m=9),
])
async def test_malformed_joins_are_refused_and_counted(coordinator, params) -> None:
    addr, app, _ = coordinator
    async with await connect_tcp(addr) as c:
        with pytest.raises(RpcError) as err:
            await c.call("join", params)
        assert err.value.code == "bad_params"
        assert refused(app, "bad_params") == 1
        assert await c.call("status") == {"groups": [], "mtbf": 86400.0, "backup_in_sync": False, "backup": ""}


async def test_deltas_without_a_grant_and_oversized_blocks_are_refused(coordinator) -> None:
    addr, app, _ = coordinator
    async with await connect_tcp(addr) as c:
        me = await c.call("join", join_params(0))
        base = {"group": "g", "rank": 0, "key": me["key"], "epoch": 0}
        with pytest.raises(RpcError) as err:  # checkpoint 1 before any grant
            await c.call("delta", {**base, "number": 1, "blocks": [[0, b"x"]]})
        assert err.value.code == "not_granted"
        with pytest.raises(RpcError) as err:  # a delta larger than a block
            await c.call("delta", {**base, "number": 0, "blocks": [[0, b"x" * 5000]]})
        assert err.value.code == "bad_params"
        with pytest.raises(RpcError) as err:  # from before a rollback
            await c.call("delta", {**base, "epoch": 7, "number": 0, "blocks": []})
        assert err.value.code == "stale_epoch"
    assert refused(app, "not_granted") == 1 and refused(app, "stale_epoch") == 1


async def test_bad_frames_are_counted_and_the_daemon_keeps_serving(coordinator) -> None:
    addr, app, ctx = coordinator
    for garbage in (b"\xff\xff\xff\xff" + b"x" * 16, struct.pack("!I", 3) + b"\xc1\xc1\xc1",
                    struct.pack("!I", 4) + msgpack.packb([9, 9, 9])):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            await stream.receive_some(4096)  # the CHALLENGE
            await stream.send_all(garbage)
            with trio.fail_after(5):
                while await stream.receive_some(4096):
                    pass  # the server answers ERROR(0, reason) and closes
    errors = {s.labels["reason"]: s.value for m in ctx.registry.collect() for s in m.samples
              if s.name == "shoal_checkpoint_rpc_errors_total"}
    assert errors.get("frame_too_large") == 1 and errors.get("bad_msgpack") == 1, errors
    assert sum(errors.values()) == 3
    async with await connect_tcp(addr) as c:  # still serving
        assert (await c.call("status"))["groups"] == []


async def test_backup_refuses_coordinator_calls(tmp_path: Path, nursery) -> None:
    from dataclasses import replace

    cfg = config(tmp_path, "b")
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, role="backup"))
    ctx, app, scope = await start_daemon(nursery, cfg)
    async with await connect_tcp(ctx.addresses["rpc"]) as c:
        with pytest.raises(RpcError) as err:
            await c.call("join", join_params(0))
        assert err.value.code == "wrong_role"
        with pytest.raises(RpcError) as err:
            await c.call("b_read", {"group": "nope", "offset": 0, "length": 10})
        assert err.value.code == "unknown_group"
    assert refused(app, "wrong_role") == 1 and refused(app, "unknown_group") == 1
    scope.cancel()
