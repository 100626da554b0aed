"""Seed 004's experiments in the simulator, for every pairing of policies.

Runs `shoal dispatch simulate --sweep all` with the settings quoted in the
README: 600 tasks, 8 tasks/s and 10 servers at the base point, each point the
mean of 3 random workloads, the learned policies trained for 6 episodes first.
Prints one table per sweep (average response time / deadline miss rate), writes
bench/dispatch/simulate.json and SVG charts in bench/dispatch/plots/.

    .venv/bin/python bench/dispatch/simulate.py [--seeds N] [--train N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal.lab import dispatch_simulate as simulate

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    simulate.add_arguments(parser)
    parser.set_defaults(sweep="all", json=HERE / "simulate.json", plots=HERE / "plots")
    return simulate.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
