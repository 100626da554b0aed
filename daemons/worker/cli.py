"""``shoal worker`` commands besides ``run``: the unit's privileged start step."""

from __future__ import annotations

import argparse

from shoal.daemons.runtime.cli import fail
from shoal.daemons.worker.isolation import delegate_v1_cgroups


def add_commands(worker: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    d = worker.add_parser(
        "delegate-cgroups",
        help="as root in the worker's unit (ExecStartPre=+): give it its cgroup v1 memory and cpu directories")
    d.set_defaults(func=cmd_delegate_cgroups)


def cmd_delegate_cgroups(args) -> int:
    try:
        changed = delegate_v1_cgroups()
    except OSError as exc:
        # Not fatal: the worker then finds no cgroup it may write, and says in its log
        # that tasks run in process groups, their limits not enforced.
        fail(f"worker delegate-cgroups: {exc.filename}: {exc.strerror}")
        return 0
    for path in changed:
        print(f"delegated {path}")
    return 0
