"""``shoal fed run|status``: talk to the fedserver's RPC."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_commands(fed_daemon: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    fed = top.add_parser("fed", help="federated averaging runs on the fedserver")
    sub = fed.add_subparsers(dest="fed_action", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", default=os.environ.get("SHOAL_FEDSERVER", "127.0.0.1:7444"),
                       help="the fedserver's RPC address (default $SHOAL_FEDSERVER or 127.0.0.1:7444)")
        p.add_argument("--token-file", default=os.environ.get("SHOAL_FEDSERVER_TOKEN_FILE", ""),
                       help="file holding the RPC token (needed off loopback)")
        return p

    r = common(sub.add_parser("run", help="run FedAvg over the connected nodes now and wait for it"))
    r.add_argument("--rounds", type=int, default=None, help="rounds (default: the server's [federation] rounds)")
    r.set_defaults(func=cmd_run)
    s = common(sub.add_parser("status", help="the SuperLink, the last run and the latest global model"))
    s.set_defaults(func=cmd_status)


def _rpc(args, method: str, params=None):
    import trio

    from shoal.daemons.runtime.config import ListenAddr
    from shoal.daemons.runtime.rpc import RpcError, connect_tcp

    try:
        addr = ListenAddr.parse(args.server)
        token = Path(args.token_file).read_bytes().strip() if args.token_file else None
    except (ValueError, OSError) as exc:
        raise SystemExit(_fail(str(exc))) from None

    async def call():
        async with await connect_tcp(addr, token=token) as client:
            return await client.call(method, params, timeout=86400.0)

    try:
        return trio.run(call)
    except RpcError as exc:
        raise SystemExit(_fail(f"{exc.code}: {exc.message}")) from None
    except OSError as exc:
        raise SystemExit(_fail(f"cannot reach the fedserver at {args.server}: {exc.strerror or exc}")) from None


def _fail(message: str) -> int:
    print(f"shoal: {message}", file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    params = {} if args.rounds is None else {"rounds": args.rounds}
    r = _rpc(args, "run", params)
    print(f"run {r['run_id']}: {r['rounds']} rounds, {r.get('nodes', '?')} nodes, {r['features']} features "
          f"in {r['seconds']} s")
    return 0


def cmd_status(args) -> int:
    print(json.dumps(_rpc(args, "status", {}), indent=2))
    return 0
