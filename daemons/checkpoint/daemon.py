"""The checkpoint daemon: one RPC listener serving the coordinator or the backup role.

The roles are coordinator.py (with mirror.py and ranklinks.py) and backup.py;
the domain logic is I/O-free in shoal.core.checkpoint (group, groupcode,
parity, erasure, msglog, grant, overhead). This module wires one of the two
roles to the runtime: config, token, metrics, the RPC server.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import trio

from shoal.daemons.checkpoint.backup import Backup
from shoal.daemons.checkpoint.config import TOKEN_KEY, CheckpointConfig, check_config
from shoal.daemons.checkpoint.coordinator import Coordinator
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.runtime.config import read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcServer


class CheckpointApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: CheckpointConfig = ctx.config
        check_config(cfg)
        c = cfg.checkpoint
        self.token = read_token(c.token_file, TOKEN_KEY)
        self.role = c.role
        holder: dict[str, Coordinator | Backup] = {}
        self.metrics = CheckpointMetrics(ctx.registry,
                                         lambda: holder["service"].gauges() if "service" in holder else {})
        if c.role == "coordinator":
            self.service: Coordinator | Backup = Coordinator(c, self.metrics, self.token)
        else:
            self.service = Backup(c, self.metrics)
        holder["service"] = self.service
        self.server = RpcServer(
            self.service.handlers(), metrics=ctx.metrics, token=self.token, max_frame=c.max_frame,
            # long polls last heartbeat_interval; recovery reads wait for survivors
            request_timeout=c.heartbeat_timeout * 6 + 30.0, max_in_flight=4 * c.max_ranks + 64,
            name=f"shoal-checkpoint-{c.role}",
        )

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        c = ctx.config.checkpoint
        async with trio.open_nursery() as nursery:
            if isinstance(self.service, Coordinator):
                await nursery.start(self.service.run)
            addr = await nursery.start(partial(self.server.serve_tcp, c.listen))
            ctx.announce(rpc=addr)
            ctx.log.info("%s serving RPC on %s", self.role, addr)
            task_status.started()

    def reload(self, new_config: CheckpointConfig) -> None:
        # The model's MTBF and the heartbeat timing change live; the rest
        # (role, listen address, token, backup, bounds) needs a restart.
        check_config(new_config)
        new = new_config.checkpoint
        self.service.cfg = replace(self.service.cfg, mtbf=new.mtbf, heartbeat_interval=new.heartbeat_interval,
                                   heartbeat_timeout=new.heartbeat_timeout)


def make_app(ctx: DaemonContext) -> CheckpointApp:
    return CheckpointApp(ctx)
