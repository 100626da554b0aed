"""The coordinator's connections to the ranks' own RPC servers.

Recovery and recomputation read the same byte range of several ranks'
checkpoints at once (:meth:`RankLinks.fetch_range`): a replacement's image is
decoded range by range from the survivors' and the parity, so a large
checkpoint never crosses the transport, or sits in memory, as one piece.
One connection per (group, rank, address) is kept and dropped when the rank
fails.
"""

from __future__ import annotations

import trio

from shoal.core.checkpoint.group import Group
from shoal.daemons.checkpoint.config import CheckpointSection
from shoal.daemons.checkpoint.refusals import Refused
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcClient, RpcError, connect_tcp
from shoal.protocol.checkpoint import CkptRead


class RankLinks:
    def __init__(self, cfg: CheckpointSection, token: bytes | None) -> None:
        self.cfg = cfg
        self.token = token
        self._clients: dict[tuple[str, int, tuple[str, int]], RpcClient] = {}

    async def client(self, g: Group, i: int) -> RpcClient:
        addr = g.slots[i].addr
        assert addr is not None, "a rank that joined has an address"
        key = (g.name, i, addr)
        c = self._clients.get(key)
        if c is None or c._broken is not None:  # noqa: SLF001 - reconnect a broken client
            c = await connect_tcp(ListenAddr(*addr), token=self.token, max_frame=self.cfg.max_frame)
            self._clients[key] = c
        return c

    def drop(self, nursery: trio.Nursery, g: Group, rank: int) -> None:
        """Close the connections to a failed rank (in the background)."""
        for key in [k for k in self._clients if k[:2] == (g.name, rank)]:
            client = self._clients.pop(key)
            nursery.start_soon(trio.aclose_forcefully, client._stream)  # noqa: SLF001

    async def aclose(self) -> None:
        for c in list(self._clients.values()):
            await trio.aclose_forcefully(c._stream)  # noqa: SLF001 - no await-free close

    async def size_of(self, g: Group, i: int) -> int:
        return await (await self.client(g, i)).call("ckpt_size", None)

    async def fetch_range(self, g: Group, ranks: list[int], offset: int, length: int) -> dict[int, bytes]:
        """The same byte range of every listed rank's checkpoint, read concurrently."""
        out: dict[int, bytes] = {}
        errors: list[str] = []

        async def one(i: int) -> None:
            s = g.slots[i]
            if s.number < 0 or offset >= s.size:
                out[i] = b""
                return
            try:
                client = await self.client(g, i)
                read = CkptRead(offset=offset, length=min(length, s.size - offset))
                out[i] = await client.call("ckpt_read", read.encode(), timeout=self.cfg.heartbeat_timeout * 4)
            except (RpcError, OSError) as exc:
                errors.append(f"rank {i}: {exc}")

        async with trio.open_nursery() as nursery:
            for i in ranks:
                nursery.start_soon(one, i)
        if errors:
            raise Refused("survivor_unreachable", "; ".join(errors)[:500])
        return out
