"""The experiment commands: ``shoal telemetry experiment`` and ``shoal dispatch simulate``.

They live here, not with their daemons, because they run no daemon: each is an
offline experiment over a simulator or a synthetic cluster.
"""

from __future__ import annotations

import argparse


def add_commands(top: argparse._SubParsersAction, daemons: dict[str, argparse._SubParsersAction]) -> None:
    from shoal.lab import dispatch_simulate, telemetry_experiment

    e = daemons["telemetry"].add_parser(
        "experiment", help="the seed's experiment on a synthetic cluster (per-node vs FedAvg)")
    telemetry_experiment.add_arguments(e)
    e.set_defaults(func=telemetry_experiment.run)

    from shoal.lab import cli as lab_cli

    lab = top.add_parser("lab", help="live LAN experiments on emulated hosts (network namespaces, shaped links)")
    lab_cli.add_arguments(lab)

    d = top.add_parser("dispatch", help="dispatch policies offline")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    sim = dsub.add_parser("simulate", help="seed 004's experiments in the discrete-event simulator")
    dispatch_simulate.add_arguments(sim)
    sim.set_defaults(func=dispatch_simulate.run)
