"""The lab's own cost: time to bring up and tear down N emulated hosts (goal: under 10 s each for 32).

    sudo .venv/bin/python bench/lab/cost.py [--hosts 32] [--repeat 3] [--daemons]

Each repetition brings up a lab of N hosts, every one with a shaped link
(2 MiB/s up, 8 MiB/s down, 5 ms delay: two tbf qdiscs and a delay line per
host, N NFQUEUE rules per host), then tears it down, and times both:

* up: from entering ``Lab`` to every host ready (namespaces, bridge, veths,
  addresses, qdiscs, delay lines bound, iptables rules, per-host cgroups; with
  ``--daemons``, also one ``peer`` daemon per host started and READY);
* down: from leaving ``Lab`` to nothing left (processes killed, namespaces,
  cgroups and the work directory removed).

Prints a table and writes cost.json next to this file (one entry per
``--daemons`` setting, so both figures are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shoal.lab import net as labnet  # noqa: E402
from shoal.lab.lab import Lab  # noqa: E402
from shoal.lab.scenario import parse_scenario  # noqa: E402

SCENARIO = """
[lab]
ready_timeout = 300.0
[link]
upload = 2.0
download = 8.0
delay = 5.0
[[host]]
name = "h"
count = {hosts}
daemons = [{daemons}]
"""


async def once(hosts: int, daemons: bool) -> tuple[float, float]:
    scenario = parse_scenario(SCENARIO.format(hosts=hosts, daemons='"peer"' if daemons else ""), source="cost.toml")
    t0 = time.monotonic()
    lab = Lab(scenario, echo=None)
    await lab.__aenter__()
    up = time.monotonic() - t0
    run_id = lab.run_id
    t1 = time.monotonic()
    await lab.__aexit__(None, None, None)
    down = time.monotonic() - t1
    assert not labnet.lab_namespaces(run_id), "namespaces left behind"
    return up, down


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--daemons", action="store_true", help="one peer daemon per host, waited for READY")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/lab/cost.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    runs = [trio.run(once, args.hosts, args.daemons) for _ in range(args.repeat)]
    ups, downs = [u for u, _ in runs], [d for _, d in runs]
    what = f"{args.hosts} hosts" + (", a peer daemon each" if args.daemons else "")
    print(f"{'lab':<32} {'up s (median)':>14} {'down s (median)':>16}   runs")
    print(f"{what:<32} {statistics.median(ups):>14.2f} {statistics.median(downs):>16.2f}   "
          f"up {', '.join(f'{u:.2f}' for u in ups)}; down {', '.join(f'{d:.2f}' for d in downs)}")
    out = Path(__file__).with_name("cost.json")
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["with_daemons" if args.daemons else "network_only"] = {
        "hosts": args.hosts, "up_seconds": ups, "down_seconds": downs,
        "up_median": statistics.median(ups), "down_median": statistics.median(downs),
        "goal_seconds": 10.0, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "command": " ".join(["bench/lab/cost.py", *sys.argv[1:]]),
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
