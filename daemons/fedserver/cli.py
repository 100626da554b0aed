"""``shoal fed run|status``: talk to the fedserver's RPC."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from shoal.daemons.runtime.cli import call
from shoal.protocol.contract import Contract
from shoal.protocol.telemetry import Run


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


def _rpc(args, method: str, params: Contract | None = None) -> Any:
    """One call to the fedserver's RPC; any failure is one line and exit 2."""
    return call(args.server, method, params, what="the fedserver", token_file=args.token_file or None,
                timeout=86400.0)


def cmd_run(args) -> int:
    r = _rpc(args, "run", Run(rounds=args.rounds))
    print(f"run {r['run_id']}: {r['rounds']} rounds, {r.get('nodes', '?')} nodes, {r['features']} features "
          f"in {r['seconds']} s")
    return 0


def cmd_status(args) -> int:
    print(json.dumps(_rpc(args, "status"), indent=2))
    return 0
